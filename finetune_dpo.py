"""Preference-tune (DPO) a fine-tuned model on chosen/rejected pairs, full or LoRA (FSDP2), as TRL computes it.

    torchrun --standalone --nproc_per_node 8 finetune_dpo.py --pretrained_ckpt=checkpoints/finetune/final \
        --data_dir=data/preference_built                      # full DPO, a frozen sharded reference
    python finetune_dpo.py --lora_r=8 --max_lr=5e-5 ...       # LoRA: the reference is the adapter switched off
    python finetune_dpo.py --help                             # every field of configs/finetune_dpo.py

Logs loss, rewards/{chosen,rejected,accuracies,margins} and logps/{chosen,rejected} (eval_ for validation).
Full DPO saves a model checkpoint in ckpt_dir/final; LoRA an adapter (merge it with convert_lora_checkpoint.py).
"""
import os

from configs.finetune_dpo import FinetuneDPOConfig
from configs.parser import load_config
from custom_dataset import PreferenceLoader
from models.lora import apply_lora, mark_only_lora_trainable
from utils.checkpoints.adapter import save_adapter
from utils.checkpoints.model import load_config as load_checkpoint_config
from utils.training.dpo import DPO
from utils.training.finetuning import check_finetune_data, finetune_steps, load_pretrained, save_full_model
from utils.training.trainer import TrainTask, train


def main(argv=None):
    cfg = load_config(FinetuneDPOConfig, argv, prog="finetune_dpo.py", description=__doc__)

    def build_model(device):
        model = load_pretrained(cfg, device)
        if cfg.lora_r:
            apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
            mark_only_lora_trainable(model)
        return model

    def make_loader(split, info):
        return PreferenceLoader(os.path.join(cfg.data_dir, f"{split}.jsonl"), cfg.micro_batch_size,
                                cfg.gradient_accum_steps if split == "train" else 1, rank=info.rank,
                                world_size=info.world_size, seed=cfg.seed, max_seq_length=cfg.max_seq_length,
                                shuffle=split == "train", pack=cfg.pack and split == "train")  # eval: by pair

    def save_final(state_dict, model, directory):
        if not cfg.lora_r:
            return save_full_model(state_dict, model, directory)
        save_adapter(directory, state_dict, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     targets=cfg.lora_targets, train_bias=False, base_config=model.config,
                     base_checkpoint=cfg.pretrained_ckpt, train_embeddings=False)

    dpo = DPO(cfg, lambda device: load_pretrained(cfg, device))
    # Compared on resume: another objective, reference or adapter would not continue this run.
    record = {"dpo": {"beta": cfg.beta, "loss_type": cfg.loss_type, "label_smoothing": cfg.label_smoothing,
                      "precompute_ref": cfg.precompute_ref},
              "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets)} if cfg.lora_r
              else None, "base": os.path.realpath(cfg.pretrained_ckpt)}
    task = TrainTask("finetune_dpo", model_config=lambda: load_checkpoint_config(cfg.pretrained_ckpt),
                     build_model=build_model, make_loader=make_loader, save_final=save_final,
                     check_data=lambda: check_finetune_data(cfg, kind="preference"),
                     total_steps=lambda loader: finetune_steps(cfg, loader), padded=True,
                     ignore_frozen_params=bool(cfg.lora_r), extra_state=record,
                     loss=dpo.loss, units=dpo.units, evaluate=dpo.evaluate, prepare=dpo.prepare)
    return train(cfg, task, prog="finetune_dpo.py")


if __name__ == "__main__":
    main()
