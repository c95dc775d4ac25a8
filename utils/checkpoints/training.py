"""Training checkpoints: sharded with torch.distributed.checkpoint (DCP), resumable at any world size.

    ckpt_dir/step_00001000/
        .metadata, __0_0.distcp, ...   model + optimizer (DCP; re-sharded on load)
        rng.safetensors                 the torch RNG state of every rank
        trainer_state.json              step, data position, world size, ... (written last)

A checkpoint is written as `.step_00001000.tmp` and renamed when every rank has finished, so a
run killed mid-save leaves only a `.tmp` directory, which `resume=auto` never picks up.
"""
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict

from utils.files import atomic_file

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir):
    """[(step, path)] of complete training checkpoints, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = STEP_DIR.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str, ckpt_dir: str):
    """The checkpoint path to resume from, or None for a fresh run."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"--resume={resume}: not a complete training checkpoint (no {STATE_FILE}); "
                                f"use --resume=auto to pick the newest one in --ckpt_dir")
    return resume


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


def _get_state_dicts(model, optimizer, ignore_frozen_params):
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(ignore_frozen_params))
    if ignore_frozen_params:
        model_sd = _only_trainable(model, model_sd)
    return model_sd, optim_sd


def gather_model_state_dict(model, ignore_frozen_params=False):
    """Full (unsharded) CPU tensors on rank 0, for the final model or adapter checkpoint."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=ignore_frozen_params)
    sd = get_model_state_dict(model, options=options)
    return _only_trainable(model, sd) if ignore_frozen_params else sd


def save_training_checkpoint(ckpt_dir, step, model, optimizer, trainer_state: dict, info,
                             keep_last: int, ignore_frozen_params=False):
    final = os.path.join(ckpt_dir, step_dir_name(step))
    tmp = os.path.join(ckpt_dir, f".{step_dir_name(step)}.tmp")
    if info.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = _get_state_dicts(model, optimizer, ignore_frozen_params)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    rng = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(info.device).cpu()
    all_rng = [None] * info.world_size
    dist.all_gather_object(all_rng, rng)
    if info.is_main:
        save_file({f"rank{r}.{k}": v for r, states in enumerate(all_rng) for k, v in states.items()},
                  os.path.join(tmp, "rng.safetensors"))
        with atomic_file(os.path.join(tmp, STATE_FILE)) as f:
            json.dump({**trainer_state, "step": step, "world_size": info.world_size}, f, indent=2)
        if os.path.exists(final):  # the same step saved again (e.g. a resumed run's end): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(ckpt_dir):  # leftovers of runs killed mid-save
            if name.startswith(".step_") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    dist.barrier()
    return final


def load_training_checkpoint(path, model, optimizer, info, seed: int, ignore_frozen_params=False) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return the trainer state."""
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    options = _options(ignore_frozen_params)
    model_sd, optim_sd = _get_state_dicts(model, optimizer, ignore_frozen_params)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=options)
    rng = load_file(os.path.join(path, "rng.safetensors"))
    if f"rank{info.rank}.cpu" in rng and state["world_size"] == info.world_size:
        torch.set_rng_state(rng[f"rank{info.rank}.cpu"])
        if info.device.type == "cuda" and f"rank{info.rank}.cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{info.rank}.cuda"], info.device)
    else:  # another world size: ranks do not map one to one; reseed deterministically
        torch.manual_seed(seed + 1000 * state["step"] + info.rank)
    return state
