"""Issue 16: the conversion scripts never write over their own input, and --overwrite replaces only a
directory of the kind they write."""

import pytest
import torch
import transformers

import convert_hf_checkpoint
import convert_lora_checkpoint
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.lora import adapter_state_dict, apply_lora
from utils.checkpoints.adapter import save_adapter
from utils.checkpoints.model import save_model
from utils.cli import run


def refused(module, prog, capsys, *argv):
    """The one-line error (exit code 2) of `prog argv`."""
    capsys.readouterr()  # what came before (transformers' progress bars)
    with pytest.raises(SystemExit) as e:
        run(prog, module.main, list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err.strip()


def test_convert_hf_never_writes_over_its_input(tmp_path, capsys, snapshot):
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)) \
        .save_pretrained(tmp_path / "hf")
    hf, prog = tmp_path / "hf", "convert_hf_checkpoint.py"
    before = snapshot(tmp_path)
    err = refused(convert_hf_checkpoint, prog, capsys, "--hf_dir", hf, "--output", hf, "--overwrite")
    assert f"--output {hf} is the input {hf}: writing it would replace the input" in err
    err = refused(convert_hf_checkpoint, prog, capsys, "--hf_dir", hf, "--output", tmp_path, "--overwrite")
    assert f"--output {tmp_path} holds the input {hf}" in err
    assert snapshot(tmp_path) == before  # before the fix, the first command replaced the HF model with ours

    ours = tmp_path / "ours"
    run(prog, convert_hf_checkpoint.main, ["--hf_dir", str(hf), "--output", str(ours)])
    run(prog, convert_hf_checkpoint.main, ["--hf_dir", str(hf), "--output", str(ours), "--overwrite"])  # its own: fine
    kept = snapshot(ours)
    err = refused(convert_hf_checkpoint, prog, capsys, "--to_hf", "--checkpoint", ours, "--output", ours, "--overwrite")
    assert f"--output {ours} is the input {ours}" in err
    for flags in ([], ["--overwrite"]):  # an HF export may replace an HF GPT-2 dir (its own output)
        run(prog, convert_hf_checkpoint.main, ["--to_hf", "--checkpoint", str(ours), "--output", str(tmp_path / "x"),
                                               *flags])
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "x").config.n_embd == 32
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    err = refused(convert_hf_checkpoint, prog, capsys, "--to_hf", "--checkpoint", ours, "--output", tmp_path / "other",
                  "--overwrite")
    assert "was not written by this script (it has no config.json of ours)" in err
    assert snapshot(ours) == kept and snapshot(tmp_path / "other") == {"notes.txt": b"mine"}


def test_convert_lora_never_writes_over_its_input(tmp_path, capsys, snapshot):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64))
    save_model(model, tmp_path / "base")
    apply_lora(model, 4, 8.0, 0.0, ("q", "v"))
    save_adapter(tmp_path / "adapter", adapter_state_dict(model, False), r=4, alpha=8.0, dropout=0.0,
                 targets=("q", "v"), train_bias=False, base_config=model.config, base_checkpoint=tmp_path / "base")
    base, adapter, prog = tmp_path / "base", tmp_path / "adapter", "convert_lora_checkpoint.py"
    before = snapshot(tmp_path)
    for argv in (["--base", base, "--lora", adapter, "--output", base],
                 ["--base", base, "--lora", adapter, "--output", adapter],
                 ["--lora", adapter, "--to_peft", "--output", adapter]):
        err = refused(convert_lora_checkpoint, prog, capsys, *argv, "--overwrite")
        assert f"--output {argv[-1]} is the input {argv[-1]}" in err
    assert snapshot(tmp_path) == before
