"""The run log (metrics.jsonl + TensorBoard) of a resumed run, against the uninterrupted run's."""
import json
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pretrain

TINY = ["--model_type=gpt2-tiny", "--max_seq_length=32", "--mixed_precision=false", "--device=cpu", "--cpu_threads=1",
        "--micro_batch_size=2", "--gradient_accum_steps=1", "--max_lr=3e-3", "--min_lr=3e-4", "--warmup_steps=2",
        "--max_decay_steps=8", "--eval_iters=1", "--eval_interval=2", "--log_interval=1", "--grad_clip=1000"]
TIMINGS = ("tokens_per_sec", "mfu")  # wall-clock figures: the same steps, not the same values


def args(tmp, name, **overrides):
    a = {"data_dir": tmp / "data", "ckpt_dir": tmp / name / "ckpt", "log_dir": tmp / name / "runs", **overrides}
    return [str(x) for x in TINY + [f"--{k}={v}" for k, v in a.items()]]


def records(run_dir):
    with open(run_dir / "runs" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_resumed_run_logs_equal_the_uninterrupted_run(tmp_path, capsys, write_pretrain_data):
    """Issue 16 item 8: a resume after steps that were logged but never saved."""
    write_pretrain_data(tmp_path / "data", n_docs=400)
    pretrain.main(args(tmp_path, "full", max_train_iters=6, ckpt_interval=6))
    # The same run, stopped after logging step 5 (with an evaluation: its last step then) whose checkpoint
    # never made it to disk: its last checkpoint is step 3. Resumed, it logs steps 4-6 again.
    pretrain.main(args(tmp_path, "cut", max_train_iters=5, ckpt_interval=3))
    for name in ("step_00000005", "final"):
        shutil.rmtree(tmp_path / "cut" / "ckpt" / name)
    pretrain.main(args(tmp_path, "cut", max_train_iters=6, ckpt_interval=3, resume="auto"))
    capsys.readouterr()

    full, cut = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [(r["step"], "eval_loss" in r) for r in cut] == [(r["step"], "eval_loss" in r) for r in full]
    for a, b in zip(full, cut):
        for key in ("loss", "lr", "grad_norm", "eval_loss", "eval_perplexity"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)

    # TensorBoard, as its own reader sees the two runs: every tag, step for step.
    ea = EventAccumulator(str(tmp_path / "full" / "runs")).Reload()
    eb = EventAccumulator(str(tmp_path / "cut" / "runs")).Reload()
    tags = ea.Tags()["scalars"]
    assert sorted(eb.Tags()["scalars"]) == sorted(tags) and "train/loss" in tags and "eval/loss" in tags
    for tag in tags:
        a, b = ea.Scalars(tag), eb.Scalars(tag)
        assert [e.step for e in b] == [e.step for e in a], tag
        if not tag.endswith(TIMINGS):
            assert [e.value for e in b] == pytest.approx([e.value for e in a], abs=1e-5), tag
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_into_a_used_log_dir_is_refused(tmp_path, capsys, write_pretrain_data):
    """Issue 16 item 8: like a used ckpt_dir."""
    write_pretrain_data(tmp_path / "data", n_docs=400)
    pretrain.main(args(tmp_path, "first", max_train_iters=1))
    before = (tmp_path / "first" / "runs" / "metrics.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        pretrain.main(args(tmp_path, "first", max_train_iters=1, ckpt_dir=tmp_path / "other_ckpt"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--log_dir={tmp_path / 'first' / 'runs'} already holds the logs of a run (metrics.jsonl)" in err
    assert (tmp_path / "first" / "runs" / "metrics.jsonl").read_text() == before


def test_resume_auto_that_finds_no_checkpoint_refuses_a_used_log_dir(tmp_path, capsys, write_pretrain_data,
                                                                     snapshot):
    """Issue 20 item 1: "auto, nothing found" is a fresh start; it used to purge the earlier run's log."""
    write_pretrain_data(tmp_path / "data", n_docs=400)
    pretrain.main(args(tmp_path, "first", max_train_iters=3))
    logs = tmp_path / "first" / "runs"
    before = snapshot(logs)
    assert len(records(tmp_path / "first")) == 3 + 2  # 3 steps, evaluations at steps 2 and 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        pretrain.main(args(tmp_path, "first", max_train_iters=3, ckpt_dir=tmp_path / "empty_ckpt", resume="auto"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--log_dir={logs} already holds the logs of a run (metrics.jsonl); --resume=auto found no checkpoint" in err
    assert snapshot(logs) == before  # metrics.jsonl and the TensorBoard events, byte for byte
    assert not (tmp_path / "empty_ckpt").exists()  # a refused run leaves nothing behind
