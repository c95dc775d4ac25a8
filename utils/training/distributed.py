"""Process-group setup for torchrun or a plain `python script.py` (world size 1).

One code path for CPU and GPU: nccl when CUDA is present, gloo otherwise. Even a single process
gets a (1-rank) process group, so FSDP2 and torch.distributed.checkpoint run the same way at
every world size.
"""
import contextlib
import ctypes
import datetime
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import USER_ERRORS, UserError, record_for_torchrun, user_message
from utils.hardware import configure_cpu_threads, resolve_device, tune_cpu_allocator


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_with_launcher():
    """Under torchrun, get one SIGTERM when the launcher dies.

    torchrun starts its workers in sessions of their own, so a killed launcher would leave them training
    (and racing the next run in the same ckpt_dir). SIGTERM is the clean stop: finish the step, save, exit.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def launcher_died(signum=None, frame=None):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)

    if sys.platform.startswith("linux"):
        # The kernel signals a child each time a thread of its dying parent exits (torchrun has several), so
        # the death signal is SIGUSR2, passed on once as SIGTERM: a second SIGTERM would abort the save.
        signal.signal(signal.SIGUSR2, launcher_died)
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGUSR2)
        if os.getppid() != launcher:  # it died before prctl took effect
            launcher_died()
        return

    def watch():  # elsewhere: poll for the launcher's death
        while os.getppid() == launcher:
            time.sleep(1)
        launcher_died()
    threading.Thread(target=watch, daemon=True, name="stop_with_launcher").start()


def init_distributed(device: str = "auto", timeout_minutes: float = 30, cpu_threads: int = 0) -> DistInfo:
    """Join torchrun's process group (RANK/WORLD_SIZE/LOCAL_RANK) or make a 1-process one."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    stop_with_launcher()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    copies = launched_copies()
    if not under_torchrun and copies > 1:
        raise UserError(f"{copies} copies of this script were launched (srun/mpirun) without torchrun: each would "
                        "train alone and write the same --ckpt_dir; start one torchrun per node instead "
                        "(e.g. srun --ntasks-per-node=1 torchrun --nnodes $SLURM_NNODES ...)")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        # nccl for the device tensors; gloo beside it for CPU ones: the loop's small counters (no device
        # sync) and the CPU-offloaded gradients that clipping reduces.
        dev, backend = torch.device("cuda", local_rank), "cuda:nccl,cpu:gloo"
        torch.set_float32_matmul_precision("high")  # fp32 matmuls (--mixed_precision=false) on TF32 tensor cores
    else:
        backend = "gloo"
        # Keep freed memory for the next step instead of page-faulting it back in (the LM head's (N, V) fp32
        # buffer alone is 400 MB): the quickstart's pretraining steps took 18.5 -> 15.5 s (BENCHMARKS.md).
        tune_cpu_allocator()
        if cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        else:
            configure_cpu_threads(local_world_size)  # torchrun pins workers to 1 thread; give each its share
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if under_torchrun:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank, local_rank, world_size, local_world_size, dev, backend)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_run(device: str = "auto", prog="miniGPT", cpu_threads: int = 0):
    """Set up the process group; tear it down on exit.

    A user error (utils.errors) ends the run with a one-line message from rank 0 and exit code 2;
    anything else prints its traceback and exits 1. With several ranks a failing rank exits at
    once without a collective teardown: its peers may be blocked in a collective, and torchrun
    stops them when one rank dies.
    """
    info = None
    try:
        info = init_distributed(device, cpu_threads=cpu_threads)
        yield info
    except BaseException as e:
        rank0 = info.is_main if info else int(os.environ.get("RANK", 0)) == 0
        if isinstance(e, USER_ERRORS):
            line = f"{prog}: error: {user_message(e)}"
            if rank0:
                print(line, file=sys.stderr, flush=True)
            record_for_torchrun(line)  # torchrun's summary then carries it (every rank: whichever it reports)
            code = 2
        elif isinstance(e, KeyboardInterrupt):
            code = 130
        elif isinstance(e, SystemExit):
            raise
        else:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        sys.stdout.flush()
        if info is not None and info.world_size > 1:
            if code == 2 and not rank0:
                # The ranks raise the same user error together, but only rank 0 prints it: torchrun stops every
                # rank as soon as one exits, so leave rank 0 the time to print before this exit triggers that.
                time.sleep(5)
            os._exit(code)
        cleanup_distributed()
        sys.exit(code)
    cleanup_distributed()
    if info.world_size > 1:
        # A torchrun worker is done once its process group is gone. Leaving through the interpreter's
        # teardown instead intermittently aborts rank 1 ("terminate called without an active exception",
        # exit -6) while C++ threads of the collectives are destroyed: seen about once in 10 two-rank runs.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def launched_copies() -> int:
    """How many copies of this script srun or mpirun started in this job step (1 when none did)."""
    for var in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def all_reduce_sum(values, info: DistInfo):
    """Sum a list of Python numbers over all ranks, as float64 on the CPU (gloo): no device sync."""
    t = torch.tensor(values, dtype=torch.float64)
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
