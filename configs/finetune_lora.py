"""Defaults for finetune_lora.py: finetune.py's fields plus the LoRA ones."""
from dataclasses import dataclass
from typing import ClassVar

from configs.finetune import FinetuneConfig


@dataclass
class FinetuneLoRAConfig(FinetuneConfig):
    # the fields this script adds to its base's; a name in neither is refused (a likely typo)
    own_fields: ClassVar[tuple[str, ...]] = (
        "lora_r", "lora_alpha", "lora_dropout",
        "lora_targets", "train_bias", "train_embeddings")

    lora_r: int = 8                      # rank of the update B @ A
    lora_alpha: float = 32.0             # the update is scaled by lora_alpha / lora_r (stored with the adapter)
    lora_dropout: float = 0.05           # dropout on the LoRA input
    # Layers to adapt, per block: any of q, k, v (slices of the fused attn.c_attn), attn.c_proj, mlp.c_fc, mlp.c_proj
    lora_targets: tuple[str, ...] = ("q", "v")
    train_bias: bool = False             # also train the biases of the adapted layers (stored in the adapter)
    # also train the token embeddings (= the tied LM head; stored in the adapter): for data full of tokens the
    # base never saw (a small base, a new vocabulary), whose logits a LoRA update of the blocks barely lifts
    train_embeddings: bool = False

    max_lr: float = 3e-4                 # LoRA takes a larger learning rate than full fine-tuning
    min_lr: float = 3e-5
    log_dir: str = "runs/finetune_lora"
    ckpt_dir: str = "checkpoints/finetune_lora"

    def validate(self):
        from configs.parser import ConfigError
        from models.lora import check_targets
        super().validate()
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"need lora_r >= 1, lora_alpha > 0, 0 <= lora_dropout < 1; got r={self.lora_r} "
                              f"alpha={self.lora_alpha} dropout={self.lora_dropout}")
        try:
            check_targets(self.lora_targets)
        except ValueError as e:
            raise ConfigError(f"--{e}") from None
