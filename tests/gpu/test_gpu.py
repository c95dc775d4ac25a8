"""The CUDA paths that CPU runs never take (skipped without CUDA; `bench/gpu.sh` runs them): nccl (with gloo
beside it for CPU tensors), bf16 FSDP2, torch.compile, activation checkpointing, CPU offload, DCP resume,
LoRA, generation, and the LM-head loss's kernel count."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.loss import linear_cross_entropy
from utils.checkpoints.model import save_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NPROC = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 1
COMMON = ["--device=cuda", "--max_lr=1e-3", "--warmup_steps=1", "--log_interval=1", "--eval_iters=2",
          "--embed_dropout=0.1", "--attn_dropout=0.1", "--resid_dropout=0.1"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, write_pretrain_data, write_finetune_data):
    tmp = tmp_path_factory.mktemp("gpu")
    write_pretrain_data(tmp / "data")
    write_finetune_data(tmp / "sft")
    torch.manual_seed(0)
    save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64)), tmp / "base")
    return tmp


def pretrain_args(tmp, name, **kw):
    args = {"model_type": "gpt2-tiny", "data_dir": tmp / "data", "ckpt_dir": tmp / name / "ckpt",
            "log_dir": tmp / name / "runs", "max_seq_length": 64, "micro_batch_size": 4, "gradient_accum_steps": 2,
            "ckpt_interval": 2, **kw}
    return COMMON + [f"--{k}={v}" for k, v in args.items()]


def finetune_args(tmp, name, **kw):
    args = {"pretrained_ckpt": tmp / "base", "data_dir": tmp / "sft", "ckpt_dir": tmp / name / "ckpt",
            "log_dir": tmp / name / "runs", "micro_batch_size": 4, "gradient_accum_steps": 2, "max_train_iters": 4,
            **kw}
    return COMMON + [f"--{k}={v}" for k, v in args.items()]


def test_bf16_fsdp_compile_checkpointing_and_exact_resume(tmp, run_script, read_metrics):
    fast = dict(compile_model="true", activation_checkpointing="true", mixed_precision="true")
    out = run_script("pretrain.py", *pretrain_args(tmp, "straight", max_train_iters=4, **fast), nproc=NPROC)
    assert "cuda:nccl,cpu:gloo" in out.stdout
    run_script("pretrain.py", *pretrain_args(tmp, "resumed", max_train_iters=2, **fast), nproc=NPROC)
    run_script("pretrain.py", *pretrain_args(tmp, "resumed", max_train_iters=4, resume="auto", **fast), nproc=NPROC)
    a, b = read_metrics(tmp / "straight" / "runs")[0], read_metrics(tmp / "resumed" / "runs")[0]
    assert a[4]["loss"] < a[1]["loss"]
    for step in (3, 4):  # same dropout masks (CUDA RNG restored); attention backward may round differently
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-4)


@pytest.mark.skipif(NPROC < 2, reason="needs 2 GPUs")
def test_cpu_offload_with_two_ranks_clips_and_trains(tmp, run_script, read_metrics):
    """Offloaded gradients are CPU DTensors: clipping reduces them over gloo, beside nccl."""
    run_script("pretrain.py", *pretrain_args(tmp, "offload", max_train_iters=3, cpu_offload="true", grad_clip=0.5),
               nproc=2)
    steps = read_metrics(tmp / "offload" / "runs")[0]
    assert sorted(steps) == [1, 2, 3] and steps[3]["loss"] < steps[1]["loss"]


def test_cpu_offload_with_accumulation_trains_like_resident_shards(tmp, run_script, read_metrics):
    """Issue 20 item 2, on any number of GPUs (one included): with cpu_offload the clipped norm is a CPU tensor
    while the loss is on the GPU (the step read both with one torch.stack: a device mix at step 1). With
    accumulation the sync is deferred by default (--defer_grad_sync=auto); forced per micro-step it must give
    the same numbers, and both must equal a run whose shards stay on the GPU (fp32, no dropout: only the
    optimizer's device differs)."""
    common = dict(max_train_iters=3, mixed_precision="false", grad_clip=0.5, gradient_accum_steps=2,
                  embed_dropout=0, attn_dropout=0, resid_dropout=0)
    run_script("pretrain.py", *pretrain_args(tmp, "resident", **common), nproc=NPROC)
    out = run_script("pretrain.py", *pretrain_args(tmp, "offload_auto", cpu_offload="true", **common), nproc=NPROC)
    assert "gradients are reduce-scattered at the last micro-step only (--defer_grad_sync=auto)" in out.stdout
    run_script("pretrain.py", *pretrain_args(tmp, "offload_eager", cpu_offload="true", defer_grad_sync="false",
                                             **common), nproc=NPROC)
    runs = {name: read_metrics(tmp / name / "runs")[0] for name in ("resident", "offload_auto", "offload_eager")}
    for name in ("offload_auto", "offload_eager"):
        assert sorted(runs[name]) == [1, 2, 3]
        for step in (1, 2, 3):
            for key in ("loss", "grad_norm"):
                assert runs[name][step][key] == pytest.approx(runs["resident"][step][key], rel=1e-3), (name, step)
    assert runs["resident"][1]["grad_norm"] > 0.5  # the clip engaged: the offloaded path scaled CPU gradients
    # Deferred, each rank held full gradients while accumulating (on the GPU); per micro-step, only its shard.
    auto, eager = runs["offload_auto"][1]["memory"]["grads"], runs["offload_eager"][1]["memory"]["grads"]
    assert all(a >= e for a, e in zip(auto, eager)), (auto, eager)
    print("cpu_offload tokens/s at step 3 (defer auto, per micro-step):",  # pytest -s shows it: why auto defers
          [round(runs[n][3]["tokens_per_sec"]) for n in ("offload_auto", "offload_eager")])


def test_compiled_finetune_on_padded_lengths_does_not_recompile_per_length(tmp, run_script):
    out = run_script("finetune.py", *finetune_args(tmp, "ftcompile", compile_model="true"), nproc=NPROC,
                     env={"TORCH_LOGS": "recompiles"})
    text = out.stdout + out.stderr
    assert "recompile_limit" not in text and "cache_size_limit" not in text
    assert text.count("Recompiling function") <= 2, text[-3000:]


def test_lora_finetune(tmp, run_script):
    run_script("finetune_lora.py", *finetune_args(tmp, "lora"), nproc=NPROC)
    assert (tmp / "lora" / "ckpt" / "final" / "adapter.safetensors").exists()


def test_generation_on_cuda_equals_cpu():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny")).eval()
    idx = torch.randint(0, 50257, (2, 5))
    cpu = model.generate(idx, 20, temperature=0)
    gpu = model.cuda().generate(idx.cuda(), 20, temperature=0)
    assert torch.equal(cpu, gpu.cpu())


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_lm_head_loss_on_cuda_matches_and_launches_few_ops():
    """An 8x1024 micro-batch of gpt2 (V padded to 50304): the value of F.cross_entropy, in ~1/30 of the ops."""
    torch.manual_seed(0)
    x = torch.randn(8 * 1024, 768, device="cuda", requires_grad=True)
    w = (0.02 * torch.randn(50304, 768, device="cuda")).requires_grad_()
    t = torch.randint(0, 50257, (8 * 1024,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), _Ops() as ops:
        loss = linear_cross_entropy(x, w, t, vocab_size=50257, reduction="sum")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = F.cross_entropy((x @ w.t())[:, :50257].float(), t, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    assert ops.n < 300, ops.n  # 32-row chunks took ~5,000


def test_packed_rows_on_cuda_run_flex_attention_exactly():
    """doc_ids on CUDA: flex attention with a block-sparse mask (the default there), forward and backward equal
    to each example run alone through the mask-free is_causal path; with attention dropout on, one call per
    example instead (flex attention has no dropout)."""
    from models.attention import DocumentMask
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", block_size=256)).cuda().eval()
    rows = [[100, 60, 90], [256], [17] * 15]  # T = 256: blocks of 128 inside one example, across several, padding
    examples, idx, doc_ids = [], torch.full((3, 256), 50256), torch.zeros(3, 256, dtype=torch.long)
    for b, lengths in enumerate(rows):
        s = 0
        for d, n in enumerate(lengths):
            ex = torch.randint(0, 50257, (n,))
            idx[b, s:s + n], doc_ids[b, s:s + n] = ex, d
            examples.append((b, s, ex.cuda()))
            s += n
        doc_ids[b, s:] = len(lengths)
    idx, doc_ids = idx.cuda(), doc_ids.cuda()
    assert DocumentMask(doc_ids).backend == "flex" and DocumentMask(doc_ids, dropout=True).backend == "segments"
    targets = torch.full_like(idx, -100)
    for b, s, ex in examples:
        targets[b, s:s + len(ex) - 1] = ex[1:]
    logits, loss = model(idx, targets=targets, doc_ids=doc_ids, reduction="sum")
    loss.backward()
    packed_grad = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    model.zero_grad()
    ref_loss = 0
    for b, s, ex in examples:
        alone, part = model(ex[None], targets=torch.cat([ex[1:], ex.new_full((1,), -100)])[None], reduction="sum")
        assert (logits[b, s:s + len(ex)] - alone[0]).abs().max().item() <= 1e-4, (b, s)
        ref_loss = ref_loss + part
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    ref_grad = model.transformer.h[0].attn.c_attn.weight.grad
    assert (packed_grad - ref_grad).abs().max().item() <= 1e-4 * max(1.0, ref_grad.abs().max().item())


def test_packed_finetune_on_cuda_with_compile_and_bf16(tmp, run_script, read_metrics):
    """--pack=true on the GPU: flex attention inside compiled bf16 blocks (attention dropout off), and the
    per-example path with attention dropout on (the note says so)."""
    fast = dict(compile_model="true", mixed_precision="true", max_seq_length=128)
    run_script("finetune.py", *finetune_args(tmp, "packflex", pack="true", attn_dropout=0, **fast), nproc=NPROC)
    out = run_script("finetune.py", *finetune_args(tmp, "packdrop", pack="true", **fast), nproc=NPROC)
    assert "flex attention has no attention dropout" in out.stderr
    for run in ("packflex", "packdrop"):
        steps = read_metrics(tmp / run / "runs")[0]
        assert sorted(steps) == [1, 2, 3, 4] and steps[4]["loss"] < steps[1]["loss"]
        assert steps[1]["padding_fraction"] < 0.25
