"""A run under torchrun owns its ckpt_dir, and its workers do not outlive their launcher."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from utils.checkpoints.training import list_checkpoints

TINY = ["--model_type=gpt2-tiny", "--max_seq_length=32", "--mixed_precision=false", "--device=cpu",
        "--micro_batch_size=2", "--gradient_accum_steps=1", "--eval_iters=1", "--eval_interval=0", "--log_interval=1",
        "--ckpt_interval=0", "--max_train_iters=100000"]


def children(pid):
    """Live child processes of `pid` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


def test_killed_launcher_stops_its_workers_and_the_lock_names_the_holder(tmp_path, repo, run_script,
                                                                         write_pretrain_data):
    """Issue 13 bug 6."""
    write_pretrain_data(tmp_path / "data", n_docs=400)
    ckpt = tmp_path / "ckpt"
    args = TINY + [f"--data_dir={tmp_path / 'data'}", f"--ckpt_dir={ckpt}", f"--log_dir={tmp_path / 'runs'}"]
    with open(tmp_path / "launcher.log", "w") as log:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(repo, "pretrain.py"), *args]
        launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=repo,
                                    env={**os.environ, "PYTHONPATH": repo})
    workers = []
    try:
        metrics = tmp_path / "runs" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.1)
        workers = children(launcher.pid)
        assert len(workers) == 2
        holder = json.loads((ckpt / ".lock").read_text())
        assert holder["pid"] in workers  # rank 0 holds it

        # A second run on the same ckpt_dir is refused at once, naming the holder: alone, and under torchrun
        # (rank 0 decides, every rank stops, rank 0 prints; torchrun itself then reports the failed workers).
        refusal = (f"pretrain.py: error: --ckpt_dir={ckpt} is in use by another run (pid {holder['pid']} on host "
                   f"{socket.gethostname()}, started {holder['since']}); wait for it to finish or stop it, or choose "
                   "another --ckpt_dir")
        second = run_script("pretrain.py", *args, "--resume=auto", check=False)
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [refusal], second.stderr[-3000:]
        second = run_script("pretrain.py", *args, "--resume=auto", check=False, nproc=2)
        # Printed once (rank 0); torchrun's summary then quotes it as the failed workers' "traceback".
        errors = [line for line in second.stderr.splitlines() if line.startswith("pretrain.py: error:")]
        assert second.returncode != 0 and errors == [refusal], second.stderr[-3000:]
        assert f"traceback : {refusal}" in second.stderr, second.stderr[-3000:]

        # The launcher dies without a chance to forward anything: its workers stop by themselves.
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 120
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "workers kept running after their launcher died"
    finally:
        for pid in [launcher.pid] + workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    # They stopped cleanly (SIGTERM: finish the step, save), so the run continues where they stopped.
    stopped = list_checkpoints(ckpt)
    assert stopped, (tmp_path / "launcher.log").read_text()[-3000:]
    step = stopped[-1][0]
    out = run_script("pretrain.py", *args, "--resume=auto", f"--max_train_iters={step + 1}")
    assert f"resumed from {ckpt / f'step_{step:08d}'} at step {step}" in out.stdout
