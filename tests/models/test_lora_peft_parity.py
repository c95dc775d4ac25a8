"""Our LoRA trains exactly like HF PEFT's: same base, batches, AdamW, learning rates and initial A/B.

The reference is PEFT's LoraConfig on a transformers GPT2LMHeadModel (Conv1D layers, so
fan_in_fan_out=True), with weight decay grouped as the HF Trainer groups it (every parameter but
biases and LayerNorms). Ours is models/lora.py with finetune_lora.py's optimizer (build_optimizer)
and loss normalisation (sum over the accumulation window / its target tokens).
"""
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from configs.finetune_lora import FinetuneLoRAConfig
from custom_dataset import FinetuneLoader
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.lora import apply_lora, mark_only_lora_trainable, merged_state_dict
from utils.checkpoints.hf_mapping import config_to_hf, ours_to_hf
from utils.training.optim import build_optimizer, lr_at

peft = pytest.importorskip("peft")

TARGETS = ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")
STEPS, ACCUM = 30, 2


def peft_optimizer(model, cfg):
    """AdamW with the HF Trainer's weight-decay groups (Trainer.get_decay_parameter_names)."""
    decay_names = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay_names], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.max_lr, betas=tuple(cfg.adamw_betas),
                             eps=cfg.adamw_eps)


def copy_lora_init(ours, peft_model):
    """PEFT's lora_A / lora_B are nn.Linear (weights (r, in) and (out, r)) on Conv1D layers too: no transpose."""
    theirs = peft_model.state_dict()
    n = 0
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                module, ab, _ = name.rsplit(".", 2)  # transformer.h.0.mlp.c_fc, lora_A, w
                theirs[f"base_model.model.{module}.{ab}.default.weight"].copy_(p)
                n += 1
    assert n == 2 * len(TARGETS) * ours.config.n_layer


def train_step(model, batches, forward):
    """One optimizer step's forward/backward over the accumulation window; returns the window's mean loss."""
    n_tokens = sum(int((y != -100).sum()) for _, y in batches)
    total = 0.0
    for x, y in batches:
        loss_sum = forward(model, x, y)
        (loss_sum / n_tokens).backward()
        total += loss_sum.item()
    return total / n_tokens


def ours_forward(model, x, y):
    return model(x, targets=y, reduction="sum", return_logits=False)[1]  # as the trainer calls it


def hf_forward(model, x, y):
    logits = model(input_ids=x).logits  # (B, T, V); y is already shifted (labels of the next token)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100, reduction="sum")


def test_lora_trains_like_peft(tmp_path, write_finetune_data, r=4, alpha=24.0):  # scaling alpha / r = 6
    # Weight decay on (the LoRA default is 0) so that its grouping is compared too.
    cfg = FinetuneLoRAConfig(lora_r=r, lora_alpha=alpha, lora_dropout=0.0, lora_targets=TARGETS, max_lr=1e-2,
                             min_lr=1e-3, warmup_steps=3, weight_decay=0.1)
    data = write_finetune_data(tmp_path / "sft", n_train=64, n_val=8)
    torch.manual_seed(0)
    config = GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64)
    base_sd = GPT2LMHeadModel(config).state_dict()

    ours = GPT2LMHeadModel(config)
    ours.load_state_dict(base_sd)
    apply_lora(ours, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    mark_only_lora_trainable(ours)

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config)))
    hf.load_state_dict(ours_to_hf(base_sd, config), strict=False)  # strict=False: HF's attention-mask buffers
    lora_config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                                  fan_in_fan_out=True, bias="none")
    theirs = peft.get_peft_model(hf, lora_config)
    copy_lora_init(ours, theirs)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)

    opt_ours = build_optimizer(ours, cfg, torch.device("cpu"))
    opt_theirs = peft_optimizer(theirs, cfg)
    loader = FinetuneLoader(data / "train.jsonl", 4, ACCUM, seed=cfg.seed, max_seq_length=64)
    ours.train()
    theirs.train()
    losses = []
    for step in range(STEPS):
        lr = lr_at(step, cfg.init_lr, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, STEPS)
        batches = [loader.next_batch() for _ in range(ACCUM)]
        pair = []
        for model, opt, forward in ((ours, opt_ours, ours_forward), (theirs, opt_theirs, hf_forward)):
            for group in opt.param_groups:
                group["lr"] = lr
            pair.append(train_step(model, batches, forward))
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(pair)
    for step, (a, b) in enumerate(losses, 1):
        assert abs(a - b) <= 1e-4, f"step {step}: ours {a:.6f} vs PEFT {b:.6f}"
    assert losses[-1][0] < losses[0][0] - 1.0  # it learned: the comparison is not between two frozen models

    # Merged weights: ours folded by merged_state_dict, PEFT's by merge_and_unload, in HF layout.
    mine = ours_to_hf(merged_state_dict(ours), config)
    merged = theirs.merge_and_unload().state_dict()
    for name, w in mine.items():
        assert torch.allclose(w, merged[name], rtol=0, atol=1e-5), name
    changed = [n for n in mine if not torch.equal(mine[n], ours_to_hf(base_sd, config)[n])]
    assert len(changed) == len(TARGETS) * config.n_layer  # exactly the adapted weights moved
