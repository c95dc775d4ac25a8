import json
import os

import pytest
import torch

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.checkpoints.model import CheckpointError, load_model, save_model


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64))
    save_model(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left behind
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    idx = torch.randint(0, 50257, (1, 9))
    assert torch.equal(model.eval()(idx)[0], loaded.eval()(idx)[0])


def test_mismatch_names_keys_and_fields(tmp_path):
    small = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny"))
    save_model(small, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="n_layer: checkpoint 2 vs requested 3"):
        load_model(tmp_path / "ckpt", config=GPT2Config.from_preset("gpt2-tiny", n_layer=3))
    # A config that lies about the weights: the error names the offending keys and shapes.
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["n_layer"], cfg["n_embd"] = 3, 64
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys \['transformer.h.2.attn.c_attn.bias'.*"
                                              r"shape mismatch transformer.h.0.attn.c_attn.bias: \(384,\)"):
        load_model(tmp_path / "ckpt")


def test_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="convert_hf_checkpoint.py"):
        load_model(tmp_path / "hf")


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny"))
    save_model(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model, tmp_path / "ckpt", overwrite=False)
    save_model(model, tmp_path / "ckpt", overwrite=True)
