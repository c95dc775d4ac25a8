"""Fully fine-tune a model checkpoint on prompt/completion data (completion-only loss, FSDP2).

    torchrun --standalone --nproc_per_node 8 finetune.py --pretrained_ckpt=checkpoints/gpt2 --data_dir=data/sft_built
    python finetune.py --help          # every field of configs/finetune.py
"""
from configs.finetune import FinetuneConfig
from configs.parser import load_config
from utils.checkpoints.model import load_config as load_checkpoint_config
from utils.training.finetuning import (
    check_finetune_data,
    finetune_loader,
    finetune_steps,
    load_pretrained,
    save_full_model,
)
from utils.training.trainer import TrainTask, train


def main(argv=None):
    cfg = load_config(FinetuneConfig, argv, prog="finetune.py", description=__doc__)
    task = TrainTask("finetune", model_config=lambda: load_checkpoint_config(cfg.pretrained_ckpt),
                     build_model=lambda device: load_pretrained(cfg, device),
                     make_loader=lambda split, info: finetune_loader(cfg, split, info),
                     save_final=save_full_model, check_data=lambda: check_finetune_data(cfg),
                     total_steps=lambda loader: finetune_steps(cfg, loader), padded=True)
    return train(cfg, task, prog="finetune.py")


if __name__ == "__main__":
    main()
