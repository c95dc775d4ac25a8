"""LoRA adapter checkpoints: `adapter.safetensors` + `adapter_config.json`.

The config stores everything needed to rebuild and merge the adapter without guessing: r, alpha,
dropout, targets, whether biases (or the token embeddings) were trained, the base model's config,
and a fingerprint (sha256) of the base checkpoint's weights, so a merge onto another base is refused.
"""
import hashlib
import json
import os

from safetensors.torch import save_file

from models.gpt2 import GPT2Config
from models.lora import EMBEDDING_KEY, apply_lora, lora_modules, mark_only_lora_trainable
from utils.checkpoints.model import (
    WEIGHTS_NAME,
    CheckpointError,
    read_safetensors,
    training_dir_hint,
    write_tensors_and_config,
)
from utils.files import OutputMark, atomic_dir

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "minigpt-lora"
PEFT_MARK = OutputMark("adapter_config.json", "peft_type", "LORA")  # a PEFT LoRA dir: what --overwrite may replace


def fingerprint(model_dir) -> str:
    """sha256 of a model checkpoint's weights file."""
    h = hashlib.sha256()
    with open(os.path.join(model_dir, WEIGHTS_NAME), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def save_adapter(directory, adapter_sd, *, r, alpha, dropout, targets, train_bias, base_config: GPT2Config,
                 base_checkpoint=None, overwrite=True, train_embeddings=False):
    config = {
        "format": FORMAT, "r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets),
        "train_bias": train_bias, "train_embeddings": bool(train_embeddings), "base_config": dict(base_config.__dict__),
        "base_checkpoint": os.path.abspath(base_checkpoint) if base_checkpoint else None,
        "base_fingerprint": fingerprint(base_checkpoint) if base_checkpoint else None,
    }
    return write_tensors_and_config(directory, adapter_sd, ADAPTER_WEIGHTS, config, ADAPTER_CONFIG, overwrite)


def load_adapter_config(directory) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        model = os.path.isfile(os.path.join(directory, "model.safetensors"))
        raise CheckpointError(training_dir_hint(directory) or
                              f"{directory}: no {ADAPTER_CONFIG}; a LoRA adapter is a directory written by "
                              "finetune_lora.py" + ("; this one holds a model, not an adapter" if model else ""))
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a miniGPT LoRA adapter config (format is not {FORMAT!r})")
    return config


def check_base(adapter_config, base_dir, base_config: GPT2Config, check_fingerprint=True):
    """Refuse a base model the adapter was not trained on: other shapes, or other weights."""
    saved = adapter_config["base_config"]
    diff = [f"{k}: adapter's base {saved[k]} vs {getattr(base_config, k)}"
            for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple")
            if saved.get(k) != getattr(base_config, k)]
    if diff:
        raise CheckpointError(f"base model {base_dir} does not match the adapter's base: " + "; ".join(diff))
    expected = adapter_config.get("base_fingerprint")
    if check_fingerprint and expected:
        actual = fingerprint(base_dir)
        if actual != expected:
            raise CheckpointError(f"base model {base_dir} has other weights than the one the adapter was trained on "
                                  f"({adapter_config.get('base_checkpoint')}): "
                                  f"sha256 {actual[:12]}… vs {expected[:12]}…")


def attach_adapter(model, adapter_dir, base_dir=None, check_fingerprint=True):
    """Wrap `model` with the adapter's LoRA layers and load its weights (no merge). Returns (model, config)."""
    config = load_adapter_config(adapter_dir)
    if base_dir is not None:
        check_base(config, base_dir, model.config, check_fingerprint)
    apply_lora(model, config["r"], config["alpha"], config["dropout"], config["targets"])
    sd = read_safetensors(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    train_embeddings = config.get("train_embeddings", False)  # absent in adapters written before it existed
    expected = {k for k in model.state_dict() if ".lora_A." in k or ".lora_B." in k}
    if train_embeddings:
        expected.add(EMBEDDING_KEY)
    missing = sorted(expected - set(sd))
    unexpected = sorted(k for k in set(sd) - expected if not k.endswith(".bias"))
    if missing or unexpected:
        raise CheckpointError(f"{adapter_dir}: adapter weights do not fit its config: "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(sd, strict=False)
    mark_only_lora_trainable(model, config["train_bias"], train_embeddings)
    assert lora_modules(model)
    return model, config


def merge_adapter(base_dir, adapter_dir, check_fingerprint=True):
    """Base model checkpoint + adapter -> a plain GPT2LMHeadModel with the update folded into its weights."""
    from models.gpt2 import GPT2LMHeadModel
    from models.lora import merged_state_dict
    from utils.checkpoints.model import load_model
    model, config = attach_adapter(load_model(base_dir), adapter_dir, base_dir, check_fingerprint)
    merged = GPT2LMHeadModel(model.config)
    merged.load_state_dict(merged_state_dict(model))
    return merged, config


def export_peft(adapter_dir, output_dir, overwrite=False):
    """Write the adapter in HF PEFT's layout (adapter_model.safetensors + adapter_config.json) for a
    transformers GPT2LMHeadModel: `PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), output_dir)`.

    PEFT adapts whole modules, so q/k/v slices of the fused c_attn become one c_attn adapter of rank
    r * (number of slices) whose B is block-diagonal over the slices; its alpha is scaled to keep
    alpha / r, so the update is identical.
    """
    import torch
    from peft import LoraConfig

    from models.lora import SLICE_NAMES, TARGETS
    config = load_adapter_config(adapter_dir)
    if config.get("train_embeddings"):
        # PEFT's modules_to_save would copy wte and leave GPT-2's tied lm_head on the old one.
        raise CheckpointError(f"{adapter_dir} trained the token embeddings (tied to the LM head), which a PEFT "
                              "adapter cannot carry for GPT-2; merge it instead (--base BASE_DIR without --to_peft) "
                              "and export the merged model with convert_hf_checkpoint.py --to_hf")
    sd = read_safetensors(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    r, alpha, C = config["r"], config["alpha"], config["base_config"]["n_embd"]
    slices = [t for t in config["targets"] if t in SLICE_NAMES]
    whole = [t for t in config["targets"] if t not in SLICE_NAMES]
    out, prefix = {}, "base_model.model."
    for i in range(config["base_config"]["n_layer"]):
        block = f"transformer.h.{i}."
        if slices:
            name = block + "attn.c_attn"
            a = torch.cat([sd[f"{name}.lora_A.{s}"] for s in slices], dim=0)  # (R, C)
            b = torch.zeros(3 * C, r * len(slices))
            for j, s in enumerate(slices):
                row = SLICE_NAMES.index(s) * C
                b[row:row + C, j * r:(j + 1) * r] = sd[f"{name}.lora_B.{s}"]
            out[f"{prefix}{name}.lora_A.weight"], out[f"{prefix}{name}.lora_B.weight"] = a, b
        for t in whole:
            name = block + TARGETS[t][0]
            out[f"{prefix}{name}.lora_A.weight"] = sd[f"{name}.lora_A.w"]
            out[f"{prefix}{name}.lora_B.weight"] = sd[f"{name}.lora_B.w"]
        for k, v in sd.items():
            if k.startswith(block) and k.endswith(".bias"):  # trained biases (PEFT's bias="lora_only")
                out[prefix + k[: -len(".bias")] + ".base_layer.bias"] = v
    modules = (["attn.c_attn"] if slices else []) + [TARGETS[t][0] for t in whole]
    rank_pattern = {"attn.c_attn": r * len(slices)} if len(slices) > 1 else {}
    alpha_pattern = {"attn.c_attn": alpha * len(slices)} if len(slices) > 1 else {}
    peft_config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=config["dropout"], target_modules=modules, fan_in_fan_out=True,
        bias="lora_only" if config["train_bias"] else "none", task_type="CAUSAL_LM",
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        base_model_name_or_path=config.get("base_checkpoint"), inference_mode=True,
    )
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(tmp, "adapter_model.safetensors"))
        peft_config.save_pretrained(tmp)
    return output_dir
