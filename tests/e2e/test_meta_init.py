"""Meta-device init (utils/training/trainer.py::build_model): every rank builds the model on the meta
device, only rank 0 materialises the weights and broadcasts them. The sharded model must equal what one
plain process builds, with the seed's init (pretraining) or the checkpoint file's tensors (fine-tuning,
LoRA), and ranks other than 0 must never build the model with weights. The CUDA cases (bench/gpu.sh runs
them) also check that no GPU holds more than its shards plus one tensor, and nothing at all with offload."""
import json

import pytest
import torch

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.checkpoints.model import save_model

CUDA = torch.cuda.is_available()
NGPU = min(2, torch.cuda.device_count()) if CUDA else 0
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.parametrize("device,nproc,offload", [
    ("cpu", 1, False), ("cpu", 2, False),
    pytest.param("cuda", NGPU, False, marks=needs_cuda), pytest.param("cuda", 1, True, marks=needs_cuda)])
def test_sharded_model_equals_the_plain_model_and_only_rank_0_builds_weights(tmp_path, run_script, device, nproc,
                                                                              offload):
    torch.manual_seed(7)
    ckpt = save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny")), str(tmp_path / "base"))
    out = tmp_path / "result.json"
    run_script("tests/e2e/meta_init_worker.py", ckpt, out, device, "offload" if offload else "", nproc=nproc)
    results = json.loads(out.read_text())
    for kind, r in results.items():
        # the scripts' default mixed_precision=auto: bf16 compute where it is fast (this CPU: AVX512-BF16),
        # fp32 elsewhere; the reference computes in fp32 (CUDA fp32 matmuls run in TF32)
        logit_tol = 1e-5 if device == "cpu" and not r["bf16"] else 2e-2
        assert r["keys_equal"], kind
        assert r["max_weight_diff"] == 0.0, kind  # a broadcast copies bits (the fp32 master weights)
        assert r["max_logit_diff"] < logit_tol, (kind, r["max_logit_diff"])
        # one process shards the model it built; with more, rank 0 builds it twice (with weights, on meta)
        expected = [["cpu"]] if nproc == 1 else [["cpu", "meta"]] + [["meta"]] * (nproc - 1)
        assert [rank["built"] for rank in r["ranks"]] == expected, kind
        for rank in r["ranks"]:
            assert rank["tied"], kind  # lm_head still shares the embedding after to_empty and the load
            assert rank["trainable"] == r["trainable"], kind
            # each rank holds its shard only: 1/nproc of the parameters (FSDP2 pads dim 0 to a multiple)
            assert abs(rank["local_numel"] - r["numel"] / nproc) <= 0.01 * r["numel"], kind
            assert rank["shard_devices"] == ["cpu" if offload else device], kind
            if offload:  # the shards stay in host memory and arrive over gloo: the GPU holds no weights
                assert rank["gpu_peak_bytes"] < r["largest_tensor_bytes"] // 4, kind
            elif device == "cuda":  # never the whole model: the shards plus the one tensor in flight
                assert rank["gpu_peak_bytes"] <= 4 * rank["local_numel"] + r["largest_tensor_bytes"] + 2**20, kind
    assert len(results["lora"]["trainable"]) == 2 * 2 * 2  # q and v, A and B, 2 layers
