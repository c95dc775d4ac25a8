"""What this machine can do: CPU cores, the device to run on, whether bf16 is fast, the matmul peak.

Precision is chosen by measurement, not by name (DESIGN.md §2): on CUDA with bf16 support and on
CPUs with bf16 units (AVX-512-BF16, AMX) a bf16 matmul runs 2-4x faster than fp32; on an
AVX2-only CPU it is emulated and runs ~50x *slower*. Nothing here draws from a random number
generator: these run after a resumed run's RNG state was restored.
"""
import ctypes
import functools
import os
import sys
import time

import torch

from utils.errors import UserError


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """auto -> cuda if present, else cpu; cuda without CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"{flag}={name}: expected auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{flag}={name}: CUDA is not available here; use {flag}=cpu or {flag}=auto")
    return torch.device(name)


def configure_cpu_threads(local_world_size: int = 1) -> int:
    """Intra-op threads for a CPU process: its share of the cores this process may run on.

    torchrun sets OMP_NUM_THREADS=1 per worker; one thread per process leaves cores idle when
    fewer processes than cores run on a machine. More threads than cores (oversubscription)
    is the worse mistake: OpenMP threads then spin against each other.
    """
    n = max(1, available_cpus() // max(1, local_world_size))
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
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_mm_seconds(a, b, repeats):
    out = torch.mm(a, b)
    _sync(a.device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(a.device)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def bf16_speedup(device_str: str = "cpu") -> float:
    """How many times faster a 256^3 bf16 matmul runs than fp32 here (CPU: one thread, ~20 ms).

    One thread and interleaved repeats keep the answer stable on a busy machine: the two cases
    differ by 2-4x one way (bf16 units) or ~50x the other (AVX2 emulation), never by a little.
    """
    device = torch.device(device_str)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        mats = {dt: (torch.ones(256, 256, dtype=dt, device=device), torch.ones(256, 256, dtype=dt, device=device))
                for dt in (torch.float32, torch.bfloat16)}
        best = {dt: float("inf") for dt in mats}
        for _ in range(5):
            for dt, (a, b) in mats.items():
                best[dt] = min(best[dt], _best_mm_seconds(a, b, 1))
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / best[torch.bfloat16]


def choose_bf16(setting, device: torch.device, flag: str):
    """(use bf16?, why) for a precision setting: True/False force it; "auto" picks what is fast."""
    if setting is True or setting is False:
        return setting, f"{flag}={'true' if setting else 'false'}"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{flag}=auto: this GPU {'supports' if ok else 'lacks'} bf16"
    speedup = bf16_speedup("cpu")
    cap = torch.backends.cpu.get_cpu_capability()
    if speedup > 1.0:
        return True, f"{flag}=auto: bf16 matmuls run {speedup:.1f}x faster than fp32 on this CPU ({cap})"
    return False, (f"{flag}=auto: bf16 matmuls run {1 / speedup:.0f}x slower than fp32 on this CPU ({cap}, no bf16 "
                   f"units): using fp32")


def measure_matmul_flops(dtype=torch.float32, device="cpu", max_n: int = 4096, target_seconds: float = 0.05) -> float:
    """Best FLOP/s of a square matmul in `dtype`, growing n until one product takes ~target_seconds.

    Well under a second on any machine (a slow, emulated dtype stops at a small n), and
    deterministic inputs: no random number generator is touched.
    """
    device = torch.device(device)
    n, best = 256, 0.0
    while True:
        a = torch.ones(n, n, dtype=dtype, device=device)
        seconds = _best_mm_seconds(a, a, repeats=3)
        best = max(best, 2 * n ** 3 / seconds)
        if seconds >= target_seconds or n >= max_n:
            return best
        n *= 2


@functools.cache
def _cached_peak(device_str, dtype):
    return measure_matmul_flops(dtype, device_str, max_n=8192 if device_str.startswith("cuda") else 4096)


def peak_flops(device, dtype=torch.float32) -> float:
    """Measured matmul peak FLOP/s of one device (one process's threads on CPU), cached per process."""
    return _cached_peak(str(torch.device(device)), dtype)
