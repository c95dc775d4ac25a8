#!/usr/bin/env bash
# The GPU check in one command, on a CUDA machine: the GPU tests (tests/gpu: nccl, bf16 FSDP2, compile,
# activation checkpointing, CPU offload, DCP resume, LoRA, generation; and meta-device init on the GPU,
# with and without offload: tests/e2e/test_meta_init.py), then gpt2 124M training throughput
# (block 1024) against transformers on the same GPU: tokens/s, MFU against the measured matmul peak and
# against the GPU's datasheet bf16 peak; then packed fine-tuning (flex attention, block-sparse document mask)
# against padded batches: target tokens/s and padding on the sample chat set and an instruction set with
# a few long contexts (bench/packing_throughput.py; the GPU tests above check flex attention's exactness);
# then batch-1 decoding of gpt2 124M (prompt 16, 256 new tokens, greedy):
# ours through prepare_for_decode (int8 weights, static cache, torch.compile with CUDA graphs) against
# transformers eager fp32 / bf16 / static cache + compile (gpt-fast's GPU figures are the anchor: docs/decoding.md).
#     bash bench/gpu.sh              # PYTHON=/path/to/python to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: error: no CUDA GPU visible")'
$PY -c 'import torch; print("GPU:", torch.cuda.get_device_name(), "x", torch.cuda.device_count(), "| torch", torch.__version__)'
$PY -m pytest -q tests/gpu tests/e2e/test_meta_init.py
$PY bench/train_throughput.py --device cuda --config gpt2 --batch_size 8 --dtypes bf16 --modes eager,compile \
    --repeats 3 --steps 5
$PY bench/packing_throughput.py --device cuda --dtype bf16 --seq_len 1024 --examples 2048 --batch_size 8 \
    --repeats 3
$PY bench/generate_throughput.py --device cuda --config gpt2 --repeats 5
$PY bench/generate_throughput.py --device cuda --config gpt2-xl --new_tokens 128 --repeats 3 \
    --rows "transformers generate,transformers bf16,transformers static cache + compile,ours compile,ours int8 + compile"
