"""What finetune.py and finetune_lora.py share: the starting model, the data, the step count."""
import json
import os
import sys

from custom_dataset import FinetuneLoader
from models.gpt2 import GPT2Config
from utils.checkpoints.model import load_config as load_checkpoint_config
from utils.checkpoints.model import load_model, save_model
from utils.data.kinds import not_built_hint
from utils.errors import UserError


def load_pretrained(cfg, device="cpu"):
    """The model checkpoint to start from, with this run's dropout; --model_type, if set, must match it.
    On device "meta": the same model without its weights (only the file's header is read)."""
    expected = None
    if cfg.model_type:  # compare shapes only: vocab padding is the checkpoint's business
        expected = GPT2Config.from_preset(cfg.model_type,
                                          pad_vocab_multiple=load_checkpoint_config(cfg.pretrained_ckpt).pad_vocab_multiple)
    return load_model(cfg.pretrained_ckpt, device=device, config=expected, embed_dropout=cfg.embed_dropout,
                      attn_dropout=cfg.attn_dropout, resid_dropout=cfg.resid_dropout)


def finetune_loader(cfg, split, info):
    """The train or val loader. --pack=true: packed rows; the val split then packs only the examples an
    evaluation reads unpacked (the first eval_iters x micro_batch_size), so its loss is the same."""
    limit = cfg.eval_iters * cfg.micro_batch_size if split == "val" and cfg.pack else None
    if cfg.pack and split == "train" and info.is_main and info.device.type == "cuda" and cfg.attn_dropout > 0:
        print(f"note: --pack=true with --attn_dropout={cfg.attn_dropout}: flex attention has no attention dropout, "
              "so packed rows attend one example at a time (slower); --attn_dropout=0 runs flex attention",
              file=sys.stderr, flush=True)
    return FinetuneLoader(os.path.join(cfg.data_dir, f"{split}.jsonl"), cfg.micro_batch_size,
                          cfg.gradient_accum_steps if split == "train" else 1, rank=info.rank,
                          world_size=info.world_size, seed=cfg.seed, max_seq_length=cfg.max_seq_length,
                          shuffle=split == "train", pack=cfg.pack, limit=limit)


def check_finetune_data(cfg, kind="plain"):
    """--data_dir must hold a built fine-tuning dataset of `kind` ("plain" prompt/completion, or "preference"
    pairs); returns the max_seq_len it was built for (or None)."""
    train = os.path.join(cfg.data_dir, "train.jsonl")
    if not os.path.isfile(train):
        raise FileNotFoundError(f"fine-tuning data {train} not found: {not_built_hint(cfg.data_dir, 'finetune')}")
    meta = os.path.join(cfg.data_dir, "meta.json")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            meta = json.load(f)
    else:  # hand-made (or older): its first line tells
        meta = {"kind": _first_line_kind(train)}
    found = meta.get("kind") or "plain"  # built before preference data existed: prompt/completion
    if found != kind:
        what = {"plain": "prompt/completion examples", "preference": "preference pairs"}
        use = "finetune_dpo.py" if found == "preference" else "finetune.py or finetune_lora.py"
        raise UserError(f"--data_dir={cfg.data_dir} holds {what[found]}, which are for {use}; this script needs "
                        f"{what[kind]} (build_finetune_datasets.py makes both)")
    return meta.get("max_seq_len")


def _first_line_kind(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return "preference" if '"chosen_ids"' in line else "plain"
    return None


def finetune_steps(cfg, loader):
    """num_epochs over the training set; max_train_iters, when set, caps it."""
    steps = cfg.num_epochs * loader.steps_per_epoch
    return min(steps, cfg.max_train_iters) if cfg.max_train_iters else steps


def save_full_model(state_dict, model, directory):
    save_model(model, directory, state_dict=state_dict)
