"""Training checkpoints, and the policy of the directory that holds them.

    ckpt_dir/
        .lock                           held by the running job (rank 0); names its pid and host
        step_00001000/
            .metadata, __0_0.distcp, ...   model + optimizer (DCP; re-sharded on load)
            rng.safetensors                 the torch RNG state of every rank
            trainer_state.json              step, data position, config, file sizes, ... (written last)
        final/                          the finished model (written by the trainer)
        set_aside_20260101-120000/      checkpoints moved out of the way: past an explicit resume point, or unreadable

A checkpoint is written as `.step_00001000.tmp` and renamed when every rank has finished, so a
run killed mid-save leaves only a `.tmp` directory, which `resume=auto` never picks up.

The trainer makes one `TrainingCheckpointer` per run and calls `load(...)` and `save(step)` on it;
every stateful part (model + optimizer, data loader, RNG) saves and loads its own state.
"""
import fcntl
import json
import os
import re
import shutil
import socket
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from models.gpt2 import GPT2Config
from utils.checkpoints.model import CheckpointError, read_safetensors
from utils.files import atomic_file, replace_dir

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
LOCK_FILE = ".lock"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(ckpt_dir):
    """[(step, path)] of every step_* directory, oldest first (complete or not)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted((int(m.group(1)), os.path.join(ckpt_dir, name))
                  for name in os.listdir(ckpt_dir) if (m := STEP_DIR.match(name)))


def list_checkpoints(ckpt_dir):
    """[(step, path)] of complete training checkpoints (their state file written), oldest first."""
    return [(step, path) for step, path in step_dirs(ckpt_dir) if os.path.isfile(os.path.join(path, STATE_FILE))]


def read_state(path) -> dict:
    """A checkpoint's trainer_state.json, verified against the file sizes recorded at save time.

    Cheap (no tensor is read); raises CheckpointError naming the file that is missing, truncated or unreadable.
    """
    state_path = os.path.join(path, STATE_FILE)
    try:
        with open(state_path) as f:
            state = json.load(f)
        int(state["step"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {STATE_FILE})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{state_path}: unreadable ({type(e).__name__}: {e})") from None
    for name, size in state.get("files", {}).items():
        file = os.path.join(path, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            what = "missing" if actual is None else f"{actual} bytes, {size} when saved (truncated?)"
            raise CheckpointError(f"{file}: {what}")
    try:
        FileSystemReader(path).read_metadata()
    except Exception as e:  # any failure to parse the index means the checkpoint cannot be loaded
        raise CheckpointError(f"{os.path.join(path, '.metadata')}: unreadable ({type(e).__name__})") from None
    return state


def _options(ignore_frozen_params):
    # Without frozen parameters (LoRA) the model state is partial by design: load it non-strictly.
    return StateDictOptions(ignore_frozen_params=ignore_frozen_params, strict=not ignore_frozen_params)


def _canonical(name):
    """A parameter name without the wrappers of activation checkpointing and torch.compile."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _only_trainable(model, sd):
    # A frozen tied weight (lm_head = wte) slips through ignore_frozen_params under its second name.
    trainable = {_canonical(n) for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in sd.items() if k in trainable}


def gather_model_state_dict(model, ignore_frozen_params=False):
    """Full (unsharded) CPU tensors on rank 0, for the final model or adapter checkpoint."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=ignore_frozen_params)
    sd = get_model_state_dict(model, options=options)
    return _only_trainable(model, sd) if ignore_frozen_params else sd


class ModelAndOptimizer:
    """The sharded tensors of a checkpoint: model and AdamW state (DCP keys `model.*`, `optim.*`)."""

    def __init__(self, model, optimizer, ignore_frozen_params):
        self.model, self.optimizer, self.ignore_frozen_params = model, optimizer, ignore_frozen_params

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=_options(self.ignore_frozen_params))
        if self.ignore_frozen_params:
            model_sd = _only_trainable(self.model, model_sd)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd):
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=_options(self.ignore_frozen_params))


class RNGState:
    """The torch RNG of every rank (dropout): gathered to rank 0 on save, each rank's own restored on load."""

    def __init__(self, info, seed):
        self.info, self.seed = info, seed

    def state_dict(self):
        rng = {"cpu": torch.get_rng_state()}
        if self.info.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.info.device).cpu()
        gathered = [None] * self.info.world_size
        dist.all_gather_object(gathered, rng)
        return {f"rank{r}.{k}": v for r, states in enumerate(gathered) for k, v in states.items()}

    def load_state_dict(self, sd, saved_world_size, step):
        rank = self.info.rank
        if f"rank{rank}.cpu" in sd and saved_world_size == self.info.world_size:
            torch.set_rng_state(sd[f"rank{rank}.cpu"])
            if self.info.device.type == "cuda" and f"rank{rank}.cuda" in sd:
                torch.cuda.set_rng_state(sd[f"rank{rank}.cuda"], self.info.device)
        else:  # another world size: ranks do not map one to one; reseed deterministically
            torch.manual_seed(self.seed + 1000 * step + rank)


