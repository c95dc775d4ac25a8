"""Import HF transformers GPT-2 checkpoints as miniGPT model checkpoints, and export back.

Import reads a `save_pretrained` directory (config.json + safetensors or pytorch_model.bin,
sharded or not) tensor by tensor; names and shapes are checked against our model on the meta
device before any weight is read, and at most one full fp32 copy of the weights is ever held
(gpt2-xl: 6.2 GB, not 12.4). Export writes what `transformers` expects, tokenizer included, so
`from_pretrained(dir)` works offline. The name/layout mapping itself is utils/checkpoints/hf_mapping.py.
"""
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.gpt2 import GPT2LMHeadModel
from utils.checkpoints.hf_mapping import (
    IGNORED_HF_SUFFIXES,
    HFConversionError,
    config_from_hf,
    config_to_hf,
    hf_to_ours,
    ours_to_hf,
)
from utils.checkpoints.model import MARK as MODEL_MARK
from utils.checkpoints.model import (
    WEIGHTS_NAME,
    CheckpointError,
    check_state_dict,
    load_config,
    open_safetensors,
    save_model,
)
from utils.files import OutputMark, atomic_dir, atomic_file, check_output
from utils.tokenizer import EOT_TOKEN, VOCAB_SIZE, vocab_files

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
EOT_TEXT = "<|endoftext|>"
HF_MARK = OutputMark("config.json", "model_type", "gpt2")  # a transformers GPT-2 dir: what --overwrite may replace
# Weight files of a save_pretrained dir, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------------------- import

def import_hf_dir(hf_dir, output, pad_vocab_multiple=1, overwrite=False):
    """Convert a local transformers GPT-2 directory into a model checkpoint at `output`."""
    check_output(output, overwrite, MODEL_MARK, [hf_dir])
    hf_config = _read_hf_config(hf_dir)
    config_from_hf(hf_config)  # unsupported variants fail here, before any weight file is opened
    with _open_weights(hf_dir) as tensors:
        model, sd = _convert(hf_config, tensors, hf_dir, pad_vocab_multiple)
    return save_model(model, output, overwrite=True, state_dict=sd)  # existence was checked above


def import_hf_model(name, output, pad_vocab_multiple=1, overwrite=False):
    """Convert OpenAI's GPT-2 by hub name through `transformers.from_pretrained` (network or HF cache)."""
    short = name.removeprefix("openai-community/")
    if short not in HUB_MODELS:
        raise HFConversionError(f"unknown --hf_model {name!r}: choose one of {', '.join(HUB_MODELS)} "
                                "(for another GPT-2, save_pretrained it and pass --hf_dir)")
    check_output(output, overwrite, MODEL_MARK)
    import transformers
    try:
        hf = transformers.GPT2LMHeadModel.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as e:  # hub/connection errors are OSErrors; offline misses are too
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFConversionError(f"could not load {name!r} with transformers: no network access and not in the "
                                f"Hugging Face cache? ({detail}); on a machine without internet, copy a "
                                "save_pretrained directory here and pass --hf_dir") from None
    hf_config = hf.config.to_dict()
    tensors = dict(hf.state_dict())
    del hf  # `tensors` is now the only owner: hf_to_ours frees each HF tensor once converted
    model, sd = _convert(hf_config, _InMemory(tensors), name, pad_vocab_multiple)
    return save_model(model, output, overwrite=True, state_dict=sd)


