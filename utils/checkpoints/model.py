"""Model checkpoints: a directory with `model.safetensors` + `config.json` (no pickle).

Training checkpoints (sharded, with optimizer/RNG/data state) live in utils/checkpoints/training.py.
"""
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.errors import UserError
from utils.files import OutputMark, atomic_dir, atomic_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "minigpt-gpt2"
MARK = OutputMark(CONFIG_NAME, "format", FORMAT)  # a model checkpoint: what --overwrite may replace


class CheckpointError(UserError, ValueError):
    pass


def full_state_dict(model) -> dict:
    """CPU state dict without the tied lm_head (safetensors stores each tensor once)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        sd[k] = v.detach().to("cpu").contiguous()
    return sd


def save_model(model, directory, overwrite: bool = True, state_dict=None, extra_config=None):
    """Write `model` (a GPT2LMHeadModel, or its full `state_dict` + config) atomically to `directory`."""
    sd = full_state_dict(model) if state_dict is None else \
        {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    config = {"format": FORMAT, **model.config.__dict__, **(extra_config or {})}
    return write_tensors_and_config(directory, sd, WEIGHTS_NAME, config, CONFIG_NAME, overwrite)


def write_tensors_and_config(directory, tensors, weights_name, config, config_name, overwrite):
    """A safetensors file + a JSON config, written into a temporary dir renamed to `directory` when complete."""
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, weights_name),
                  metadata={"format": "pt"})
        with atomic_file(os.path.join(tmp, config_name)) as f:
            json.dump(config, f, indent=2)
    return directory


def read_safetensors(path, device="cpu") -> dict:
    """Every tensor of a safetensors file; a truncated or corrupt file is a CheckpointError naming it."""
    try:
        return load_file(path, device=str(device))
    except SafetensorError as e:
        raise CheckpointError(_unreadable(path, e)) from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # safetensors' dtype names


def read_safetensors_shapes(path) -> dict:
    """Every tensor of a safetensors file as an empty meta tensor of its shape and dtype (the header only)."""
    shapes = {}
    with open_safetensors(path) as f:
        for k in f.keys():
            info = f.get_slice(k)
            if info.get_dtype() not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {k} has dtype {info.get_dtype()}, which a model cannot hold")
            shapes[k] = torch.empty(info.get_shape(), dtype=_DTYPES[info.get_dtype()], device="meta")
    return shapes


def open_safetensors(path):
    """safe_open(path) (tensors read one at a time), with read_safetensors' error."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise CheckpointError(_unreadable(path, e)) from None


def _unreadable(path, e):
    return f"{path}: unreadable ({e}): the file is truncated or corrupt; copy or write it again"


def training_dir_hint(directory) -> str:
    """For a training run's ckpt_dir or one of its step_* checkpoints given where a finished model is
    expected: where that run's model is (its final/). Empty for any other directory."""
    directory = os.path.normpath(directory)
    if not os.path.isdir(directory):
        return ""
    if os.path.isfile(os.path.join(directory, "trainer_state.json")):  # a step_* dir: DCP shards for resuming
        final = os.path.join(os.path.dirname(directory), "final")
        return (f"{directory} is a training checkpoint (for --resume), not a finished model; the run's model is "
                f"{final}" + ("" if os.path.isdir(final) else ", written when the run finishes"))
    if os.path.isdir(os.path.join(directory, "final")) or any(n.startswith("step_") for n in os.listdir(directory)):
        return f"{directory} is a training run's --ckpt_dir; its finished model is {os.path.join(directory, 'final')}"
    return ""


def adapter_hint(directory) -> str:
    """For a LoRA adapter given where a model is expected: how to use it. Empty for any other directory."""
    path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(path):
        return ""
    try:
        with open(path) as f:
            base = json.load(f).get("base_checkpoint") or "BASE"
    except (OSError, ValueError, AttributeError):
        base = "BASE"
    return (f"{directory} is a LoRA adapter, not a model: give its base model as the model and the adapter as "
            f"--lora (generate_finetuned.py, evaluate.py), or merge them first: convert_lora_checkpoint.py "
            f"--base {base} --lora {directory} --output MERGED")


def check_model_dir(directory) -> GPT2Config:
    """The checkpoint's config, once the directory is known to hold a model (no weight is read)."""
    config = load_config(directory)
    if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}")
    return config


def load_config(directory) -> GPT2Config:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory; "
                              f"a model checkpoint is a directory with {WEIGHTS_NAME} and {CONFIG_NAME}")
    if not os.path.isfile(path):
        raise CheckpointError(training_dir_hint(directory) or adapter_hint(directory) or
                              f"{directory}: no {CONFIG_NAME}; is this a model checkpoint (written by save_model)? "
                              "Convert an HF model first with convert_hf_checkpoint.py")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if d.pop("format", None) != FORMAT:
        raise CheckpointError(f"{path}: not a miniGPT model config (field 'format' is not {FORMAT!r}); "
                              "for an HF transformers dir use convert_hf_checkpoint.py --hf_dir")
    known = set(GPT2Config.__dataclass_fields__)
    return GPT2Config(**{k: v for k, v in d.items() if k in known})


def check_state_dict(model, sd, source="checkpoint"):
    """Raise a CheckpointError naming missing/unexpected keys and shape mismatches."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: {tuple(sd[k].shape)} in {source} vs {tuple(expected[k])} in model"
              for k in sorted(set(expected) & set(sd)) if tuple(sd[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:8]))
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(problems))


def load_model(directory, device="cpu", dtype=None, config: GPT2Config = None, **config_overrides) -> GPT2LMHeadModel:
    """Build a GPT2LMHeadModel from a model checkpoint directory.

    `config`: if given, the checkpoint's config must agree with it (fields that differ are named).
    `config_overrides`: fields that do not change shapes (e.g. dropout) to set on the loaded model.
    device="meta": the same model checked against the file's header, without reading a weight (for the
    ranks that receive their shards from rank 0, see utils/training/trainer.py::build_model).
    """
    saved = check_model_dir(directory)
    if config is not None:
        diff = saved.shape_differences(config)
        if diff:
            raise CheckpointError(f"{directory}: checkpoint config does not match: " + "; ".join(diff))
    cfg = GPT2Config(**{**saved.__dict__, **config_overrides})
    path = os.path.join(directory, WEIGHTS_NAME)
    sd = read_safetensors_shapes(path) if str(device) == "meta" else read_safetensors(path, device)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    check_state_dict(model, sd, source=path)
    model.load_state_dict(sd, strict=False, assign=True)  # assign: no second copy of the weights
    model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
    if dtype is not None:
        model.to(dtype=dtype)
    return model.to(device)
