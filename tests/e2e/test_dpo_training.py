"""finetune_dpo.py for real, as test_training.py runs the other scripts: torchrun with 2 CPU ranks (gloo),
1 rank x 2 accumulation steps equal to 2 ranks, a resumed run equal to an uninterrupted one (the precomputed
reference read back, not recomputed; packed rows resumed mid-epoch), and the LoRA adapter merged by
convert_lora_checkpoint.py."""
import json

import pytest
import torch

from custom_dataset import PreferenceLoader
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.checkpoints.model import load_model, save_model
from utils.training.dpo import REFERENCE_FILE, answer_logps

KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
# Constant LR (a run capped by --max_train_iters then resumed follows the same schedule); the norm never clips
# (a clip factor's rounding depends on the sharding); one thread per process, as each of 2 ranks has.
COMMON = ["--mixed_precision=false", "--device=cpu", "--micro_batch_size=4", "--max_lr=2e-3", "--min_lr=2e-3",
          "--warmup_steps=0", "--grad_clip=1000", "--num_epochs=2", "--eval_iters=2", "--eval_interval=4",
          "--log_interval=1", "--ckpt_interval=2", "--cpu_threads=1", "--keep_last_ckpts=5"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, write_preference_data):
    tmp = tmp_path_factory.mktemp("dpo")
    torch.manual_seed(0)
    save_model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=128)), tmp / "base")
    write_preference_data(tmp / "data", n_train=32, n_val=8)  # 4 steps an epoch at a global batch of 8 pairs
    return tmp


def dpo_args(tmp, name, *extra):
    return [f"--pretrained_ckpt={tmp / 'base'}", f"--data_dir={tmp / 'data'}", f"--ckpt_dir={tmp / name / 'ckpt'}",
            f"--log_dir={tmp / name / 'runs'}", *COMMON, *extra]


def records(read_metrics, tmp, name):
    steps, evals = read_metrics(tmp / name / "runs")
    return steps, evals


def assert_same(a, b, steps, keys=KEYS, tol=1e-5):
    for s in steps:
        for k in keys:
            assert abs(a[s][k] - b[s][k]) <= tol, (s, k, a[s][k], b[s][k])


@pytest.mark.parametrize("mode", ["full", "precompute", "lora", "packed"])
def test_two_ranks_equal_one_and_resume_equals_uninterrupted(mode, tmp, run_script, read_metrics):
    # packed: rows of 2 x 64 tokens holding 2 pairs each, 2 rows a micro-batch: again 8 pairs a step, 4 steps an epoch
    extra = {"full": [], "precompute": ["--precompute_ref=true"],
             "lora": ["--lora_r=4", "--lora_alpha=16", "--max_lr=2e-2", "--min_lr=2e-2"],
             "packed": ["--pack=true", "--max_seq_length=64", "--micro_batch_size=2"]}[mode]
    run_script("finetune_dpo.py", *dpo_args(tmp, f"{mode}2", "--gradient_accum_steps=1", *extra), nproc=2)
    run_script("finetune_dpo.py", *dpo_args(tmp, f"{mode}1", "--gradient_accum_steps=2", *extra))
    two, evals2 = records(read_metrics, tmp, f"{mode}2")
    one, evals1 = records(read_metrics, tmp, f"{mode}1")
    assert sorted(two) == sorted(one) == list(range(1, 9))
    assert abs(two[1]["loss"] - 0.6931472) < 1e-6  # dropout off: the policy starts as the reference
    assert_same(two, one, range(1, 9), tol=1e-4)
    assert_same(evals2, evals1, (4, 8), keys=[f"eval_{k}" for k in KEYS], tol=1e-4)
    assert two[8]["rewards/margins"] > two[1]["rewards/margins"] + 0.05 and evals2[8]["eval_rewards/accuracies"] >= 0.5

    # A run capped at step 3 (its last checkpoint), then resumed at 1 rank to the end of the 8 steps.
    cut = f"{mode}_resumed"
    run_script("finetune_dpo.py", *dpo_args(tmp, cut, "--max_train_iters=3", "--gradient_accum_steps=1", *extra),
               nproc=2)
    if mode == "precompute":
        saved = (tmp / cut / "ckpt" / REFERENCE_FILE).read_bytes()
    run_script("finetune_dpo.py", *dpo_args(tmp, cut, "--resume=auto", "--gradient_accum_steps=2", *extra))
    resumed, evals_r = records(read_metrics, tmp, cut)
    assert sorted(resumed) == list(range(1, 9))
    assert_same(resumed, two, range(4, 9), tol=1e-4)
    assert_same(evals_r, evals2, (4, 8), keys=[f"eval_{k}" for k in KEYS], tol=1e-4)
    if mode == "precompute":  # read back, never recomputed from the moved policy
        assert (tmp / cut / "ckpt" / REFERENCE_FILE).read_bytes() == saved
        state = json.loads((tmp / cut / "ckpt" / "step_00000008" / "trainer_state.json").read_text())
        assert state["dpo"]["precompute_ref"] is True


def test_lora_adapter_merges_and_scores_as_trained(tmp, run_script, read_metrics):
    """The adapter finetune_dpo.py saves, merged by convert_lora_checkpoint.py, gives the validation log-probs the
    run logged at its last evaluation (eval_logps/chosen, the mean over the first eval_iters x 4 pairs)."""
    run = "lora2"
    if not (tmp / run / "ckpt" / "final").exists():
        run_script("finetune_dpo.py", *dpo_args(tmp, run, "--gradient_accum_steps=1", "--lora_r=4", "--lora_alpha=16",
                                                "--max_lr=2e-2", "--min_lr=2e-2"), nproc=2)
    run_script("convert_lora_checkpoint.py", "--base", tmp / "base", "--lora", tmp / run / "ckpt" / "final",
               "--output", tmp / "merged")
    merged = load_model(tmp / "merged").eval()
    loader = PreferenceLoader(tmp / "data" / "val.jsonl", 8, shuffle=False, max_seq_length=128)
    with torch.no_grad():
        logps = answer_logps(merged, loader.next_batch())
    _, evals = read_metrics(tmp / run / "runs")
    assert abs(logps[:8].mean().item() - evals[8]["eval_logps/chosen"]) <= 1e-4
    base = load_model(tmp / "base").eval()
    with torch.no_grad():
        assert abs(answer_logps(base, loader.collate(list(range(8))))[:8].mean().item()
                   - evals[8]["eval_logps/chosen"]) > 1e-2  # the adapter did change the model
