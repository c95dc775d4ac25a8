"""Fields shared by pretrain.py, finetune.py and finetune_lora.py.

Each script's module (configs/pretrain.py, ...) subclasses this and sets only the defaults that
differ from these.
Edit those files for lasting changes; override any field on the command line: --field=value.
"""
from dataclasses import dataclass


@dataclass
class TrainingConfig:
    # --- model ---
    model_type: str = "gpt2"             # preset in models/gpt2.py: gpt2, gpt2-medium/-large/-xl, gpt2-mini, gpt2-tiny
    max_seq_length: int = 0              # tokens per training sequence, at most the model's block_size; 0 = as many as
                                         # the model allows (fine-tuning: and the data was built for)
    embed_dropout: float = 0.0           # dropout on token + position embeddings
    attn_dropout: float = 0.0            # dropout on attention probabilities
    resid_dropout: float = 0.0           # dropout on the residual branches (attention and MLP outputs)
    pad_vocab_multiple: int = 64         # embedding rows rounded up to a multiple of this (speed; never sampled)

    # --- data ---
    data_dir: str = ""                   # one built dataset dir (shortcut for a one-source mixture)

    # --- batch ---
    micro_batch_size: int = 8            # sequences per rank per forward/backward
    gradient_accum_steps: int = 1        # micro-steps per optimizer step; global batch = micro * accum * world size
    global_batch_size: int = 0           # sequences per optimizer step; if > 0, sets gradient_accum_steps (must divide)

    # --- optimizer: AdamW, weight decay on >=2-D weights only ---
    max_train_iters: int = 1000          # optimizer steps
    weight_decay: float = 0.1
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8
    grad_clip: float = 1.0               # max global gradient norm; 0 disables clipping

    # --- learning rate: linear warmup init_lr -> max_lr, then cosine to min_lr ---
    init_lr: float = 0.0
    max_lr: float = 4e-4
    min_lr: float = 2e-5
    warmup_steps: int = 100
    max_decay_steps: int = 0             # step where the cosine reaches min_lr; 0 = max_train_iters

    # --- evaluation and logging ---
    eval_interval: int = 500             # evaluate every N steps (and at the end); 0 = only at the end
    eval_iters: int = 50                 # validation micro-batches per evaluation, shared by the ranks: the same
                                         # eval_iters x micro_batch_size sequences (at most the split) at any world size
    eval_tasks: str = ""                 # also score these at each evaluation, e.g. "hellaswag:500,piqa:200"
                                         # (task:N = its first N examples; tasks as in evaluate.py, val_loss aside)
    log_interval: int = 10               # one log line every N steps
    log_dir: str = "runs/train"          # TensorBoard event files

    # --- checkpoints ---
    ckpt_dir: str = "checkpoints/train"  # training checkpoints (step_00001000/, ...) and the final model in final/
    ckpt_interval: int = 500             # save a training checkpoint every N steps; 0 = only at the end
    keep_last_ckpts: int = 3             # older training checkpoints are deleted
    resume: str = ""                     # "auto" = newest complete checkpoint in ckpt_dir, a path, or "" = fresh run

    # --- performance ---
    device: str = "auto"                 # auto (cuda if available), cuda or cpu
    mixed_precision: bool | str = "auto"  # bf16 compute, fp32 master weights and gradient reduction; auto = where bf16
                                         # is fast (CUDA, CPUs with bf16 units), fp32 elsewhere; true/false force it
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    compile_model: bool = False          # torch.compile each transformer block
    cpu_offload: bool = False            # FSDP2 parameter/gradient offload to CPU (CUDA only)
    defer_grad_sync: bool | str = "auto"  # reduce-scatter gradients on the last micro-step only: less communication,
                                         # but every rank holds full unsharded fp32 gradients while accumulating;
                                         # auto = only with cpu_offload on CUDA (there each micro-step's sync is a
                                         # blocking copy to the host and a CPU add inside backward)
    cpu_threads: int = 0                 # CPU runs: threads per process; 0 = the process's share of the cores

    seed: int = 1337

    def resolve_batch(self, world_size: int):
        """Derive gradient_accum_steps from global_batch_size for this world size (if set)."""
        from configs.parser import ConfigError
        if self.global_batch_size:
            per_step = self.micro_batch_size * world_size
            if self.global_batch_size % per_step:
                raise ConfigError(f"--global_batch_size={self.global_batch_size} is not divisible by "
                                  f"micro_batch_size x world size = {self.micro_batch_size} x {world_size}; "
                                  "choose sizes that divide")
            self.gradient_accum_steps = self.global_batch_size // per_step

    def validate(self):
        from configs.parser import ConfigError
        positive = ["micro_batch_size", "gradient_accum_steps", "eval_iters", "log_interval", "keep_last_ckpts"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_seq_length", "max_train_iters", "eval_interval", "ckpt_interval", "warmup_steps",
                     "max_decay_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("embed_dropout", "attn_dropout", "resid_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not (0 <= self.min_lr <= self.max_lr and 0 <= self.init_lr <= self.max_lr):
            raise ConfigError(f"need 0 <= init_lr, min_lr <= max_lr; got init_lr={self.init_lr} "
                              f"max_lr={self.max_lr} min_lr={self.min_lr}")
        if self.global_batch_size < 0:
            raise ConfigError(f"--global_batch_size must be >= 0, got {self.global_batch_size}")
        if self.mixed_precision not in (True, False, "auto"):
            raise ConfigError(f"--mixed_precision must be auto, true or false, got {self.mixed_precision!r}")
        if self.defer_grad_sync not in (True, False, "auto"):
            raise ConfigError(f"--defer_grad_sync must be auto, true or false, got {self.defer_grad_sync!r}")
        if self.eval_tasks:
            from utils.errors import UserError
            from utils.evaluation.tasks import DOWNSTREAM, parse_tasks
            try:
                parse_tasks(self.eval_tasks, "--eval_tasks", DOWNSTREAM)
            except UserError as e:
                raise ConfigError(str(e)) from None
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        from models.gpt2 import PRESETS
        if self.model_type and self.model_type not in PRESETS:
            raise ConfigError(f"--model_type={self.model_type}: unknown preset; choose one of {', '.join(PRESETS)}")
