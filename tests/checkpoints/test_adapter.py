"""LoRA: merge exactness, parameter counts, frozen base, adapter files, PEFT export."""
import subprocess
import sys

import pytest
import torch
import transformers

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.lora import (
    adapter_state_dict,
    apply_lora,
    lora_modules,
    lora_param_count,
    mark_only_lora_trainable,
    merged_state_dict,
)
from utils.checkpoints.adapter import attach_adapter, export_peft, merge_adapter, save_adapter
from utils.checkpoints.hf_mapping import config_to_hf, ours_to_hf
from utils.checkpoints.model import CheckpointError, load_model, save_model

TARGET_SETS = [("q", "v"), ("q", "k", "v"), ("k",), ("attn.c_proj",), ("mlp.c_fc", "mlp.c_proj"),
               ("q", "k", "v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def lora_model(targets, r=4, alpha=24.0, seed=0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64))
    apply_lora(model, r, alpha, 0.0, targets)
    for m in lora_modules(model).values():  # B starts at zero; give it values so the update is visible
        for b in m.lora_B.values():
            torch.nn.init.normal_(b, std=0.05)
    return model.eval()


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_merged_logits_equal_adapter_logits(targets):
    model = lora_model(targets)  # alpha 24 != r 4
    merged = GPT2LMHeadModel(model.config).eval()
    merged.load_state_dict(merged_state_dict(model))
    base = GPT2LMHeadModel(model.config).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        adapted, folded, plain = model(idx)[0], merged(idx)[0], base(idx)[0]
    assert (adapted - folded).abs().max().item() <= 1e-5
    assert (adapted - plain).abs().max().item() > 1e-3  # the update really does something


@pytest.mark.parametrize("targets", TARGET_SETS)
@pytest.mark.parametrize("r", [1, 8])
def test_trainable_count_is_closed_form(targets, r):
    model = mark_only_lora_trainable(lora_model(targets, r=r))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    C, L = 128, 2
    per = {"q": 2 * C, "k": 2 * C, "v": 2 * C, "attn.c_proj": 2 * C, "mlp.c_fc": 5 * C, "mlp.c_proj": 5 * C}
    assert n == lora_param_count(model.config, r, targets) == L * r * sum(per[t] for t in targets)


def test_training_changes_only_lora_and_optimizer_holds_only_lora():
    from types import SimpleNamespace

    from utils.training.trainer import build_optimizer
    model = mark_only_lora_trainable(lora_model(("q", "v")).train())
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = adapter_state_dict(model)
    cfg = SimpleNamespace(weight_decay=0.1, max_lr=1e-2, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    idx = torch.randint(0, 50257, (2, 16))
    for _ in range(3):
        _, loss = model(idx, targets=idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen_before[k]), k  # bit-identical, weight decay included
    assert any(not torch.equal(v, lora_before[k]) for k, v in adapter_state_dict(model).items())
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert state_numel == 2 * lora_param_count(model.config, 4, ("q", "v"))  # exp_avg + exp_avg_sq, LoRA only


def make_adapter(tmp_path, targets=("q", "v"), train_bias=False):
    model = lora_model(targets)
    base = GPT2LMHeadModel(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    save_model(base, tmp_path / "base")
    save_adapter(tmp_path / "adapter", adapter_state_dict(model, train_bias), r=4, alpha=24.0, dropout=0.0,
                 targets=targets, train_bias=train_bias, base_config=model.config, base_checkpoint=tmp_path / "base")
    return model


def test_adapter_round_trip_and_merge_cli(tmp_path):
    model = make_adapter(tmp_path)
    attached, config = attach_adapter(load_model(tmp_path / "base"), tmp_path / "adapter", tmp_path / "base")
    assert (config["r"], config["alpha"], config["targets"]) == (4, 24.0, ["q", "v"])
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert torch.equal(attached.eval()(idx)[0], model(idx)[0])
    out = subprocess.run([sys.executable, "convert_lora_checkpoint.py", "--base", str(tmp_path / "base"), "--lora",
                          str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    merged = load_model(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(idx)[0] - model(idx)[0]).abs().max().item() <= 1e-5
    again = subprocess.run([sys.executable, "convert_lora_checkpoint.py", "--base", str(tmp_path / "base"), "--lora",
                            str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "already exists; pass --overwrite" in again.stderr


def test_merge_refuses_another_base(tmp_path):
    make_adapter(tmp_path)
    other = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64))  # same shapes, other weights
    save_model(other, tmp_path / "other")
    with pytest.raises(CheckpointError, match="other weights than the one the adapter was trained on"):
        merge_adapter(tmp_path / "other", tmp_path / "adapter")
    bigger = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", n_layer=3, pad_vocab_multiple=64))
    save_model(bigger, tmp_path / "bigger")
    out = subprocess.run([sys.executable, "convert_lora_checkpoint.py", "--base", str(tmp_path / "bigger"), "--lora",
                          str(tmp_path / "adapter"), "--output", str(tmp_path / "m")], capture_output=True, text=True)
    assert out.returncode != 0 and "n_layer: adapter's base 2 vs 3" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("targets, train_bias", [(("q", "v"), False), (("k", "attn.c_proj", "mlp.c_fc"), True)])
def test_peft_export_matches(tmp_path, targets, train_bias):
    from peft import PeftModel
    model = make_adapter(tmp_path, targets, train_bias)
    if train_bias:  # make trained biases visible too
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.bias.add_(0.1)
        save_adapter(tmp_path / "adapter", adapter_state_dict(model, True), r=4, alpha=24.0, dropout=0.0,
                     targets=targets, train_bias=True, base_config=model.config, overwrite=True)
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(model.config)))
    base_sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    if train_bias:  # PEFT stores trained biases in the adapter; start the HF base from the untrained ones
        base_sd = load_model(tmp_path / "base").state_dict()
    hf.load_state_dict(ours_to_hf(base_sd, model.config), strict=False)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (peft_model(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4


def test_train_embeddings_trains_saves_and_merges_the_tied_embeddings(tmp_path):
    from types import SimpleNamespace

    from utils.training.trainer import build_optimizer
    model = mark_only_lora_trainable(lora_model(("q", "v")).train(), train_embeddings=True)
    base = GPT2LMHeadModel(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    save_model(base, tmp_path / "base")
    wte_before = model.transformer.wte.weight.detach().clone()
    cfg = SimpleNamespace(weight_decay=0.0, max_lr=1e-2, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    idx = torch.randint(0, 50257, (2, 16))
    for _ in range(2):
        model(idx, targets=idx)[1].backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.transformer.wte.weight, wte_before)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied: the LM head trained with it
    assert not model.transformer.wpe.weight.requires_grad and not model.transformer.h[0].mlp.c_fc.weight.requires_grad

    sd = adapter_state_dict(model, train_embeddings=True)
    assert "transformer.wte.weight" in sd and "lm_head.weight" not in sd
    save_adapter(tmp_path / "adapter", sd, r=4, alpha=24.0, dropout=0.0, targets=("q", "v"), train_bias=False,
                 base_config=model.config, base_checkpoint=tmp_path / "base", train_embeddings=True)
    model.eval()
    attached, config = attach_adapter(load_model(tmp_path / "base"), tmp_path / "adapter", tmp_path / "base")
    assert config["train_embeddings"] and attached.transformer.wte.weight.requires_grad
    merged, _ = merge_adapter(tmp_path / "base", tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(attached.eval()(idx)[0], model(idx)[0])
        assert (merged.eval()(idx)[0] - model(idx)[0]).abs().max().item() <= 1e-5
    with pytest.raises(CheckpointError, match="merge it instead"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")
    # An adapter config that says the embeddings were trained but lacks them is refused.
    save_adapter(tmp_path / "broken", adapter_state_dict(model), r=4, alpha=24.0, dropout=0.0, targets=("q", "v"),
                 train_bias=False, base_config=model.config, base_checkpoint=tmp_path / "base", train_embeddings=True)
    with pytest.raises(CheckpointError, match="missing"):
        attach_adapter(load_model(tmp_path / "base"), tmp_path / "broken")
