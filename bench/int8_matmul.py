"""Which int8 kernel is fast on this machine: one decode step's matmuls (batch 1) for gpt2's shapes.

    python bench/int8_matmul.py --threads 1
    python bench/int8_matmul.py                      # torch's default thread count

Columns, microseconds per call (median of interleaved repeats):
  dense fp32             x @ W.T, W as nn.Linear keeps it (out, in)
  dense fp32 (in, out)   the same with W stored column-major (utils.generation.loading.decode_layout)
  int8pack fp32          torch.ops.aten._weight_int8pack_mm(x, W_int8, scale), fp32 activations
  int8pack bf16          the same with x and scale cast to bf16 and the result back to fp32 (casts timed)
  dequant per call       F.linear(x, W_int8.float()) * scale: what an int8 layer costs without a kernel
  w8a8 (fbgemm)          Int8Linear(kernel="w8a8"): the row quantised to 7-bit codes, fbgemm's int8 GEMM,
                         the scaling back (x86 only; the whole layer as a decode step calls it)
One row per weight shape: a single weight, which stays in the CPU's cache between calls. The last
row, "whole gpt2", is one token's pass over all 49 distinct weights of gpt2 (12 x 4 + the LM head),
far more bytes than a cache holds: what a decode step really reads. Read that row.
utils/generation/quantize.py takes its CPU kernel from these figures (BENCHMARKS.md "Decoding").
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.generation.quantize import Int8Linear, w8a8_available  # noqa: E402

SHAPES = {"c_attn": (2304, 768), "attn c_proj": (768, 768), "c_fc": (3072, 768), "mlp c_proj": (768, 3072),
          "lm_head": (50257, 768)}


def kernels(N, K):
    """The columns' calls for one random (N, K) weight and a (1, K) activation."""
    W = torch.randn(N, K) * 0.02
    Wt = W.t().contiguous().t()
    scale = W.abs().amax(1) / 127
    Wq = torch.round(W / scale[:, None]).to(torch.int8)
    scale_bf16 = scale.bfloat16()
    x = torch.randn(1, K)
    calls = {
        "dense": lambda: x @ W.t(),
        "dense_t": lambda: x @ Wt.t(),
        "int8_fp32": lambda: torch.ops.aten._weight_int8pack_mm(x, Wq, scale),
        "int8_bf16": lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), Wq, scale_bf16).float(),
        "dequant": lambda: F.linear(x, Wq.float()) * scale,
    }
    if w8a8_available():
        linear = torch.nn.Linear(K, N, bias=False)
        linear.weight.data = W
        w8a8 = Int8Linear.from_linear(linear, kernel="w8a8")
        calls["w8a8"] = lambda: w8a8(x)
    return calls


def measure(shapes, repeats, inner):
    """Median microseconds of one pass over distinct weights of the given shapes, per column."""
    weights = [kernels(N, K) for N, K in shapes]
    times = {k: [] for k in weights[0]}
    with torch.inference_mode():
        for calls in weights:
            for f in calls.values():
                f()
        for _ in range(repeats):
            for k in times:
                t0 = time.perf_counter()
                for _ in range(inner):
                    for calls in weights:
                        calls[k]()
                times[k].append((time.perf_counter() - t0) / inner * 1e6)
    return [statistics.median(v) for v in times.values()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    w8a8 = " w8a8 (fbgemm) |" if w8a8_available() else ""
    print("| weight (out, in) | dense fp32 | dense fp32 (in, out) | int8pack fp32 | int8pack bf16 | dequant per call |"
          + w8a8)
    print("|---" * (6 + bool(w8a8)) + "|")
    for name, (N, K) in SHAPES.items():
        med = measure([(N, K)], args.repeats, inner=3 if N > 10_000 else 30)
        print(f"| {name} ({N}, {K}) | " + " | ".join(f"{m:,.0f}" for m in med) + " |")
    gpt2 = [SHAPES[k] for k in ("c_attn", "attn c_proj", "c_fc", "mlp c_proj")] * 12 + [SHAPES["lm_head"]]
    med = measure(gpt2, args.repeats, inner=2)
    print("| **whole gpt2, one token (49 weights)** | " + " | ".join(f"{m:,.0f}" for m in med) + " |")

if __name__ == "__main__":
    main()
