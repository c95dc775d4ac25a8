"""What the benchmarks share: running one of the repo's scripts the way a user runs it."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args, nproc=1, quiet=True):
    """Run `python name args...` from the repo root (under torchrun when nproc > 1); stop on failure.
    quiet: the script's stdout is dropped (its errors still show); otherwise the command is printed first."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc > 1 else []) + [os.path.join(REPO, name), *map(str, args)]
    if not quiet:
        print("$ " + " ".join(["torchrun", *cmd[3:]] if nproc > 1 else ["python", *cmd[1:]]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                   stdout=subprocess.DEVNULL if quiet else None)