class DirLock:
    """An exclusive lock on a directory for the lifetime of a run.

    flock(2) on `.lock`: the kernel drops it when the holder dies, however it dies, so a lock left by a
    killed run is taken over without asking. The file names the holder for the message of a refused run.
    """

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_FILE)
        self.fd = None
        self.created = False  # the directory did not exist: a run that saves nothing removes it again

    def acquire(self):
        """Take the lock; return the holder recorded by a run that died holding it ("" if none)."""
        self.created = not os.path.isdir(os.path.dirname(self.path))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process
            os.close(fd)
            raise CheckpointError(self._in_use(previous)) from None
        except OSError:  # no flock on this filesystem (some network mounts): go by the recorded pid
            if _holder_alive(previous):
                os.close(fd)
                raise CheckpointError(self._in_use(previous)) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return _describe(previous) if previous else ""

    def _in_use(self, holder):
        d = os.path.dirname(self.path)
        return (f"--ckpt_dir={d} is in use by another run ({_describe(holder)}); wait for it to finish or stop it, "
                f"or choose another --ckpt_dir")

    def release(self):
        if self.fd is not None:
            directory = os.path.dirname(self.path)
            if self.created and os.listdir(directory) == [LOCK_FILE]:
                # A run refused (or failed) before its first checkpoint leaves no empty ckpt_dir behind.
                os.unlink(self.path)
                os.rmdir(directory)
            else:
                os.ftruncate(self.fd, 0)  # empty = free; the file stays so that no two runs lock different files
            os.close(self.fd)
            self.fd = None


