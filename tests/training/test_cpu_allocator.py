"""Issue 20 item 10 (speed): a CPU training process keeps freed memory for the next step. Before, glibc handed
every large freed tensor back to the OS (a fresh mmap per allocation), so each step page-faulted its large
tensors back in (the LM head's (N, V) fp32 buffer: 400 MB in the quickstart).

Observed the way the kernel counts it: the process's resident memory after a 50 MB tensor is freed. Whether
the next step's allocation lands in that kept memory (no page faults) also depends on what else sits on the
heap (posix_memalign asks for a little more than the hole left by a same-sized tensor), so this checks the
deterministic part, that nothing is handed back, with the untuned process as the control."""
import os
import subprocess
import sys

import pytest

CODE = """
import sys, psutil, torch
from utils.training.distributed import cleanup_distributed, init_distributed
if sys.argv[1] == "trainer":
    init_distributed("cpu")  # what every training process does at start
process = psutil.Process()
def mib_handed_back():
    t = torch.empty(50 * 2**20 // 4).fill_(1.0)  # a 50 MB tensor written once, then freed
    resident = process.memory_info().rss
    del t
    return (resident - process.memory_info().rss) / 2**20
print(max(mib_handed_back() for _ in range(3)))
if sys.argv[1] == "trainer":
    cleanup_distributed()
"""


def handed_back(repo, kind):
    env = {**os.environ, "PYTHONPATH": repo}
    out = subprocess.run([sys.executable, "-c", CODE, kind], capture_output=True, text=True, env=env, cwd=repo,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_a_cpu_training_process_keeps_freed_memory_for_the_next_step(repo):
    assert handed_back(repo, "plain") > 40  # the control: glibc's default returns it to the OS at once
    assert handed_back(repo, "trainer") < 1, "a training process handed a freed 50 MB tensor back to the OS"
