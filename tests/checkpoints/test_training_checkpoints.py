"""The training checkpointer as a user meets it: the scripts run in this process at world size 1.

One finished 6-step pretraining run (checkpoints at steps 2, 4, 6, final/) is the reference; each test
works on a clone of it (checkpoint files hard-linked, never written in place) or only reads it.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import convert_hf_checkpoint
import convert_lora_checkpoint
import finetune
import finetune_lora
import generate_pretrained
import pretrain
from utils.checkpoints.model import CheckpointError
from utils.checkpoints.training import list_checkpoints, step_dir_name
from utils.cli import run as run_cli

TINY = ["--model_type=gpt2-tiny", "--max_seq_length=32", "--mixed_precision=false", "--device=cpu", "--cpu_threads=1",
        "--micro_batch_size=2", "--gradient_accum_steps=1", "--max_lr=3e-3", "--min_lr=3e-4", "--warmup_steps=2",
        "--max_decay_steps=8", "--eval_iters=1", "--eval_interval=2", "--log_interval=1", "--grad_clip=1000"]


def pretrain_args(tmp, name, **overrides):
    args = {"data_dir": tmp / "data", "ckpt_dir": tmp / name / "ckpt", "log_dir": tmp / name / "runs",
            "max_train_iters": 6, "ckpt_interval": 2, "keep_last_ckpts": 5, **overrides}
    return TINY + [f"--{k}={v}" for k, v in args.items()]


def run(main, args, capsys):
    """(exit code, stdout, stderr) of a script's main() in this process."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(main, args, capsys):
    """The one error line a refused run prints (exit code 2, no traceback)."""
    got, out, err = run(main, args, capsys)
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert got == 2 and "Traceback" not in err and len(errors) == 1, (got, out[-2000:], err[-3000:])
    return errors[0]


def losses(run_dir, read_metrics):
    return {s: r["loss"] for s, r in read_metrics(run_dir / "runs")[0].items()}


def clone(src, dst):
    """A copy of a run: logs copied, checkpoint files hard-linked (a test replaces files, never edits them)."""
    shutil.copytree(src / "runs", dst / "runs")
    shutil.copytree(src / "ckpt", dst / "ckpt", copy_function=os.link)
    return dst