def _describe(holder_json):
    try:
        h = json.loads(holder_json)
        return f"pid {h['pid']} on host {h['host']}, started {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _holder_alive(holder_json):
    """Whether the process a lock file names still runs (only where flock is not available)."""
    try:
        h = json.loads(holder_json)
    except ValueError:
        return False  # empty: released
    if h.get("host") != socket.gethostname():
        return True  # cannot tell from here: assume it runs
    try:
        os.kill(int(h["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def run_identity(cfg) -> dict:
    """What a resumed run must share with the run that saved the checkpoint: the data order, the sample
    boundaries and the mixture depend on these. Everything else (steps, LR, world size, ...) may change."""
    sources = cfg.sources() if hasattr(cfg, "sources") else [(cfg.data_dir, 1.0)]
    return {"seed": cfg.seed, "max_seq_length": cfg.max_seq_length,
            "data": [f"{os.path.realpath(d)}:{float(w):g}" for d, w in sources]}


def keep_global_batch(cfg, state, world_size, say=print):
    """A run resumed at another world size keeps the global batch it was saved with (the LR schedule and the
    data order were made for it): gradient_accum_steps is recomputed when micro_batch_size x world size
    divides it, else the resume is refused. An explicit --global_batch_size is a deliberate change: kept.
    Called by the trainer before the data loaders are made (they take gradient_accum_steps) and the log is cut."""
    saved = (state or {}).get("config", {})
    layout = ("micro_batch_size", "gradient_accum_steps")
    if not state or state["world_size"] == world_size or cfg.global_batch_size or not all(
            isinstance(saved.get(k), int) for k in layout):
        return
    then = saved["micro_batch_size"] * saved["gradient_accum_steps"] * state["world_size"]
    per_step = cfg.micro_batch_size * world_size
    was = (f"the checkpoint was saved at world size {state['world_size']} with a global batch of {then} sequences "
           f"({saved['micro_batch_size']} x {saved['gradient_accum_steps']} accumulation x {state['world_size']})")
    deliberately = "or set --global_batch_size to change the global batch deliberately"
    if then % world_size:
        raise CheckpointError(f"{was}; {then} is not a multiple of world size {world_size}, so no batch layout "
                              f"keeps it: resume at a world size that divides it, {deliberately}")
    if then % per_step:
        raise CheckpointError(f"{was}; at world size {world_size} each rank needs {then // world_size} "
                              f"sequences a step, which --micro_batch_size={cfg.micro_batch_size} does not divide: "
                              f"choose a --micro_batch_size that does, {deliberately}")
    if cfg.gradient_accum_steps != then // per_step:
        say(f"note: {was}; keeping it at world size {world_size}: gradient_accum_steps "
            f"{cfg.gradient_accum_steps} -> {then // per_step}")
        cfg.gradient_accum_steps = then // per_step


class TrainingCheckpointer:
    """The checkpoints of one run in `cfg.ckpt_dir`: the lock, what to resume, saving and pruning.

    Made before the model, so that a run that cannot start is refused at once:
    - `--resume=auto` picks the newest complete and readable checkpoint (unreadable ones are skipped
      with a note), `--resume=PATH` that one (an unreadable one is refused), none = a fresh run,
      refused over a directory that already holds a run;
    - a checkpoint of another task (pretrain / finetune / finetune_lora) is refused;
    - checkpoints past the resume point (and their final/) are moved aside, never picked up again.
    Then `load(model, optimizer, data)` checks the rest (model shape, seed, data, LoRA settings) and
    restores every part; `save(step)` writes one and prunes the older ones of this run.
    """

    def __init__(self, cfg, info, task_name, record=None, ignore_frozen_params=False):
        self.cfg, self.info, self.task_name = cfg, info, task_name
        self.ckpt_dir = cfg.ckpt_dir
        self.record = dict(record or {})  # task settings stored in every checkpoint and compared on resume
        self.ignore_frozen_params = ignore_frozen_params
        self.parts = self.rng = self.data = self.model_config = None
        self._lock = DirLock(cfg.ckpt_dir)
        # Rank 0 alone reads and rearranges the directory; every rank gets its decision.
        outcome = [None]
        if info.is_main:
            try:
                outcome[0] = self._start()
            except CheckpointError as e:
                outcome[0] = str(e)
        if info.world_size > 1:
            dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], str):
            self.close()
            raise CheckpointError(outcome[0])
        self.resume_path, self.resume_state = outcome[0]

    @property
    def resume_step(self) -> int:
        return self.resume_state["step"] if self.resume_state else 0

    @property
    def final_dir(self):
        return os.path.join(self.ckpt_dir, "final")

    def finished(self, max_steps) -> bool:
        """Resuming a run that already reached its last step and wrote its final model."""
        return self.resume_step >= max_steps and os.path.isdir(self.final_dir)

    # --- start: lock, resume resolution, refusals (rank 0) ---

    def _start(self):
        took_over = self._lock.acquire()
        if took_over:
            self._say(f"{self.ckpt_dir}: took over the lock of a run that is no longer running ({took_over})")
        resume = self.cfg.resume
        if resume == "auto":
            path, state = self._newest_readable()
            if path is None:
                self._say(f"resume=auto: no checkpoint in {self.ckpt_dir}, starting fresh")
                return None, None
        elif resume:
            path, state = resume, self._read_explicit(resume)
        else:
            self._refuse_used()
            return None, None
        if state.get("task", self.task_name) != self.task_name:
            raise CheckpointError(f"{path} is a {state['task']}.py checkpoint; {self.task_name}.py resumes only its "
                                  f"own: choose another --ckpt_dir (or --resume)")
        self._set_aside_past(state["step"])
        return path, state

    def _newest_readable(self):
        problems = []
        for _, path in reversed(step_dirs(self.ckpt_dir)):
            try:
                state = read_state(path)
            except CheckpointError as e:
                problems.append(str(e))
                self._say(f"resume=auto: skipping an unreadable checkpoint: {e}")
                continue
            return path, state
        if problems:
            raise CheckpointError(f"no readable checkpoint in {self.ckpt_dir} (newest: {problems[0]}); "
                                  "remove the broken ones to start fresh, or choose another --ckpt_dir")
        return None, None

    def _read_explicit(self, path):
        if not os.path.exists(path):
            raise CheckpointError(f"--resume={path} does not exist; give a step_* directory of a run's --ckpt_dir, "
                                  "or --resume=auto for the newest one in --ckpt_dir")
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            hint = "use --resume=auto to pick the newest one in --ckpt_dir"
            if list_checkpoints(path):
                hint = f"it holds checkpoints: use --resume=auto --ckpt_dir={path}"
            raise CheckpointError(f"--resume={path}: not a complete training checkpoint (no {STATE_FILE}); {hint}")
        try:
            return read_state(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; resume from another checkpoint (--resume=auto picks the newest readable "
                                  "one)") from None

    def _refuse_used(self):
        existing = list_checkpoints(self.ckpt_dir)
        if existing or os.path.isdir(self.final_dir):
            what = f"training checkpoints up to step {existing[-1][0]}" if existing else "a finished run (final/)"
            raise CheckpointError(f"--ckpt_dir={self.ckpt_dir} already holds {what}; use --resume=auto to continue it, "
                                  "or choose another --ckpt_dir")

    def _set_aside_past(self, step):
        """Move the checkpoints after `step` (another trajectory, or unreadable) and their final/ out of the way."""
        later = [path for s, path in step_dirs(self.ckpt_dir) if s > step]
        if not later:
            return
        if os.path.isdir(self.final_dir):
            later.append(self.final_dir)
        aside = os.path.join(self.ckpt_dir, f"set_aside_{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside, exist_ok=True)
        for path in later:
            os.rename(path, os.path.join(aside, os.path.basename(path)))
        self._say(f"resuming at step {step}: moved {', '.join(os.path.basename(p) for p in later)} (past that step) "
                  f"to {aside}; delete it when you no longer need it")

    # --- load ---

    def load(self, model, optimizer, data) -> int:
        """Register the run's stateful parts; on resume, check and restore them. Returns the step to start at."""
        self.model_config = model.config
        self.parts = ModelAndOptimizer(model, optimizer, self.ignore_frozen_params)
        self.rng = RNGState(self.info, self.cfg.seed)
        self.data = data
        if self.resume_path is None:
            return 0
        path, state = self.resume_path, self.resume_state
        self._check_compatible(path, state, model.config)
        sd = self.parts.state_dict()
        rng = read_safetensors(os.path.join(path, RNG_FILE))
        try:
            dcp.load(sd, checkpoint_id=path)
        except CheckpointException as e:
            failure = next(iter(e.failures.values()), e)
            raise CheckpointError(f"{path}: unreadable ({type(failure).__name__}: {failure}); resume from another "
                                  "checkpoint") from None
        self.parts.load_state_dict(sd)
        self.rng.load_state_dict(rng, state["world_size"], state["step"])
        try:
            data.load_state_dict(state["data"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: the data loader cannot continue from it ({e})") from None
        self._say(f"resumed from {path} at step {state['step']} (saved at world size {state['world_size']}, "
                  f"now {self.info.world_size})")
        return state["step"]

    def _check_compatible(self, path, state, model_config):
        saved = state.get("model_config")
        diff = GPT2Config.from_dict(saved).shape_differences(model_config, "checkpoint", "now") if saved else []
        if diff:
            raise CheckpointError(f"{path} was saved from another model ({'; '.join(diff)}); use the same "
                                  "--model_type or another --ckpt_dir")
        now = {**run_identity(self.cfg), **self.record}
        then = {**state.get("identity", {}), **{k: state[k] for k in self.record if k in state}}
        diff = [f"{k}: checkpoint {then[k]} vs now {now[k]}" for k in now if k in then and then[k] != now[k]]
        if diff:
            raise CheckpointError(f"{path} was saved with other settings ({'; '.join(diff)}); a resumed run keeps its "
                                  "seed, sequence length, data and adapter settings: pass the same values or choose "
                                  "another --ckpt_dir")

    # --- save ---

    def save(self, step) -> str:
        """Write a checkpoint of every part at `step` (collective), then prune this run's older ones."""
        final = os.path.join(self.ckpt_dir, step_dir_name(step))
        tmp = os.path.join(self.ckpt_dir, f".{step_dir_name(step)}.tmp")
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        dcp.save(self.parts.state_dict(), checkpoint_id=tmp)
        rng = self.rng.state_dict()
        if self.info.is_main:
            save_file(rng, os.path.join(tmp, RNG_FILE))
            # Sizes of every file, checked cheaply on resume: a truncated copy is caught before loading.
            files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
            state = {"step": step, "world_size": self.info.world_size, "task": self.task_name,
                     "data": self.data.state_dict(), "identity": run_identity(self.cfg), **self.record,
                     "config": _jsonable(vars(self.cfg)), "model_config": _jsonable(vars(self.model_config)),
                     "files": files}
            with atomic_file(os.path.join(tmp, STATE_FILE)) as f:
                json.dump(state, f, indent=2)
            replace_dir(tmp, final)  # the same step saved again (a resumed run's end) replaces it
            self._prune(step)
        dist.barrier()
        return final

    def _prune(self, step):
        # Later checkpoints were moved aside at the start, so these are this run's, ending with the one just saved.
        mine = [path for s, path in list_checkpoints(self.ckpt_dir) if s <= step]
        for old in mine[:-self.cfg.keep_last_ckpts]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(self.ckpt_dir):  # leftovers of runs killed mid-save
            if name.startswith(".step_") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(self.ckpt_dir, name), ignore_errors=True)

    def latest(self):
        """The newest complete checkpoint of this run (for messages), or None."""
        found = list_checkpoints(self.ckpt_dir)
        return found[-1][1] if found else None

    def close(self):
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _say(self, msg):
        if self.info.is_main:
            print(msg, flush=True)


def _jsonable(d):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