def _read_hf_config(hf_dir) -> dict:
    if not os.path.isdir(hf_dir):
        raise HFConversionError(f"--hf_dir {hf_dir}: not a directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise HFConversionError(f"{hf_dir}: no config.json; expected a transformers save_pretrained directory")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise HFConversionError(f"{path}: invalid JSON ({e})") from None
    if d.get("format") == "minigpt-gpt2":
        raise HFConversionError(f"{hf_dir} is already a miniGPT model checkpoint, not a transformers directory")
    if d.get("model_type") != "gpt2":
        raise HFConversionError(f"{hf_dir}: model_type is {d.get('model_type')!r}, not 'gpt2': only GPT-2 "
                                "checkpoints can be converted")
    _check_vocab(d.get("vocab_size", VOCAB_SIZE), hf_dir)
    import transformers
    # save_pretrained may leave out fields at their defaults: let transformers fill them in.
    return transformers.GPT2Config.from_dict(d).to_dict()


def _check_vocab(vocab_size, source):
    if vocab_size != VOCAB_SIZE:
        raise HFConversionError(f"{source}: vocab_size is {vocab_size}, not GPT-2's {VOCAB_SIZE}; "
                                "this repo's tokenizer is GPT-2's BPE, which would not fit")


def _convert(hf_config: dict, tensors, source, pad_vocab_multiple):
    """Checked (meta model, our state dict) from an HF config dict and lazily readable HF tensors."""
    config = config_from_hf(hf_config, pad_vocab_multiple=pad_vocab_multiple)  # model type and variant checks
    _check_vocab(config.vocab_size, source)
    if hf_config.get("tie_word_embeddings", True) is False:
        raise HFConversionError(f"{source}: tie_word_embeddings is false; GPT-2 ties lm_head to wte")
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    needed = [k for k in tensors.keys() if not k.endswith(IGNORED_HF_SUFFIXES) and k != "lm_head.weight"]
    # Names and shapes first, on meta tensors: a wrong checkpoint fails before reading gigabytes.
    meta = {k: torch.empty(tensors.shape(k), device="meta") for k in needed}
    try:
        check_state_dict(model, hf_to_ours(meta, config), source=f"{source} (HF GPT-2 weights)")
    except CheckpointError as e:
        raise HFConversionError(str(e).replace("keys", "tensors")) from None
    hf_sd = {}
    for k in needed:
        hf_sd[k] = tensors.pop(k).to(torch.float32)  # fp32 master weights, as training expects
    return model, hf_to_ours(hf_sd, config)  # pops as it converts: one copy at a time


class _InMemory:
    """A state dict behind the same interface as the file readers."""

    def __init__(self, sd):
        self.sd = sd

    def keys(self):
        return list(self.sd)

    def shape(self, key):
        return tuple(self.sd[key].shape)

    def pop(self, key):
        return self.sd.pop(key)


class _open_weights:
    """Context manager over the weight files of a save_pretrained dir: keys(), shape(k), pop(k)."""

    def __init__(self, hf_dir):
        self.hf_dir = hf_dir
        self.where = {}      # tensor name -> file
        self.handles = {}    # safetensors file -> open safe_open handle
        self.loaded = {}     # .bin file -> its (mmap'd) state dict

    def __enter__(self):
        found = [f for f in HF_WEIGHT_FILES if os.path.isfile(os.path.join(self.hf_dir, f))]
        if not found:
            have = ", ".join(sorted(os.listdir(self.hf_dir))) or "nothing"
            raise HFConversionError(f"{self.hf_dir}: no weights ({' / '.join(HF_WEIGHT_FILES)}); it holds {have}")
        name = found[0]
        path = os.path.join(self.hf_dir, name)
        if name.endswith(".index.json"):
            with open(path) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = [name]
        for fname in files:
            fpath = os.path.join(self.hf_dir, fname)
            if not os.path.isfile(fpath):
                raise HFConversionError(f"{self.hf_dir}: shard {fname} listed in {name} is missing")
            if fname.endswith(".safetensors"):
                try:
                    self.handles[fpath] = h = safe_open(fpath, framework="pt")
                except Exception as e:  # safetensors raises its own error type for corrupt headers
                    raise HFConversionError(f"{fpath}: not a readable safetensors file ({e})") from None
                keys = h.keys()
            else:
                self.loaded[fpath] = sd = _torch_load(fpath)
                keys = list(sd)
            self.where.update((k, fpath) for k in keys)
        return self

    def __exit__(self, *exc):
        self.handles.clear()
        self.loaded.clear()

    def keys(self):
        return list(self.where)

    def shape(self, key):
        path = self.where[key]
        if path in self.handles:
            return tuple(self.handles[path].get_slice(key).get_shape())
        return tuple(self.loaded[path][key].shape)

    def pop(self, key):
        path = self.where.pop(key)
        if path in self.handles:
            return self.handles[path].get_tensor(key)
        return self.loaded[path].pop(key)


def _torch_load(path):
    try:  # mmap: tensors are read from disk when touched, not all at once
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be mmap'd
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HFConversionError(f"{path}: not a loadable PyTorch state dict ({e})") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise HFConversionError(f"{path}: not a state dict of tensors")
    return sd


# ---------------------------------------------------------------------------------------- export

def export_to_hf(checkpoint, output, overwrite=False):
    """Write `checkpoint` (a miniGPT model checkpoint) as a transformers GPT-2 directory at `output`."""
    config = load_config(checkpoint)
    if config.vocab_size != VOCAB_SIZE:
        raise CheckpointError(f"{checkpoint}: vocab_size is {config.vocab_size}, not GPT-2's {VOCAB_SIZE}; "
                              "the exported tokenizer would not fit")
    weights = os.path.join(checkpoint, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{checkpoint}: no {WEIGHTS_NAME}")
    check_output(output, overwrite, HF_MARK, [checkpoint])
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    with open_safetensors(weights) as f, atomic_dir(output, overwrite=True) as tmp:
        check_state_dict(model, {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()},
                         source=weights)
        hf_sd = {}
        for k in f.keys():  # one tensor at a time: one copy of the weights in memory
            hf_sd.update(ours_to_hf({k: f.get_tensor(k)}, config))
        dtype = hf_sd["transformer.wte.weight"].dtype
        save_file(hf_sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del hf_sd
        _write_hf_config(config, dtype, tmp)
        write_hf_tokenizer(tmp, model_max_length=config.block_size)
    return output


def _write_hf_config(config, dtype, directory):
    import transformers
    hf_config = transformers.GPT2Config(**config_to_hf(config), dtype=str(dtype).removeprefix("torch."))
    hf_config.save_pretrained(directory)  # config.json
    gen = transformers.GenerationConfig(bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN)
    gen.save_pretrained(directory)  # generation_config.json


def write_hf_tokenizer(directory, model_max_length=1024):
    """GPT-2's tokenizer files as transformers reads them: vocab.json/merges.txt are OpenAI's files."""
    vocab_bpe, encoder_json = vocab_files()  # sha256-verified
    shutil.copyfile(encoder_json, os.path.join(directory, "vocab.json"))
    shutil.copyfile(vocab_bpe, os.path.join(directory, "merges.txt"))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
                        "add_prefix_space": False, "errors": "replace", **special}
    for name, content in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special)):
        with atomic_file(os.path.join(directory, name)) as f:
            json.dump(content, f, indent=2)

