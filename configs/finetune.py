"""Defaults for finetune.py: full fine-tuning of a model checkpoint on prompt/completion data."""
from dataclasses import dataclass
from typing import ClassVar

from configs.training import TrainingConfig


@dataclass
class FinetuneConfig(TrainingConfig):
    # the fields this script adds to its base's; a name in neither is refused (a likely typo)
    own_fields: ClassVar[tuple[str, ...]] = ("pretrained_ckpt", "num_epochs", "pack")

    model_type: str = ""                 # empty = the checkpoint's; a preset name makes a mismatch an error
    pretrained_ckpt: str = "checkpoints/pretrain/final"  # model checkpoint dir (ours, or convert_hf_checkpoint.py's)
    data_dir: str = "data/finetune_built"  # build_finetune_datasets.py output: train.jsonl, val.jsonl
    num_epochs: int = 2                  # passes over the training set
    max_train_iters: int = 0             # 0 = num_epochs worth of steps; otherwise a cap
    # pack examples side by side into rows of max_seq_length tokens (best-fit decreasing, planned per epoch), each
    # attending only to itself with positions from 0: no compute on padding, the same losses (docs/packing.md)
    pack: bool = False

    micro_batch_size: int = 4
    gradient_accum_steps: int = 8
    weight_decay: float = 0.0

    max_lr: float = 3e-5
    min_lr: float = 3e-6
    warmup_steps: int = 100

    resid_dropout: float = 0.1
    embed_dropout: float = 0.1
    attn_dropout: float = 0.1

    eval_interval: int = 200
    eval_iters: int = 50
    log_dir: str = "runs/finetune"
    ckpt_dir: str = "checkpoints/finetune"
    ckpt_interval: int = 200

    def validate(self):
        from configs.parser import ConfigError
        super().validate()
        if self.num_epochs < 1:
            raise ConfigError(f"--num_epochs must be >= 1, got {self.num_epochs}")
