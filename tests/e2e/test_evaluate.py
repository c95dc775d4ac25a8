"""evaluate.py for real: torchrun with 2 CPU ranks against 1 process, and eval_tasks inside FSDP2 training
against evaluate.py on the saved model."""
import json
import os

import pytest

TASKS = "hellaswag:7,piqa:5,winogrande:5,arc_easy:5,lambada:5"  # odd counts: ranks get unequal shares


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, write_pretrain_data):
    tmp = tmp_path_factory.mktemp("evaluate")
    write_pretrain_data(tmp / "data", n_docs=300)
    return tmp


@pytest.fixture(scope="module")
def model_dir(tmp):
    import torch

    from models.gpt2 import GPT2Config, GPT2LMHeadModel
    from utils.checkpoint import save_model
    torch.manual_seed(3)
    return save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny")), tmp / "model")


def results(path):
    with open(path) as f:
        return json.load(f)["results"]


def assert_same(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    for task in a:
        assert a[task].keys() == b[task].keys(), task
        for k, v in a[task].items():
            if k in ("perplexity", "loss", "bits_per_byte"):
                assert b[task][k] == pytest.approx(v, rel=rel), (task, k)
            else:  # accuracies and counts: identical
                assert b[task][k] == v, (task, k)


def test_two_ranks_give_the_numbers_of_one(tmp, model_dir, run_script):
    common = ["--checkpoint", model_dir, "--tasks", TASKS + ",val_loss:9", "--val_data", tmp / "data",
              "--batch_size", "6"]
    one = run_script("evaluate.py", *common, "--output", tmp / "one.json")
    run_script("evaluate.py", *common, "--output", tmp / "two.json", nproc=2)
    assert_same(results(tmp / "one.json"), results(tmp / "two.json"))
    r = results(tmp / "one.json")
    assert r["hellaswag"]["n"] == 7 and r["val_loss"]["n"] == 9 and set(r["hellaswag"]) >= {"acc", "acc_norm"}
    assert "hellaswag" in one.stdout and "acc_norm" in one.stdout  # the table


def test_eval_tasks_in_fsdp_training_equal_evaluate_py(tmp, run_script, read_metrics):
    """2 ranks, FSDP2, activation checkpointing, a padded vocabulary: the in-loop scores of the last
    step equal evaluate.py's on the model saved from that step."""
    args = ["--model_type=gpt2-tiny", "--max_seq_length=32", "--mixed_precision=false", "--device=cpu",
            "--max_train_iters=3", "--eval_interval=3", "--eval_iters=1", "--warmup_steps=1", "--micro_batch_size=4",
            "--activation_checkpointing=true", f"--eval_tasks={TASKS}", f"--data_dir={tmp / 'data'}",
            f"--ckpt_dir={tmp / 'run' / 'ckpt'}", f"--log_dir={tmp / 'run' / 'runs'}"]
    out = run_script("pretrain.py", *args, nproc=2)
    assert "hellaswag_acc_norm" in out.stderr + out.stdout
    _, evals = read_metrics(tmp / "run" / "runs")
    in_loop = evals[3]
    run_script("evaluate.py", "--checkpoint", tmp / "run" / "ckpt" / "final", "--tasks", TASKS,
               "--output", tmp / "final.json")
    for task, metrics in results(tmp / "final.json").items():
        for k, v in metrics.items():
            if k == "n":
                continue
            got = in_loop[f"eval_{task}_{k}"]
            assert got == (pytest.approx(v, rel=1e-5) if k == "perplexity" else v), (task, k)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp / "run" / "runs"))
    ea.Reload()
    assert "eval/hellaswag_acc_norm" in ea.Tags()["scalars"] and "eval/lambada_perplexity" in ea.Tags()["scalars"]


def test_offline_without_data_is_one_line(tmp, model_dir, run_script):
    env = {"MINIGPT_CACHE": str(tmp / "empty_cache"), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull,
           "PIP_FIND_LINKS": ""}
    out = run_script("evaluate.py", "--checkpoint", model_dir, "--tasks", "piqa", env=env, check=False)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr  # the data is read before the "scoring ..." line
    assert err[-1].startswith("evaluate.py: error: evaluation data:") and "--data_dir" in err[-1]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--tasks", "val_loss", "--val_data", "/nonexistent"], "--val_data /nonexistent: no val.bin there"),
    (["--tasks", "piqa", "--data_dir", "/nonexistent"], "--data_dir /nonexistent: not a directory"),
])
def test_inputs_are_checked_before_any_line(model_dir, run_script, args, message):
    out = run_script("evaluate.py", "--checkpoint", model_dir, *args, check=False)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"evaluate.py: error: {message}"
                                                                     + out.stderr.split(message, 1)[-1].strip()]
