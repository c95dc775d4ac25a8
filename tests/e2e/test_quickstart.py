"""The quickstart chain at test size: every stage, as a user runs it, fits the next one."""
import json
import os
import subprocess
import sys

import torch

from utils.checkpoints.model import load_model


def run_quickstart(repo, out):
    return subprocess.run([sys.executable, os.path.join(repo, "quickstart.py"), "--size", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=repo)


def test_quickstart_tiny_end_to_end_and_rerun_skips(tmp_path, repo):
    out = tmp_path / "qs"
    first = run_quickstart(repo, out)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for n in range(1, 12):
        assert f"=== [{n}/11]" in first.stdout
    # Each stage left its product where the next one read it.
    assert (out / "pretrain_built" / "train.bin").stat().st_size > 0
    assert json.loads((out / "finetune_built" / "meta.json").read_text())["splits"]["train"]["examples"] > 100
    assert (out / "checkpoints" / "pretrain" / "final" / "model.safetensors").exists()
    adapter = json.loads((out / "checkpoints" / "lora" / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["alpha"] == 32.0
    # The answers come from the fine-tuned (merged) model, which differs from the pretrained one.
    assert f"generate_finetuned.py --checkpoint {out}/checkpoints/merged" in first.stdout
    pretrained, merged = load_model(out / "checkpoints/pretrain/final"), load_model(out / "checkpoints/merged")
    w = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(pretrained.state_dict()[w], merged.state_dict()[w])
    assert "transformers pipeline: 'Hello, how are you?' -> " in first.stdout
    # The answers stage asks questions from the fine-tuning data and unseen ones, and scores them.
    # (At tiny size the model answers nothing right; the laptop size reaches >= 0.8, see README.)
    summary = json.loads((out / "summary.json").read_text())
    answers = summary["answers"]
    assert answers["trained_n"] >= 10 and answers["unseen_n"] >= 1
    assert 0 <= answers["trained_exact_match"] <= 1 and 0 <= answers["unseen_exact_match"] <= 1
    assert first.stdout.count("[trained] Q: ") == answers["trained_n"]
    assert first.stdout.count("[unseen] Q: ") == answers["unseen_n"]
    assert first.stdout.count("expected: ") == answers["trained_n"] + answers["unseen_n"]
    assert f"exact match: {round(answers['trained_exact_match'] * answers['trained_n'])}/{answers['trained_n']}" \
        in first.stdout
    stages = summary["stages"]
    assert list(stages) == ["corpora", "prepare_pretrain", "build_pretrain", "pretrain", "sample_pretrained",
                            "prepare_finetune", "build_finetune", "finetune_lora", "merge", "answers", "hf_export"]
    assert all(st["seconds"] >= 0 for st in stages.values())
    assert stages["pretrain"]["val_loss"] > 0 and stages["finetune_lora"]["eval_loss"] > 0
    assert adapter["train_embeddings"] is True
    assert (out / "hf_export" / "config.json").exists() and (out / "hf_export" / "merges.txt").exists()
    losses = [json.loads(line)["loss"] for line in (out / "runs/pretrain/metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] - 1.0

    # Re-running skips every finished stage (no training again) and still ends with the answers.
    again = run_quickstart(repo, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(skipped:") == 9
    assert "pretrain.py --model_type" not in again.stdout and "finetune_lora.py --pretrained" not in again.stdout
    assert "transformers pipeline: " in again.stdout
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["answers"] == answers  # greedy: the same answers
    for name in ("corpora", "pretrain", "finetune_lora", "hf_export"):  # skipped: the first run's times are kept
        assert rerun["stages"][name]["skipped"] and rerun["stages"][name]["seconds"] == stages[name]["seconds"]
    assert rerun["pipeline_seconds"] >= stages["pretrain"]["seconds"] + stages["finetune_lora"]["seconds"]
