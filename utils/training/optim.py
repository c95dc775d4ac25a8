"""AdamW and its learning rate: a pure function of the step, so resuming needs no scheduler state."""
import math

import torch


def lr_at(step: int, init_lr: float, max_lr: float, min_lr: float, warmup_steps: int, max_decay_steps: int) -> float:
    """LR of the optimizer step that follows `step` completed ones: linear warmup from init_lr that reaches
    max_lr on step `warmup_steps` (so even the first step learns: its LR is above init_lr), then cosine to
    min_lr at max_decay_steps."""
    if step < warmup_steps:
        return init_lr + (max_lr - init_lr) * (step + 1) / warmup_steps
    if step >= max_decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def build_optimizer(model, cfg, device):
    """AdamW; weight decay on >= 2-D weights (matmuls, embeddings) only, never on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused needs CUDA (or CPU plain tensors); FSDP2's DTensors on CPU take the foreach path.
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=tuple(cfg.adamw_betas), eps=cfg.adamw_eps, **kind)
