"""Pretrain GPT-2 from scratch on one or several built datasets (FSDP2 under torchrun).

    torchrun --standalone --nproc_per_node 8 pretrain.py --model_type=gpt2 --data_dir=data/built
    python pretrain.py --help          # every field of configs/pretrain.py
"""
import torch

from configs.parser import load_config
from configs.pretrain import PretrainConfig
from custom_dataset import PretrainLoader, check_pretrain_dir
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.checkpoints.model import save_model
from utils.training.trainer import TrainTask, train


def main(argv=None):
    cfg = load_config(PretrainConfig, argv, prog="pretrain.py", description=__doc__)

    def model_config():
        return GPT2Config.from_preset(cfg.model_type, embed_dropout=cfg.embed_dropout, attn_dropout=cfg.attn_dropout,
                                      resid_dropout=cfg.resid_dropout, pad_vocab_multiple=cfg.pad_vocab_multiple)

    def check_data():
        for data_dir, _ in cfg.sources():
            for split in ("train", "val"):  # before anything is created: a cut-short file is refused at once
                check_pretrain_dir(data_dir, split)

    def make_loader(split, info):
        return PretrainLoader(cfg.sources(), split, cfg.max_seq_length, cfg.micro_batch_size,
                              cfg.gradient_accum_steps if split == "train" else 1,
                              rank=info.rank, world_size=info.world_size, seed=cfg.seed, doc_mask=cfg.doc_mask)

    def save_final(state_dict, model, directory):
        save_model(model, directory, state_dict=state_dict)

    def build_model(device):
        with torch.device(device):  # on "meta" the init is skipped: rank 0 sends the weights
            return GPT2LMHeadModel(model_config())

    task = TrainTask("pretrain", model_config=model_config, build_model=build_model,
                     make_loader=make_loader, save_final=save_final, check_data=check_data)
    return train(cfg, task, prog="pretrain.py")


if __name__ == "__main__":
    main()