def truncate(path):
    """Replace `path` with its first half (a new file: a hard-linked original stays whole). Returns the bytes."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])
    return data


def restore(path, data):
    path.unlink()
    path.write_bytes(data)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, write_pretrain_data):
    tmp = tmp_path_factory.mktemp("checkpointer")
    write_pretrain_data(tmp / "data", n_docs=400)
    return tmp


@pytest.fixture(scope="module")
def run6(tmp):
    """Uninterrupted: 6 steps, checkpoints at 2, 4, 6 (all kept), evaluations at 2, 4, 6, final/."""
    pretrain.main([str(a) for a in pretrain_args(tmp, "run6")])
    assert [s for s, _ in list_checkpoints(tmp / "run6" / "ckpt")] == [2, 4, 6]
    return tmp / "run6"


def test_resume_from_an_earlier_step_sets_the_later_checkpoints_aside(tmp, run6, capsys, read_metrics):
    """Issue 13 bug 2: keep-last pruning by run, not by step number."""
    branch = clone(run6, tmp / "branch")
    ckpt = branch / "ckpt"
    code, out, err = run(pretrain.main, pretrain_args(tmp, "branch", resume=ckpt / step_dir_name(2), max_train_iters=4,
                                                      ckpt_interval=1, keep_last_ckpts=1), capsys)
    assert code == 0, err[-3000:]
    # The checkpoint just saved survives keep_last_ckpts=1; the abandoned run's step 6 is no longer there for
    # --resume=auto to pick: it was moved aside with that run's final/, not deleted.
    assert [s for s, _ in list_checkpoints(ckpt)] == [4]
    aside = [p for p in ckpt.iterdir() if p.name.startswith("set_aside_")]
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == ["final", step_dir_name(4), step_dir_name(6)]
    assert str(aside[0]) in out
    # It continued from step 2 on the same data and schedule: its steps 3-4 are the uninterrupted run's.
    mine, reference = losses(branch, read_metrics), losses(run6, read_metrics)
    assert sorted(mine) == [1, 2, 3, 4]
    for step in (3, 4):
        assert mine[step] == pytest.approx(reference[step], abs=1e-6)


def test_truncated_training_checkpoint_is_named_and_auto_falls_back(tmp, run6, capsys, read_metrics):
    """Issue 16 item 4: one line naming the file; --resume=auto takes the newest readable checkpoint."""
    broken = clone(run6, tmp / "broken")
    step6 = broken / "ckpt" / step_dir_name(6)
    for name in (".metadata", "__0_0.distcp", "rng.safetensors", "trainer_state.json"):
        data = truncate(step6 / name)
        err = refused(pretrain.main, pretrain_args(tmp, "broken", resume=step6, max_train_iters=7), capsys)
        assert str(step6 / name) in err, err
        restore(step6 / name, data)
    truncate(step6 / "__0_0.distcp")
    code, out, err = run(pretrain.main, pretrain_args(tmp, "broken", resume="auto"), capsys)
    assert code == 0, err[-3000:]
    assert f"skipping an unreadable checkpoint: {step6 / '__0_0.distcp'}" in out
    assert f"resumed from {broken / 'ckpt' / step_dir_name(4)} at step 4" in out
    mine, reference = losses(broken, read_metrics), losses(run6, read_metrics)
    for step in (5, 6):
        assert mine[step] == pytest.approx(reference[step], abs=1e-6)
    # The unreadable step 6 (and the final/ that came after it) were moved aside; step 6 was written anew.
    aside = [p for p in (broken / "ckpt").iterdir() if p.name.startswith("set_aside_")]
    assert sorted(p.name for p in aside[0].iterdir()) == ["final", step_dir_name(6)]
    assert [s for s, _ in list_checkpoints(broken / "ckpt")] == [2, 4, 6]


def test_truncated_model_file_is_one_line_in_every_script(tmp, run6, capsys, write_finetune_data):
    """Issue 16 item 4: model.safetensors cut short, given to generation, fine-tuning, merge and export."""
    model = tmp / "cut_model"
    shutil.copytree(run6 / "ckpt" / "final", model, copy_function=os.link)
    truncate(model / "model.safetensors")
    named = str(model / "model.safetensors")
    assert named in run_script_error(generate_pretrained, ["--checkpoint", model, "--prompt", "Hi"], capsys)
    assert named in run_script_error(convert_hf_checkpoint, ["--to_hf", "--checkpoint", model, "--output",
                                                             tmp / "cut_hf"], capsys)
    write_finetune_data(tmp / "sft_cut", n_train=8, n_val=4)
    assert named in refused(finetune.main, ["--pretrained_ckpt", model, "--data_dir", tmp / "sft_cut", "--device=cpu",
                                            f"--ckpt_dir={tmp / 'ft_cut' / 'ckpt'}",
                                            f"--log_dir={tmp / 'ft_cut' / 'runs'}"], capsys)
    assert named in run_script_error(convert_lora_checkpoint, ["--base", model, "--lora", model, "--output",
                                                               tmp / "merged_cut"], capsys)


def run_script_error(module, args, capsys):
    """The one-line error of a script run through its own entry point (utils.cli.run)."""
    return refused(lambda argv: run_cli(module.PROG, module.main, argv), args, capsys)


def test_resume_with_other_settings_is_refused_in_one_line(tmp, run6, capsys):
    """Issue 16 item 5 (seed, sequence length, data, --model_type typo, --device=cuda without CUDA) and
    issue 13 bug 4 (the --datasources list)."""
    other = tmp / "data_copy"
    shutil.copytree(tmp / "data", other)
    again = pretrain_args(tmp, "run6", resume="auto", max_train_iters=7)
    cases = {"--seed=7": "seed: checkpoint 1337 vs now 7",
             "--max_seq_length=16": "max_seq_length: checkpoint 32 vs now 16",
             f"--data_dir={other}": f"data: checkpoint ['{os.path.realpath(tmp / 'data')}:1'] vs now "
                                    f"['{os.path.realpath(other)}:1']",
             f"--datasources={tmp / 'data'}:1,{other}:1": "data: checkpoint",
             "--model_type=gpt2-tinyy": "--model_type=gpt2-tinyy: unknown preset"}
    if not torch.cuda.is_available():
        cases["--device=cuda"] = "--device=cuda: CUDA is not available here"
    for flag, message in cases.items():
        assert message in refused(pretrain.main, again + [flag], capsys), flag
    assert [s for s, _ in list_checkpoints(run6 / "ckpt")] == [2, 4, 6]  # refused runs change nothing


def test_resume_of_another_task_or_adapter_is_refused(tmp, run6, capsys, write_finetune_data):
    """Issue 13 bug 4 (LoRA r / alpha / targets / base) and issue 16 item 5 (a checkpoint of another script)."""
    sft = write_finetune_data(tmp / "sft", n_train=16, n_val=4)
    common = ["--data_dir", sft, "--max_seq_length=64", "--micro_batch_size=4", "--gradient_accum_steps=1",
              "--max_train_iters=1", "--device=cpu", "--mixed_precision=false", "--cpu_threads=1", "--eval_iters=1"]
    lora = common + ["--pretrained_ckpt", run6 / "ckpt" / "final", "--lora_r=4", "--lora_alpha=16",
                     "--lora_targets=q,v", f"--ckpt_dir={tmp / 'lora' / 'ckpt'}", f"--log_dir={tmp / 'lora' / 'runs'}"]
    full = common + ["--pretrained_ckpt", run6 / "ckpt" / "final", f"--ckpt_dir={tmp / 'ft' / 'ckpt'}",
                     f"--log_dir={tmp / 'ft' / 'runs'}"]
    for main, args in ((finetune_lora.main, lora), (finetune.main, full)):
        code, _, err = run(main, args, capsys)
        assert code == 0, err[-3000:]
    other_base = tmp / "other_base"
    shutil.copytree(run6 / "ckpt" / "final", other_base, copy_function=os.link)
    again = lora + ["--resume=auto", "--max_train_iters=2"]
    cases = {"--lora_alpha=8": "'alpha': 8.0", "--lora_r=8": "'r': 8,", "--lora_targets=q,k": "'targets': ['q', 'k']",
             "--train_bias=true": "'train_bias': True", "--train_embeddings=true": "'train_embeddings': True"}
    for flag, message in cases.items():
        err = refused(finetune_lora.main, again + [flag], capsys)
        assert ("lora: checkpoint {'r': 4, 'alpha': 16.0, 'targets': ['q', 'v'], 'train_bias': False, "
                "'train_embeddings': False}") in err, err
        assert message in err, (flag, err)
    err = refused(finetune_lora.main, again + [f"--pretrained_ckpt={other_base}"], capsys)
    assert f"base: checkpoint {os.path.realpath(run6 / 'ckpt' / 'final')} vs now {os.path.realpath(other_base)}" in err

    lora_step, ft_step = tmp / "lora" / "ckpt" / step_dir_name(1), tmp / "ft" / "ckpt" / step_dir_name(1)
    err = refused(finetune.main, full + [f"--resume={lora_step}", f"--ckpt_dir={tmp / 'ft2' / 'ckpt'}",
                                         f"--log_dir={tmp / 'ft2' / 'runs'}"], capsys)
    assert f"{lora_step} is a finetune_lora.py checkpoint; finetune.py resumes only its own" in err
    err = refused(pretrain.main, pretrain_args(tmp, "pre2", resume=ft_step), capsys)
    assert f"{ft_step} is a finetune.py checkpoint; pretrain.py resumes only its own" in err


def test_resume_from_a_path_that_does_not_exist_says_so(tmp, run6, capsys):
    """Issue 20 item 8: not "not a complete training checkpoint"."""
    missing = tmp / "nonexistent" / step_dir_name(4)
    err = refused(pretrain.main, pretrain_args(tmp, "missing", resume=missing), capsys)
    assert f"--resume={missing} does not exist" in err and "not a complete" not in err


def test_resuming_a_finished_run_says_so_and_keeps_final(tmp, run6, capsys):
    """Issue 16 item 7."""
    weights = run6 / "ckpt" / "final" / "model.safetensors"
    before, metrics = weights.stat(), (run6 / "runs" / "metrics.jsonl").read_text()
    code, out, err = run(pretrain.main, pretrain_args(tmp, "run6", resume="auto"), capsys)
    assert code == 0, err[-3000:]
    final = run6 / "ckpt" / "final"
    assert f"{run6 / 'ckpt'} holds a finished run (step 6 of 6; model in {final}): nothing to do" in out
    assert "To train on, raise --max_train_iters" in out and "num_epochs" not in out  # pretrain has none
    assert "nan" not in out
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # final/ not rewritten
    assert (run6 / "runs" / "metrics.jsonl").read_text() == metrics
    # Stopped between its last checkpoint and final/: the resumed run only writes final/, from that checkpoint.
    unwritten = clone(run6, tmp / "unwritten")
    shutil.rmtree(unwritten / "ckpt" / "final")
    code, out, err = run(pretrain.main, pretrain_args(tmp, "unwritten", resume="auto"), capsys)
    assert code == 0 and "done: 6 steps; model saved to" in out and "nan" not in out, (out[-2000:], err[-2000:])
    assert (unwritten / "ckpt" / "final" / "model.safetensors").read_bytes() == weights.read_bytes()


def test_a_checkpoint_dir_given_as_a_model_points_to_final(tmp, run6, capsys):
    """Issue 16 item 10: a ckpt_dir or step_* dir where a finished model is expected."""
    ckpt, final = run6 / "ckpt", run6 / "ckpt" / "final"
    err = run_script_error(generate_pretrained, ["--checkpoint", ckpt, "--prompt", "Hi"], capsys)
    assert f"{ckpt} is a training run's --ckpt_dir; its finished model is {final}" in err
    step = ckpt / step_dir_name(4)
    err = run_script_error(convert_hf_checkpoint, ["--to_hf", "--checkpoint", step, "--output", tmp / "hf_x"], capsys)
    assert f"{step} is a training checkpoint (for --resume), not a finished model; the run's model is {final}" in err
    err = run_script_error(convert_lora_checkpoint, ["--base", final, "--lora", ckpt, "--output", tmp / "m_x"], capsys)
    assert f"its finished model is {final}" in err


def test_ckpt_dir_lock_names_its_holder_and_is_taken_over_when_it_dies(tmp_path, repo):
    """Issue 13 bug 6: one run per ckpt_dir; a lock left by a killed run does not block the next one."""
    from utils.checkpoints.training import DirLock
    code = "import sys, time; from utils.checkpoints.training import DirLock; DirLock(sys.argv[1]).acquire(); " \
           "print('locked', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=repo,
                              env={**os.environ, "PYTHONPATH": repo})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid} on host "
                                                  rf"{socket.gethostname()}, started "):
            DirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = DirLock(str(tmp_path))
    assert lock.acquire().startswith(f"pid {holder.pid} on host")  # taken over; the dead holder is reported
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    again = DirLock(str(tmp_path))
    assert again.acquire() == ""  # released cleanly: nobody to report
    again.release()
