"""HF transformers GPT-2 <-> miniGPT: config and state-dict mapping.

HF keeps GPT-2's TensorFlow layout: `Conv1D` projections whose weight is (in, out). Ours are
`nn.Linear` with (out, in), so those four weights per block are transposed. Names are otherwise
identical; `lm_head.weight` is tied to `transformer.wte.weight` on both sides.
"""
import torch

from models.gpt2 import GPT2Config
from utils.errors import UserError
from utils.tokenizer import EOT_TOKEN

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF buffers that older checkpoints carry; they are constants, not weights.
IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class HFConversionError(UserError, ValueError):
    pass


def config_from_hf(hf_config, pad_vocab_multiple: int = 1) -> GPT2Config:
    """GPT2Config from a transformers GPT2Config (object or dict); refuses what our model cannot express."""
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = c.get("model_type")
    if model_type != "gpt2":
        raise HFConversionError(f"model_type is {model_type!r}, not 'gpt2': only GPT-2 checkpoints can be converted")
    unsupported = []
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={c['activation_function']!r} (need gelu_new)")
    if c.get("n_inner") not in (None, 4 * c["n_embd"]):
        unsupported.append(f"n_inner={c['n_inner']} (need 4*n_embd)")
    for flag, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("reorder_and_upcast_attn", False)):
        if c.get(flag, want) != want:
            unsupported.append(f"{flag}={c[flag]}")
    if c.get("add_cross_attention"):
        unsupported.append("add_cross_attention=True")
    if unsupported:
        raise HFConversionError("unsupported GPT-2 variant: " + ", ".join(unsupported))
    return GPT2Config(
        vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=c["n_head"],
        n_embd=c["n_embd"], embed_dropout=c.get("embd_pdrop", 0.1), attn_dropout=c.get("attn_pdrop", 0.1),
        resid_dropout=c.get("resid_pdrop", 0.1), layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-5),
        pad_vocab_multiple=pad_vocab_multiple,
    )


def config_to_hf(config: GPT2Config) -> dict:
    """Keyword arguments for transformers.GPT2Config (vocab padding dropped)."""
    return dict(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_ctx=config.block_size,
        n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head, n_inner=None,
        activation_function="gelu_new", resid_pdrop=config.resid_dropout, embd_pdrop=config.embed_dropout,
        attn_pdrop=config.attn_dropout, layer_norm_epsilon=config.layer_norm_epsilon, initializer_range=0.02,
        bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN, tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def hf_to_ours(hf_sd: dict, config: GPT2Config) -> dict:
    """HF GPT2LMHeadModel (or GPT2Model) state dict -> ours, pops tensors from hf_sd as it goes."""
    out = {}
    for key in list(hf_sd):
        t = hf_sd.pop(key)
        if key.endswith(IGNORED_HF_SUFFIXES) or key == "lm_head.weight":
            continue
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out[name] = t.contiguous()
    wte = out.get("transformer.wte.weight")
    if wte is None:
        raise HFConversionError("no transformer.wte.weight in the HF state dict: not a GPT-2 checkpoint")
    if wte.size(0) != config.vocab_size:
        raise HFConversionError(f"wte has {wte.size(0)} rows but config.vocab_size is {config.vocab_size}")
    if config.padded_vocab_size != config.vocab_size:
        pad = wte.new_zeros(config.padded_vocab_size - config.vocab_size, wte.size(1))
        out["transformer.wte.weight"] = torch.cat([wte, pad])
    return out


def ours_to_hf(sd: dict, config: GPT2Config) -> dict:
    """Our state dict -> HF GPT2LMHeadModel's (Conv1D layout, vocab padding dropped, lm_head tied)."""
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            t = t[: config.vocab_size]
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out[name] = t.contiguous()
    return out
