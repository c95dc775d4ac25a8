"""evaluate.py's model sources give the numbers of their equivalents: a LoRA adapter attached in memory
those of the merged checkpoint, an exported transformers dir those of the checkpoint it came from;
val_loss against a hand computation."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.lora import adapter_state_dict, apply_lora, lora_modules
from utils.checkpoint import load_model, save_model
from utils.checkpoints.adapter import merge_adapter, save_adapter
from utils.checkpoints.hf import export_to_hf
from utils.evaluation.run import val_loss
from utils.tokenizer import get_tokenizer

TASKS = "hellaswag:6,lambada:4"


def run(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    evaluate.main([*map(str, args), "--tasks", TASKS, "--output", str(out), "--device", "cpu"])
    return json.loads(out.read_text())["results"]


def close(a, b):
    return all(a[t][k] == pytest.approx(v, rel=1e-5) for t in a for k, v in b[t].items())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(11)
    save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny")), d / "base")
    return d


def test_lora_in_memory_equals_merged_checkpoint(base, tmp_path):
    torch.manual_seed(12)
    model = load_model(base / "base")
    apply_lora(model, 4, 16.0, 0.0, ("q", "v"))
    for m in lora_modules(model).values():
        for b in m.lora_B.values():
            torch.nn.init.normal_(b, std=0.5)  # a visible update
    save_adapter(tmp_path / "lora", adapter_state_dict(model), r=4, alpha=16.0, dropout=0.0, targets=("q", "v"),
                 train_bias=False, base_config=model.config, base_checkpoint=base / "base")
    merged, _ = merge_adapter(base / "base", tmp_path / "lora")
    save_model(merged, tmp_path / "merged")
    with_lora = run(tmp_path, "lora", "--checkpoint", base / "base", "--lora", tmp_path / "lora")
    assert close(with_lora, run(tmp_path, "merged", "--checkpoint", tmp_path / "merged"))
    without = run(tmp_path, "base", "--checkpoint", base / "base")
    assert without["lambada"]["perplexity"] != pytest.approx(with_lora["lambada"]["perplexity"], rel=1e-3)


def test_hf_dir_equals_its_checkpoint(base, tmp_path):
    export_to_hf(base / "base", tmp_path / "hf")
    assert close(run(tmp_path, "hf", "--hf_dir", tmp_path / "hf"), run(tmp_path, "ckpt", "--checkpoint", base / "base"))


def test_val_loss_and_bits_per_byte_by_hand(tmp_path, write_pretrain_data):
    write_pretrain_data(tmp_path / "data", n_docs=200)
    torch.manual_seed(13)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny")).eval()
    tokens = np.fromfile(tmp_path / "data" / "val.bin", dtype=np.uint16).astype(np.int64)
    T = model.config.block_size
    n = 3
    nll, n_tok, text = 0.0, 0, ""
    enc = get_tokenizer()
    for i in range(n):
        w = torch.from_numpy(tokens[i * T: i * T + T + 1])
        with torch.no_grad():
            logits, _ = model(w[None, :-1])
        nll += F.cross_entropy(logits[0], w[1:], reduction="sum").item()
        n_tok += T
        text += enc.decode(w[1:].tolist())
    r = val_loss(model, str(tmp_path / "data"), limit=n, batch_size=2)
    assert r["n"] == n and r["tokens"] == n_tok
    assert r["loss"] == pytest.approx(nll / n_tok, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-5)


def test_output_rules(base, tmp_path):
    """--output replaces its own earlier result, nothing else, and never a file inside the checkpoint."""
    from utils.errors import UserError
    other = tmp_path / "other.json"
    other.write_text('{"x": 1}')
    args = ["--checkpoint", str(base / "base"), "--tasks", "lambada:1", "--output"]
    with pytest.raises(UserError, match="not written by this script"):
        evaluate.main([*args, str(other)])
    with pytest.raises(UserError, match="inside the input"):
        evaluate.main([*args, str(base / "base" / "e.json")])
    run(tmp_path, "again", "--checkpoint", base / "base")
    assert run(tmp_path, "again", "--checkpoint", base / "base")["lambada"]["n"] == 4  # its own result: replaced
