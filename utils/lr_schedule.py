"""Learning rate as a pure function of the step, so resuming needs no scheduler state."""
import math


def lr_at(step: int, init_lr: float, max_lr: float, min_lr: float, warmup_steps: int, max_decay_steps: int) -> float:
    """Linear warmup from init_lr to max_lr over warmup_steps, then cosine to min_lr at max_decay_steps."""
    if step < warmup_steps:
        return init_lr + (max_lr - init_lr) * step / warmup_steps
    if step >= max_decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
