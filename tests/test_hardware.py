"""utils/hardware.py against independent facts: torch's own timings and RNG state, the env simulation of an
AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), and the user-error contract."""
import os
import subprocess
import sys

import pytest
import torch

from utils.errors import UserError
from utils.hardware import choose_bf16, measure_matmul_flops, peak_flops, resolve_device


def test_peak_measurement_is_quick_and_leaves_every_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    import time
    t0 = time.perf_counter()
    flops = measure_matmul_flops(torch.float32, "cpu")
    assert time.perf_counter() - t0 < 3  # "well under a second" on an idle core; generous for a busy CI machine
    assert torch.equal(torch.get_rng_state(), before)
    assert 1e8 < flops < 1e13


def test_the_peak_is_measured_once_per_device_and_dtype(monkeypatch):
    """Issue 20 item 12 (it was `peak_flops("cpu") == peak_flops("cpu")`, true with or without a cache): count the
    measurements behind the cache; a second dtype is measured apart, never served the first one's peak."""
    import utils.hardware as hardware
    calls = []

    def fake_measure(dtype, device, max_n=4096):
        calls.append((dtype, device))
        return 1e9 * len(calls)

    monkeypatch.setattr(hardware, "measure_matmul_flops", fake_measure)
    hardware._cached_peak.cache_clear()
    try:
        fp32, again, bf16 = peak_flops("cpu"), peak_flops(torch.device("cpu")), peak_flops("cpu", torch.bfloat16)
    finally:
        hardware._cached_peak.cache_clear()  # other tests measure for real
    assert calls == [(torch.float32, "cpu"), (torch.bfloat16, "cpu")]
    assert (fp32, again, bf16) == (1e9, 1e9, 2e9)


def test_forced_settings_are_kept_and_auto_follows_the_measurement(monkeypatch):
    import utils.hardware as hardware
    cpu = torch.device("cpu")
    assert choose_bf16(True, cpu, "--mixed_precision")[0] is True
    assert choose_bf16(False, cpu, "--mixed_precision")[0] is False
    monkeypatch.setattr(hardware, "bf16_speedup", lambda device="cpu": 0.02)
    use, why = choose_bf16("auto", cpu, "--mixed_precision")
    assert use is False and "slower" in why and "fp32" in why


def test_an_avx2_only_cpu_gets_fp32():
    # A fresh interpreter with the ISA capped at AVX2: bf16 is emulated there and must not be chosen.
    code = ("import torch; from utils.hardware import choose_bf16, bf16_speedup; "
            "print(torch.backends.cpu.get_cpu_capability(), choose_bf16('auto', torch.device('cpu'), 'x')[0])")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    capability, chosen = out.stdout.split()
    if capability not in ("AVX2", "DEFAULT"):
        pytest.skip(f"this CPU reports {capability} under the AVX2 cap")
    assert chosen == "False"


def test_cuda_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
