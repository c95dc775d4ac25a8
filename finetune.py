"""Fully fine-tune a model checkpoint on prompt/completion data (completion-only loss, FSDP2).

    torchrun --standalone --nproc_per_node 8 finetune.py --pretrained_ckpt=checkpoints/gpt2 --data_dir=data/sft_built
    python finetune.py --help          # every field of configs/finetune.py
"""
import os

from configs.finetune import FinetuneConfig
from custom_dataset import FinetuneLoader
from models.gpt2 import GPT2Config
from utils.checkpoint import load_model, save_model
from utils.config import load_config
from utils.trainer import TrainTask, train


def load_pretrained(cfg):
    """The model checkpoint to start from, with this run's dropout; --model_type, if set, must match it."""
    expected = GPT2Config.from_preset(cfg.model_type) if cfg.model_type else None
    if expected is not None:  # compare shapes only: vocab padding is the checkpoint's business
        from utils.checkpoint import load_config as load_ckpt_config
        expected.pad_vocab_multiple = load_ckpt_config(cfg.pretrained_ckpt).pad_vocab_multiple
    return load_model(cfg.pretrained_ckpt, config=expected, embed_dropout=cfg.embed_dropout,
                      attn_dropout=cfg.attn_dropout, resid_dropout=cfg.resid_dropout)


def finetune_loader(cfg, split, info):
    return FinetuneLoader(os.path.join(cfg.data_dir, f"{split}.jsonl"), cfg.micro_batch_size,
                          cfg.gradient_accum_steps if split == "train" else 1, rank=info.rank,
                          world_size=info.world_size, seed=cfg.seed, max_seq_length=cfg.max_seq_length,
                          shuffle=split == "train")


def finetune_steps(cfg, loader):
    """num_epochs over the training set; max_train_iters, when set, caps it."""
    steps = cfg.num_epochs * loader.steps_per_epoch
    return min(steps, cfg.max_train_iters) if cfg.max_train_iters else steps


def main(argv=None):
    cfg = load_config(FinetuneConfig, argv, prog="finetune.py", description=__doc__)

    def save_final(state_dict, model, directory):
        save_model(model, directory, state_dict=state_dict)

    task = TrainTask("finetune", lambda: load_pretrained(cfg), lambda split, info: finetune_loader(cfg, split, info),
                     save_final, total_steps=lambda loader: finetune_steps(cfg, loader))
    return train(cfg, task, prog="finetune.py")


if __name__ == "__main__":
    main()
