"""finetune_lora.py for real: 2 gloo ranks vs 1 rank, resume across world sizes, adapter on disk."""
import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.lora import lora_param_count
from utils.checkpoints.adapter import attach_adapter
from utils.checkpoints.model import load_model, save_model


def lora_args(tmp, name, **overrides):
    args = {"pretrained_ckpt": tmp / "base", "data_dir": tmp / "sft", "ckpt_dir": tmp / name / "ckpt",
            "log_dir": tmp / name / "runs", "micro_batch_size": 4, "gradient_accum_steps": 1, "num_epochs": 1,
            "max_seq_length": 64, "lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "lora_targets": "q,v,mlp.c_fc",
            "max_lr": 2e-2, "min_lr": 2e-3, "warmup_steps": 1, "max_decay_steps": 6, "mixed_precision": "false",
            "device": "cpu", "eval_iters": 1, "eval_interval": 3, "log_interval": 1, "ckpt_interval": 3,
            "embed_dropout": 0, "attn_dropout": 0, "resid_dropout": 0, "grad_clip": 1000, **overrides}
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="session")
def losses(read_metrics):
    """{step: train loss} of the run `name` under `tmp`."""
    def losses(tmp, name):
        return {s: r["loss"] for s, r in read_metrics(tmp / name / "runs")[0].items()}
    return losses


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, write_finetune_data):
    tmp = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64)), tmp / "base")
    write_finetune_data(tmp / "sft", n_train=48, n_val=8)
    return tmp


def test_lora_two_ranks_resume_on_one_rank_matches_one_rank_run(tmp, run_script, read_metrics, losses):
    # 2 ranks for 3 of the 6 steps, then resumed on 1 rank (2 accumulation steps: same global batch).
    run_script("finetune_lora.py", *lora_args(tmp, "split", max_train_iters=3), nproc=2)
    run_script("finetune_lora.py", *lora_args(tmp, "split", resume="auto", gradient_accum_steps=2, cpu_threads=1))
    run_script("finetune_lora.py", *lora_args(tmp, "single", gradient_accum_steps=2, cpu_threads=1))
    split, single = losses(tmp, "split"), losses(tmp, "single")
    assert sorted(split) == sorted(single) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(split[step] - single[step]) <= 1e-4, (step, split[step], single[step])
    assert single[6] < single[1] - 0.5  # it learns

    n_lora = lora_param_count(GPT2Config.from_preset("gpt2-tiny"), 4, ("q", "v", "mlp.c_fc"))
    memory = read_metrics(tmp / "split" / "runs")[0][1]["memory"]
    # Optimizer state: exp_avg + exp_avg_sq of the LoRA factors only (fp32), sharded over the 2 ranks,
    # plus one 4-byte step counter per parameter tensor.
    n_tensors = 2 * 2 * 3  # layers x (A, B) x (q, v, c_fc)
    assert sum(memory["optimizer"]) == 8 * n_lora + 2 * 4 * n_tensors
    assert all(abs(b - 4 * n_lora) < 0.1 * 4 * n_lora for b in memory["optimizer"])

    # Training checkpoints hold only the LoRA tensors; the frozen base is never written again.
    ckpt = tmp / "split" / "ckpt" / "step_00000006"
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)

    # The adapter: r/alpha/targets stored; on the untouched base it reproduces the trained model.
    adapter = tmp / "single" / "ckpt" / "final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["alpha"], config["targets"]) == (4, 16.0, ["q", "v", "mlp.c_fc"])
    base = load_model(tmp / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, _ = attach_adapter(base, adapter, tmp / "base")
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, before[k]), k
    run_script("convert_lora_checkpoint.py", "--base", tmp / "base", "--lora", adapter, "--output", tmp / "merged")
    merged = load_model(tmp / "merged").eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert (merged(idx)[0] - model.eval()(idx)[0]).abs().max().item() <= 1e-5


def test_lora_with_packing_two_ranks_equal_one_rank_and_learns(tmp, run_script, read_metrics, losses):
    """--pack=true with LoRA: packed rows at 2 ranks == 1 rank x 2 accumulation steps; it learns."""
    packed = {"pack": "true", "micro_batch_size": 2, "max_train_iters": 6}
    run_script("finetune_lora.py", *lora_args(tmp, "packed2", **packed), nproc=2)
    run_script("finetune_lora.py", *lora_args(tmp, "packed1", gradient_accum_steps=2, cpu_threads=1, **packed))
    two, one = losses(tmp, "packed2"), losses(tmp, "packed1")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(two[step] - one[step]) <= 1e-4, (step, two[step], one[step])
    assert one[6] < one[1] - 0.5
    steps, evals = read_metrics(tmp / "packed1" / "runs")
    assert steps[1]["padding_fraction"] < 0.25 and evals[6]["eval_loss"] < 20
    assert (tmp / "packed1" / "ckpt" / "final" / "adapter.safetensors").is_file()
