"""Defaults for pretrain.py: the original project's full-size run (GPT-2 XL, 1024 tokens).

For a laptop run use a small preset, e.g.
    python pretrain.py --model_type=gpt2-mini --max_seq_length=256 --data_dir=data/built ...
"""
from dataclasses import dataclass
from typing import ClassVar

from configs.training import TrainingConfig


@dataclass
class PretrainConfig(TrainingConfig):
    # the fields this script adds to its base's; a name in neither is refused (a likely typo)
    own_fields: ClassVar[tuple[str, ...]] = ("datasources", "doc_mask")

    model_type: str = "gpt2-xl"          # 1558M parameters
    # Mixture of built datasets as "dir:weight" pairs, e.g. the original's blend:
    # ("data/openwebtext2:0.6", "data/enwiki:0.3", "data/zhwiki:0.1"). Empty = data_dir alone.
    datasources: tuple[str, ...] = ()
    data_dir: str = "data/pretrain_built"
    # confine attention to each document of a window (<|endoftext|> opens the next one; positions restart there)
    doc_mask: bool = False

    gradient_accum_steps: int = 16       # per rank; 8 GPUs x 8 x 16 x 1024 = 1M tokens per step
    max_train_iters: int = 100_000

    warmup_steps: int = 2000
    max_decay_steps: int = 0             # 0: the cosine ends with the run (max_train_iters)

    eval_interval: int = 1000
    eval_iters: int = 100
    log_dir: str = "runs/pretrain"
    ckpt_dir: str = "checkpoints/pretrain"
    ckpt_interval: int = 1000

    def sources(self):
        """[(dir, weight), ...] from datasources, or data_dir alone."""
        from configs.parser import ConfigError
        if not self.datasources:
            return [(self.data_dir, 1.0)]
        out = []
        for item in self.datasources:
            path, sep, weight = item.rpartition(":")
            try:
                w = float(weight)
            except ValueError:
                w = -1
            if not sep or not path or w <= 0:
                raise ConfigError(f"--datasources entry {item!r} must look like DIR:WEIGHT with WEIGHT > 0")
            out.append((path, w))
        return out

    def validate(self):
        from configs.parser import ConfigError
        super().validate()
        if self.max_train_iters < 1:
            raise ConfigError(f"--max_train_iters must be >= 1, got {self.max_train_iters}")
        self.sources()
