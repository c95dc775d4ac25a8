"""LoRA (Hu et al., 2021) for GPT2LMHeadModel, applied by functions to a plain model.

A targeted nn.Linear becomes a LoRALinear: the same `weight`/`bias` (same state-dict names, so a
base checkpoint loads unchanged) plus low-rank factors per output slice,

    y = x W^T + b + scaling * dropout(x) A^T B^T,   scaling = alpha / r,  A ~ kaiming-uniform, B = 0.

GPT-2 fuses q, k and v into one `c_attn` (out = 3 * n_embd); each of q, k, v is its own slice, so
the original's default "q and v" adapts two thirds of c_attn's output and leaves k alone.
The weights are never merged in place: `merged_state_dict` returns new tensors.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

# target name -> (module path inside a block, slice of the output it adapts: None = all of it)
TARGETS = {
    "q": ("attn.c_attn", 0),
    "k": ("attn.c_attn", 1),
    "v": ("attn.c_attn", 2),
    "attn.c_proj": ("attn.c_proj", None),
    "mlp.c_fc": ("mlp.c_fc", None),
    "mlp.c_proj": ("mlp.c_proj", None),
}
SLICE_NAMES = ("q", "k", "v")


def check_targets(targets):
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"lora_targets {list(targets)}: choose one or more of {', '.join(TARGETS)}")
    return targets


class LoRALinear(nn.Linear):
    """nn.Linear plus LoRA factors on some slices of its output (all of it when `slices` is None)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, slices=None, n_slices=1):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and values unchanged
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.slice_size = self.out_features // n_slices
        self.n_slices = n_slices
        # slice name -> index of the output slice; "w" adapts the whole output
        self.slices = {SLICE_NAMES[i]: i for i in sorted(slices)} if slices is not None else {"w": 0}
        dev = base.weight.device
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(r, self.in_features, device=dev))
                                        for n in self.slices})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(self.slice_size, r, device=dev))
                                        for n in self.slices})
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # adapter_disabled(): the base layer alone
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default init, as in the paper's code
        for b in self.lora_B.values():
            nn.init.zeros_(b)  # the adapted model starts exactly at the base model

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        h = self.lora_dropout(x)
        deltas = {n: F.linear(F.linear(h, self.lora_A[n]), self.lora_B[n]) * self.scaling for n in self.slices}
        if len(self.slices) == self.n_slices:  # every slice adapted (or a single, whole-output one)
            return out + torch.cat([deltas[n] for n in self.slices], dim=-1)
        parts = [deltas.get(SLICE_NAMES[i]) for i in range(self.n_slices)]
        zeros = out.new_zeros(()).expand(*out.shape[:-1], self.slice_size)
        return out + torch.cat([p if p is not None else zeros for p in parts], dim=-1)

    def delta_weight(self):
        """scaling * B @ A for the whole weight (zeros on slices without LoRA), a new tensor."""
        delta = torch.zeros_like(self.weight, dtype=torch.float32)
        for n, i in self.slices.items():
            rows = slice(i * self.slice_size, (i + 1) * self.slice_size)
            delta[rows] = (self.lora_B[n].float() @ self.lora_A[n].float()) * self.scaling
        return delta

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"slices={list(self.slices)}")


def apply_lora(model, r: int, alpha: float, dropout: float = 0.0, targets=("q", "v")):
    """Replace the targeted Linear layers of every block by LoRALinear, in place. Returns the model."""
    targets = check_targets(targets)
    if r < 1:
        raise ValueError(f"lora_r must be >= 1, got {r}")
    by_module = {}
    for t in targets:
        path, idx = TARGETS[t]
        by_module.setdefault(path, []).append(idx)
    for block in model.transformer.h:
        for path, idxs in by_module.items():
            parent_name, child_name = path.split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, child_name)
            slices = None if idxs == [None] else idxs
            setattr(parent, child_name, LoRALinear(base, r, alpha, dropout, slices=slices, n_slices=3 if slices else 1))
    return model


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapter_disabled(model):
    """Inside it, every LoRALinear computes its base layer alone: the model the adapter started from (DPO's
    reference, with no second copy in memory). Trained biases or embeddings are not undone."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False


EMBEDDING_KEY = "transformer.wte.weight"  # the token embeddings, tied to the LM head


def mark_only_lora_trainable(model, train_bias: bool = False, train_embeddings: bool = False):
    """Freeze everything but the LoRA factors (and, with train_bias, the biases of adapted layers).

    train_embeddings also trains the token embeddings, which are the LM head too (tied; PEFT's
    modules_to_save). A small base has pushed the logits of every token it never saw far down
    (each softmax step lowers them); an update of the blocks alone barely lifts them, so data
    full of such tokens (a new template, another vocabulary) needs the embeddings trained.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        for p in list(m.lora_A.values()) + list(m.lora_B.values()):
            p.requires_grad_(True)
        if train_bias and m.bias is not None:
            m.bias.requires_grad_(True)
    if train_embeddings:
        model.transformer.wte.weight.requires_grad_(True)
    return model


def is_adapter_key(name: str, train_bias: bool, lora_module_names, train_embeddings: bool = False) -> bool:
    if ".lora_A." in name or ".lora_B." in name:
        return True
    if train_embeddings and name == EMBEDDING_KEY:
        return True
    return train_bias and name.endswith(".bias") and name.rsplit(".", 1)[0] in lora_module_names


def adapter_state_dict(model, train_bias: bool = False, train_embeddings: bool = False):
    """The trainable part of a LoRA model: its factors (and trained biases, embeddings), detached CPU copies."""
    names = set(lora_modules(model))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if is_adapter_key(k, train_bias, names, train_embeddings)}


def lora_param_count(config, r: int, targets) -> int:
    """Closed form: per block, r * (fan_in + fan_out) for each adapted slice or layer."""
    C = config.n_embd
    per_target = {"q": 2 * C, "k": 2 * C, "v": 2 * C, "attn.c_proj": 2 * C,
                  "mlp.c_fc": C + 4 * C, "mlp.c_proj": 4 * C + C}
    return config.n_layer * r * sum(per_target[t] for t in check_targets(targets))


@torch.no_grad()
def merged_state_dict(model):
    """A plain GPT2LMHeadModel state dict with W + scaling * B @ A folded in. The model is untouched."""
    mods = lora_modules(model)
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        module_name, _, leaf = k.rpartition(".")
        if leaf == "weight" and module_name in mods:
            v = (v.float() + mods[module_name].delta_weight()).to(v.dtype)
        out[k] = v.detach().clone()
    return out
