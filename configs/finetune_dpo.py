"""Defaults for finetune_dpo.py: preference tuning (DPO) of a fine-tuned model, full or LoRA.

finetune_lora.py's fields, with lora_r = 0 meaning full DPO, plus DPO's own. TRL's DPOTrainer defaults where
they have one (beta 0.1, sigmoid loss, no dropout, learning rate 1e-6 for full DPO).
"""
from dataclasses import dataclass
from typing import ClassVar

from configs.finetune import FinetuneConfig
from configs.finetune_lora import FinetuneLoRAConfig


@dataclass
class FinetuneDPOConfig(FinetuneLoRAConfig):
    # the fields this script adds to its base's; a name in neither is refused (a likely typo)
    own_fields: ClassVar[tuple[str, ...]] = ("beta", "loss_type", "label_smoothing", "sft_weight", "precompute_ref")

    pretrained_ckpt: str = "checkpoints/finetune/final"  # the fine-tuned model to align (a model checkpoint dir)
    data_dir: str = "data/preference_built"  # build_finetune_datasets.py output of preference pairs
    beta: float = 0.1                    # strength of the pull towards the reference (DPO's beta; IPO's tau)
    loss_type: str = "sigmoid"           # sigmoid (DPO), ipo, hinge (SLiC)
    label_smoothing: float = 0.0         # sigmoid only: assumed rate of flipped preferences (conservative DPO)
    sft_weight: float = 0.0              # + this x the chosen answers' NLL per token (RPO; TRL's "sft" loss term)
    precompute_ref: bool = False         # reference log-probs computed once, before step 1 (kept in ckpt_dir)
    lora_r: int = 0                      # 0 = full DPO; >= 1 = LoRA, the reference being the adapter switched off
    lora_dropout: float = 0.0            # dropout is off in DPO (as TRL): step 1's loss is ln 2

    num_epochs: int = 1
    micro_batch_size: int = 4            # pairs per micro-batch (twice as many rows); --pack=true: packed rows
    gradient_accum_steps: int = 8
    max_lr: float = 1e-6
    min_lr: float = 1e-7
    warmup_steps: int = 10
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attn_dropout: float = 0.0
    eval_interval: int = 100
    eval_iters: int = 25
    ckpt_interval: int = 100
    log_dir: str = "runs/finetune_dpo"
    ckpt_dir: str = "checkpoints/finetune_dpo"

    def validate(self):
        from configs.parser import ConfigError
        from utils.training.dpo import LOSS_TYPES
        if self.lora_r:
            super().validate()
        else:
            FinetuneConfig.validate(self)
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.sft_weight < 0:
            raise ConfigError(f"--sft_weight must be >= 0, got {self.sft_weight}")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"--label_smoothing applies to --loss_type=sigmoid only (as in TRL), not "
                              f"{self.loss_type}")
        if self.lora_r < 0:
            raise ConfigError(f"--lora_r must be >= 0 (0 = full DPO), got {self.lora_r}")
        if self.lora_r and (self.train_bias or self.train_embeddings):
            raise ConfigError("--train_bias and --train_embeddings are not for DPO: the reference is the model with "
                              "its adapter switched off, which would still carry the trained biases/embeddings")
