r"""LoRA fine-tuning: the base model frozen (and sharded by FSDP2 under torchrun), only the
low-rank factors trained, saved as an adapter (adapter.safetensors + adapter_config.json).

    torchrun --standalone --nproc_per_node 2 finetune_lora.py --pretrained_ckpt=checkpoints/gpt2 \
        --data_dir=data/sft_built
    python finetune_lora.py --help     # every field of configs/finetune_lora.py
Merge into a plain model with convert_lora_checkpoint.py.
"""
import os

from configs.finetune_lora import FinetuneLoRAConfig
from configs.parser import load_config
from models.lora import apply_lora, mark_only_lora_trainable
from utils.checkpoints.adapter import save_adapter
from utils.checkpoints.model import load_config as load_checkpoint_config
from utils.training.finetuning import check_finetune_data, finetune_loader, finetune_steps, load_pretrained
from utils.training.trainer import TrainTask, train


def main(argv=None):
    cfg = load_config(FinetuneLoRAConfig, argv, prog="finetune_lora.py", description=__doc__)

    def build_model(device):
        model = load_pretrained(cfg, device)
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        return mark_only_lora_trainable(model, cfg.train_bias, cfg.train_embeddings)

    def save_final(state_dict, model, directory):
        # state_dict holds only the trainable tensors: frozen ones are skipped when gathering.
        save_adapter(directory, state_dict, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     targets=cfg.lora_targets, train_bias=cfg.train_bias, base_config=model.config,
                     base_checkpoint=cfg.pretrained_ckpt, train_embeddings=cfg.train_embeddings)

    task = TrainTask("finetune_lora", model_config=lambda: load_checkpoint_config(cfg.pretrained_ckpt),
                     build_model=build_model, make_loader=lambda split, info: finetune_loader(cfg, split, info),
                     save_final=save_final, check_data=lambda: check_finetune_data(cfg),
                     total_steps=lambda loader: finetune_steps(cfg, loader), padded=True, ignore_frozen_params=True,
                     # Compared on resume: another r, alpha, targets or base would not continue this adapter.
                     extra_state={"lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets),
                                           "train_bias": cfg.train_bias, "train_embeddings": cfg.train_embeddings},
                                  "base": os.path.realpath(cfg.pretrained_ckpt)})
    return train(cfg, task, prog="finetune_lora.py")


if __name__ == "__main__":
    main()
