"""Issue 20 item 10 (speed): a CPU training process keeps freed memory for the next step. Before, every step
page-faulted its large tensors back in (the LM head's (N, V) fp32 buffer: 400 MB in the quickstart), ~20 % of
its pretraining step on a 2-core AVX2 machine. Observed the way the kernel counts it: minor page faults."""
import os
import subprocess
import sys

import pytest

CODE = """
import resource, torch
from utils.training.distributed import cleanup_distributed, init_distributed
init_distributed("cpu")
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(50 * 2**20 // 4).fill_(1.0)  # a 50 MB tensor written once, then freed
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_step()  # the first step faults its memory in either way
print(min(faults_of_a_step() for _ in range(3)))
cleanup_distributed()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_a_cpu_training_process_reuses_freed_memory_instead_of_faulting_it_in(repo):
    env = {**os.environ, "PYTHONPATH": repo}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    pages = 50 * 2**20 // 4096
    faults = int(out.stdout.split()[-1])
    assert faults < pages // 10, f"{faults} page faults for a {pages}-page tensor allocated again"
