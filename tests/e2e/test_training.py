"""The training loop for real: torchrun with 2 CPU ranks (gloo), resume, equivalences, failures."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from utils.checkpoints.model import load_model
from utils.checkpoints.training import list_checkpoints, step_dir_name

TINY = ["--model_type=gpt2-tiny", "--max_seq_length=32", "--mixed_precision=false", "--device=cpu",
        "--max_lr=3e-3", "--min_lr=3e-4", "--warmup_steps=2", "--max_decay_steps=8", "--max_train_iters=8",
        "--eval_iters=2", "--eval_interval=4", "--log_interval=1", "--weight_decay=0.1",
        # The norm is computed and logged, but never clips here: a clip factor is the one thing whose
        # rounding depends on how the gradient is sharded, and it would blur the exact comparisons.
        "--grad_clip=1000"]


def pretrain_args(tmp, name, **overrides):
    args = {"data_dir": tmp / "data", "ckpt_dir": tmp / name / "ckpt", "log_dir": tmp / name / "runs",
            "micro_batch_size": 4, "gradient_accum_steps": 1, "ckpt_interval": 4, **overrides}
    return TINY + [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="session")
def losses(read_metrics):
    """{step: train loss} of a run directory."""
    def losses(run_dir):
        steps, _ = read_metrics(run_dir / "runs")
        return {s: r["loss"] for s, r in steps.items()}
    return losses


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, write_pretrain_data):
    tmp = tmp_path_factory.mktemp("training")
    write_pretrain_data(tmp / "data")
    return tmp


@pytest.fixture(scope="module")
def baseline(tmp, run_script):
    """2 ranks x micro-batch 4, 8 steps, uninterrupted."""
    out = run_script("pretrain.py", *pretrain_args(tmp, "base", keep_last_ckpts=1), nproc=2)
    return tmp / "base", out


def test_two_rank_pretraining_writes_everything_and_learns(baseline, read_metrics, losses):
    run, out = baseline
    ckpt = run / "ckpt"
    assert [s for s, _ in list_checkpoints(ckpt)] == [8]  # step 4 pruned by keep_last_ckpts=1
    state = json.loads((ckpt / "step_00000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data"]["position"] == 8 * 8
    model = load_model(ckpt / "final")
    assert model.config.n_layer == 2 and model.config.pad_vocab_multiple == 64
    loss = losses(run)
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < loss[1] - 1.0  # learns the toy language
    _, evals = read_metrics(run / "runs")
    assert evals[8]["eval_loss"] < evals[4]["eval_loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "runs")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu",
            "eval/loss", "eval/perplexity"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert "done: 8 steps" in out.stdout + out.stderr
    # stderr is a pipe here: the bar draws at the start and the end (and every 30 s), not once per step.
    assert out.stderr.count("pretrain: ") <= 3, out.stderr[-3000:]


def test_one_rank_with_accumulation_equals_two_ranks(tmp, baseline, run_script, read_metrics, losses):
    """Same global batch: 1 rank x micro-batch 4 x 2 accumulation steps == 2 ranks x 4."""
    run_script("pretrain.py", *pretrain_args(tmp, "accum", gradient_accum_steps=2, max_train_iters=5))
    one, two = losses(tmp / "accum"), losses(baseline[0])
    for step in range(1, 6):
        assert abs(one[step] - two[step]) <= 1e-4, (step, one[step], two[step])
    # The gradient norm is global, not a shard's (a shard's would be ~1/sqrt(2) of it).
    norms1, norms2 = read_metrics(tmp / "accum" / "runs")[0], read_metrics(baseline[0] / "runs")[0]
    for step in range(1, 6):
        assert norms1[step]["grad_norm"] == pytest.approx(norms2[step]["grad_norm"], rel=1e-4)
    # Sharding is real: each of 2 ranks holds about half the parameters and optimizer state of 1 rank.
    mem1 = read_metrics(tmp / "accum" / "runs")[0][1]["memory"]
    mem2 = read_metrics(baseline[0] / "runs")[0][1]["memory"]
    for kind in ("params", "optimizer"):
        assert len(mem2[kind]) == 2 and len(mem1[kind]) == 1
        for per_rank in mem2[kind]:
            assert 0.45 * mem1[kind][0] <= per_rank <= 0.55 * mem1[kind][0], (kind, mem1, mem2)


def test_resume_at_another_world_size_keeps_the_global_batch(tmp, baseline, run_script, losses, capsys):
    """Issue 20 item 13: saved by 2 ranks x 4, resumed by 1 rank: 2 accumulation steps keep the global batch of 8,
    and steps 5-8 equal the uninterrupted 2-rank run's; a micro-batch that cannot keep it is refused."""
    import pretrain
    run_script("pretrain.py", *pretrain_args(tmp, "rescaled", max_train_iters=4), nproc=2)
    with pytest.raises(SystemExit) as e:
        pretrain.main(pretrain_args(tmp, "rescaled", micro_batch_size=3, resume="auto"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("the checkpoint was saved at world size 2 with a global batch of 8 sequences (4 x 1 accumulation x 2); "
            "at world size 1 each rank needs 8 sequences a step, which --micro_batch_size=3 does not divide") in err
    out = run_script("pretrain.py", *pretrain_args(tmp, "rescaled", resume="auto"))
    assert "keeping it at world size 1: gradient_accum_steps 1 -> 2" in out.stdout
    assert "global batch 8 x 32" in out.stdout
    resumed, straight = losses(tmp / "rescaled"), losses(baseline[0])
    for step in range(5, 9):
        assert abs(resumed[step] - straight[step]) <= 1e-4, (step, resumed[step], straight[step])


def test_sigterm_saves_then_resume_matches_uninterrupted(tmp, baseline, run_script, repo, losses):
    """SIGTERM mid-run saves a checkpoint; resuming at 2 ranks and at 1 rank gives the same losses."""
    args = pretrain_args(tmp, "stopped", ckpt_interval=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(repo, "pretrain.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=repo,
                            env={**os.environ, "PYTHONPATH": repo})
    metrics = tmp / "stopped" / "runs" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"step": 2,' in metrics.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    found = list_checkpoints(tmp / "stopped" / "ckpt")
    assert len(found) == 1, output[-3000:]
    stop_step = found[0][0]
    assert 2 <= stop_step < 8, "the run finished before the signal arrived"
    assert f"stopped by signal at step {stop_step}" in output
    assert not (tmp / "stopped" / "ckpt" / "final").exists()

    expected = losses(baseline[0])
    shutil.copytree(tmp / "stopped", tmp / "stopped_1rank")
    run_script("pretrain.py", *pretrain_args(tmp, "stopped", resume="auto"), nproc=2)
    # One thread, like each of the 2 ranks: CPU matmuls round differently with another thread count.
    run_script("pretrain.py",
               *pretrain_args(tmp, "stopped_1rank", resume="auto", gradient_accum_steps=2, cpu_threads=1))
    for run in ("stopped", "stopped_1rank"):
        got = losses(tmp / run)
        assert sorted(got) == list(range(1, 9))
        for step in range(stop_step + 1, 9):
            assert abs(got[step] - expected[step]) <= 1e-5, (run, step, got[step], expected[step])


def test_kill_during_save_never_leaves_a_checkpoint_resume_would_pick(tmp, run_script, repo):
    args = pretrain_args(tmp, "killed", ckpt_interval=1, max_train_iters=200, keep_last_ckpts=50)
    proc = subprocess.Popen([sys.executable, os.path.join(repo, "pretrain.py"), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=repo)
    ckpt = tmp / "killed" / "ckpt"
    deadline = time.time() + 300
    killed_mid_save = False
    while time.time() < deadline and proc.poll() is None:
        # The temporary directory exists only while a save is in flight.
        if len(list_checkpoints(ckpt)) >= 2 and any(p.name.endswith(".tmp") for p in ckpt.iterdir()):
            proc.kill()
            killed_mid_save = True
            break
        time.sleep(0.001)
    proc.wait()
    assert killed_mid_save
    leftovers = [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "expected the half-written checkpoint to be left under its temporary name"
    last = list_checkpoints(ckpt)[-1][0]
    out = run_script("pretrain.py", *pretrain_args(tmp, "killed", ckpt_interval=1, max_train_iters=last + 1,
                                                   keep_last_ckpts=50, resume="auto"))
    # The run itself says where it continued from: the newest complete checkpoint, not the half-written one.
    assert f"resumed from {ckpt / step_dir_name(last)} at step {last}" in out.stdout
    assert list_checkpoints(ckpt)[-1][0] == last + 1
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]  # cleaned by the next save


def test_full_finetune_two_ranks(tmp, baseline, run_script, write_finetune_data, losses):
    """finetune.py from the pretrained model: its first loss equals an independent computation."""
    write_finetune_data(tmp / "sft")
    args = ["--pretrained_ckpt", baseline[0] / "ckpt" / "final", "--data_dir", tmp / "sft", "--ckpt_dir",
            tmp / "ft" / "ckpt", "--log_dir", tmp / "ft" / "runs", "--micro_batch_size=4", "--gradient_accum_steps=2",
            "--num_epochs=2", "--max_lr=1e-3", "--warmup_steps=1", "--mixed_precision=false", "--device=cpu",
            "--embed_dropout=0", "--attn_dropout=0", "--resid_dropout=0", "--eval_iters=2", "--log_interval=1",
            "--max_seq_length=64"]
    run_script("finetune.py", *args, nproc=2)
    got = losses(tmp / "ft")
    assert len(got) == 2 * 96 // 16  # epochs x steps per epoch (global batch 16)
    assert got[len(got)] < got[1]
    assert load_model(tmp / "ft" / "ckpt" / "final").config.n_layer == 2
    # Step 1 by hand: the same global batch, completion-only loss normalised by its target tokens.
    from custom_dataset import FinetuneLoader
    model = load_model(baseline[0] / "ckpt" / "final").eval()
    loader = FinetuneLoader(tmp / "sft" / "train.jsonl", 4, grad_accum_steps=4, seed=1337, max_seq_length=64)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(4):
            x, y = loader.next_batch()
            _, loss = model(x, targets=y, reduction="sum")
            total, count = total + loss.item(), count + int((y != -100).sum())
    assert abs(got[1] - total / count) <= 1e-4


def packed_args(tmp, baseline, name, **overrides):
    args = {"pretrained_ckpt": baseline[0] / "ckpt" / "final", "data_dir": tmp / "sft", "ckpt_dir": tmp / name / "ckpt",
            "log_dir": tmp / name / "runs", "micro_batch_size": 2, "gradient_accum_steps": 1, "num_epochs": 1,
            "max_seq_length": 64, "pack": "true", "max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1,
            "max_decay_steps": 6, "max_train_iters": 6, "mixed_precision": "false", "device": "cpu",
            "embed_dropout": 0, "attn_dropout": 0, "resid_dropout": 0, "eval_iters": 2, "eval_interval": 3,
            "log_interval": 1, "ckpt_interval": 3, "grad_clip": 1000, **overrides}
    return [f"--{k}={v}" for k, v in args.items()]


def test_packed_finetune_two_ranks_equal_one_rank_resume_and_exact_first_loss(
        tmp, baseline, run_script, write_finetune_data, losses, read_metrics):
    """--pack=true: 2 ranks == 1 rank x 2 accumulation steps, resumed at another world size == uninterrupted,
    and step 1's loss is the mean over the same examples, each run alone (unpacked) through the model."""
    write_finetune_data(tmp / "sft")
    run_script("finetune.py", *packed_args(tmp, baseline, "packed"), nproc=2)
    # 1 rank for 3 steps, then resumed on 2 ranks.
    run_script("finetune.py", *packed_args(tmp, baseline, "packed_split", gradient_accum_steps=2, cpu_threads=1,
                                           max_train_iters=3))
    run_script("finetune.py", *packed_args(tmp, baseline, "packed_split", resume="auto"), nproc=2)
    whole, split = losses(tmp / "packed"), losses(tmp / "packed_split")
    assert sorted(whole) == sorted(split) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(whole[step] - split[step]) <= 1e-4, (step, whole[step], split[step])
    assert whole[6] < whole[1]

    # Step 1 by hand: the rows of the packed global batch, each example alone, unpacked.
    from custom_dataset import FinetuneLoader, finetune_collate
    model = load_model(baseline[0] / "ckpt" / "final").eval()
    loader = FinetuneLoader(tmp / "sft" / "train.jsonl", 4, seed=1337, max_seq_length=64, pack=True)
    total, count, examples = 0.0, 0, 0
    with torch.no_grad():
        for row in range(4):
            for i in loader._row(row):
                x, y = finetune_collate([(loader._prompts[i], loader._completions[i])], max_seq_length=64)
                _, loss = model(x, targets=y, reduction="sum")
                total, count, examples = total + loss.item(), count + int((y != -100).sum()), examples + 1
    assert examples > 4  # rows of several examples
    assert abs(whole[1] - total / count) <= 1e-5
    steps, _ = read_metrics(tmp / "packed" / "runs")
    assert steps[1]["target_tokens_per_sec"] > 0 and 0 <= steps[1]["padding_fraction"] < 0.25


def test_packed_eval_loss_equals_unpacked_on_the_same_checkpoint(tmp, baseline, run_script, write_finetune_data,
                                                                 read_metrics):
    """With the learning rate 0 the weights stay the pretrained ones: the evaluation of --pack=true and of the
    unpacked run score the same examples (eval_iters x micro_batch_size = 8 of the 16) with the same targets."""
    write_finetune_data(tmp / "sft")
    evals, padding = {}, {}
    for pack in ("true", "false"):
        run_script("finetune.py", *packed_args(tmp, baseline, f"eval_{pack}", pack=pack, max_lr=0, min_lr=0,
                                               max_train_iters=1, micro_batch_size=4, eval_iters=2))
        steps, ev = read_metrics(tmp / f"eval_{pack}" / "runs")
        evals[pack], padding[pack] = ev[1], steps[1]["padding_fraction"]
    assert evals["true"]["eval_tokens"] == evals["false"]["eval_tokens"] > 0
    assert abs(evals["true"]["eval_loss"] - evals["false"]["eval_loss"]) <= 1e-5
    assert padding["true"] < padding["false"]


def test_doc_mask_pretraining_first_loss_is_each_document_alone(tmp, run_script, losses):
    """pretrain.py --doc_mask=true: step 1's loss equals the loss of every document piece of the batch run alone
    through the freshly initialised model (the same seed builds the same weights)."""
    run_script("pretrain.py", *pretrain_args(tmp, "docmask", doc_mask="true", max_train_iters=1, eval_interval=0))
    from custom_dataset import PretrainLoader
    from models.gpt2 import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1337)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64)).eval()
    x, y, doc_ids = PretrainLoader([tmp / "data"], "train", 32, 4, seed=1337, doc_mask=True).next_batch()
    total, pieces = 0.0, 0
    with torch.no_grad():
        for b in range(4):
            for d in doc_ids[b].unique().tolist():
                keep = doc_ids[b] == d
                _, loss = model(x[b][keep][None], targets=y[b][keep][None], reduction="sum")
                total, pieces = total + loss.item(), pieces + 1
    assert pieces > 4  # windows crossing document boundaries
    assert abs(losses(tmp / "docmask")[1] - total / y.numel()) <= 1e-5


def test_user_errors_are_one_line(tmp, baseline, capsys):
    import finetune
    import pretrain

    def error_of(main, *args):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        return err

    base = pretrain_args(tmp, "errors")
    assert "build_pretrain_datasets.py" in error_of(pretrain.main, *base, f"--data_dir={tmp / 'nope'}")
    assert "exceeds the model's block_size 128" in error_of(pretrain.main, *base, "--max_seq_length=256")
    assert "not divisible by micro_batch_size x world size = 3 x 1" in error_of(
        pretrain.main, *base, "--micro_batch_size=3", "--global_batch_size=8")
    finished = pretrain_args(tmp, "base")  # the baseline's dirs
    assert "already holds training checkpoints up to step 8; use --resume=auto" in error_of(pretrain.main, *finished)
    assert "was saved from another model (n_layer: checkpoint 2 vs now 12" in error_of(
        pretrain.main, *finished, "--resume=auto", "--model_type=gpt2", "--max_train_iters=9")
    assert "unknown config field --max_iters" in error_of(pretrain.main, "--max_iters=3")
    assert "n_layer: checkpoint 2 vs requested 12" in error_of(
        finetune.main, "--pretrained_ckpt", baseline[0] / "ckpt" / "final", "--model_type=gpt2",
        "--data_dir", tmp / "sft", "--device=cpu")
