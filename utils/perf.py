"""Speed accounting shared by the training loop and bench/: model FLOPs, the machine's measured
matmul peak, MFU, and CPU thread settings.

MFU here is "model FLOPs utilisation" (PaLM, appendix B): the FLOPs the model needs per token
(not what the hardware happens to execute: no recomputation, no vocabulary padding), times
tokens/s, divided by the peak. The peak is *measured* (a large square matmul in the training
dtype), not a datasheet number, so MFU says how close training runs to what matmuls can do here.
"""
import functools
import os
import time

import torch


def model_flops_per_token(config, seq_len: int) -> int:
    """Training FLOPs per token of GPT2LMHeadModel: 6·N + 12·L·T·d.

    N counts the weights that take part in matmuls: per block 12·d² (q/k/v, output projection,
    MLP in and out) plus the LM head V·d (tied to wte; vocab_size, not the padded size). Biases,
    LayerNorms and the position embedding add no matmul FLOPs. 6 = 2 (multiply-add) × 3 (forward,
    grad of input, grad of weight). 12·L·T·d are the attention scores and the weighted sum of
    values (2·2·T·d per token per layer forward, ×3 with backward), over the full T×T square as
    PaLM and nanoGPT count it (causal kernels skip half of it, so this slightly flatters MFU).
    """
    L, d, V, T = config.n_layer, config.n_embd, config.vocab_size, seq_len
    n_matmul = L * 12 * d * d + V * d
    return 6 * n_matmul + 12 * L * T * d


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(dtype=torch.bfloat16, device="cpu", n=2048, repeats=3) -> float:
    """Best FLOP/s of an n×n×n matmul in `dtype` over `repeats` runs (after one warm-up)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


@functools.lru_cache(maxsize=None)
def _cached_peak(device_str, dtype):
    return measure_matmul_flops(dtype, device_str)


def peak_flops(device, dtype=torch.bfloat16) -> float:
    """Measured matmul peak FLOP/s of one device (one process's threads on CPU), cached per process."""
    return _cached_peak(str(torch.device(device)), dtype)


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float) -> float:
    """Fraction of the peak that the model's FLOPs reach at this throughput."""
    return tokens_per_sec * flops_per_token / peak if peak else 0.0


def configure_cpu_threads(local_world_size: int = 1) -> int:
    """Intra-op threads for a CPU process: its share of the cores this process may run on.

    torchrun sets OMP_NUM_THREADS=1 per worker; one thread per process leaves cores idle when
    fewer processes than cores run on a machine. More threads than cores (oversubscription)
    is the worse mistake: OpenMP threads then spin against each other.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(n)
    return n


def tune_cpu_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """glibc malloc: keep freed memory for the next step instead of handing it back to the OS.

    By default glibc serves every allocation above 128 KB-32 MB with a fresh mmap and returns
    it on free, so each training step page-faults its large activations (and an fp32 logits
    tensor of hundreds of MB) back in, one zeroed 4 KB page at a time: on a 2-core CPU that is
    a large share of a step. Raising the mmap and trim thresholds makes the heap keep that memory
    and reuse it. Process-wide, Linux/glibc only (returns False elsewhere); call it once at start.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False
