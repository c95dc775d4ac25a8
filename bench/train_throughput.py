"""Training throughput: ours against transformers.GPT2LMHeadModel, same weights, same batch, one run.

    python bench/train_throughput.py                         # 6 layers, 6 heads, 384 wide, block 256, micro-batch 8
    python bench/train_throughput.py --config gpt2 --batch_size 4   # the 124M gpt2 config at block 1024
    python bench/train_throughput.py --dtypes bf16 --modes eager --profile

One training step = forward + backward + AdamW step + zero_grad, exactly as the training loop
does it: bf16 autocast ("bf16") or plain fp32 ("fp32"), loss summed over the target tokens and
divided by their count. transformers computes its loss its own way (`labels`, `shift_labels`,
`num_items_in_batch`: fp32 logits, F.cross_entropy); ours is called as the loop calls it, with
`return_logits=False` (chunked cross-entropy, models/loss.py) and the vocabulary padded to a
multiple of 64. Both use the same AdamW (fused where torch has it). Ours runs eager and with
each block torch.compile'd (`--modes`); compile time is the first step's wall time minus a
steady step, reported on its own.

Every variant is warmed up, then all are timed interleaved, round after round (the order
rotates), so load from other processes hits every side alike; the ratio to transformers is
taken within each round and its median reported. MFU = tokens/s × model FLOPs per token
(utils/training/metrics.py: 6·N + 12·L·T·d) ÷ the peak FLOP/s of a 2048³ matmul in the same dtype,
measured in every round of this run (the best of all rounds is used: the conservative choice).
On a shared machine, rounds whose matmul peak fell below 80% of the run's best are counted as
disturbed and left out of the medians (the best of all rounds is printed too). Compile time is
a cold compile (fresh inductor cache) unless --warm_compile_cache.
"""
import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.gpt2 import GPT2Config, GPT2LMHeadModel  # noqa: E402
from models.loss import IGNORE_INDEX  # noqa: E402
from utils.checkpoints.hf_mapping import config_to_hf, hf_to_ours  # noqa: E402
from utils.hardware import measure_matmul_flops, tune_cpu_allocator  # noqa: E402
from utils.training.metrics import mfu, model_flops_per_token  # noqa: E402

CONFIGS = {
    "default": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s, matched in order against
# torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM part).
DATASHEET_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                  ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12)]


def datasheet_bf16(device):
    """(GPU name, datasheet dense bf16 FLOP/s or None) of a CUDA device."""
    name = torch.cuda.get_device_name(device)
    return name, next((flops for key, flops in DATASHEET_BF16 if key in name), None)


def cpu_model_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_models(args, device):
    torch.manual_seed(args.seed)
    config = GPT2Config(**CONFIGS[args.config], pad_vocab_multiple=args.pad_vocab_multiple,
                        embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    if args.block_size:
        config.block_size = args.block_size
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config)))
    ours = GPT2LMHeadModel(config)
    ours.load_state_dict(hf_to_ours(dict(hf.state_dict()), config), strict=False)  # lm_head is tied to wte
    return config, hf.to(device).train(), ours.to(device).train()


def make_optimizer(model, args, device):
    kind = {"fused": True} if args.optimizer == "fused" else {"foreach": True}
    if args.optimizer == "fused" and device.type not in ("cuda", "cpu"):
        kind = {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, **kind)


def loss_of(model, is_hf, x, y, n_targets):
    if is_hf:  # transformers' own causal-LM loss; shift_labels: our targets are already shifted
        return model(input_ids=x, labels=y, shift_labels=y, num_items_in_batch=n_targets).loss
    _, loss = model(x, targets=y, reduction="sum", return_logits=False)
    return loss / n_targets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, opt, is_hf, x, y, amp, device):
    n_targets = (y != IGNORE_INDEX).sum()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_of(model, is_hf, x, y, n_targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def timed(fn, steps, device):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def check_same_loss(hf, ours, x, y, device):
    """Same weights, same batch: the two losses agree (before any optimizer step)."""
    n = (y != IGNORE_INDEX).sum()
    out = {}
    for amp in (False, True):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out[amp] = (loss_of(hf, True, x, y, n).item(), loss_of(ours, False, x, y, n).item())
    print(f"loss before training: fp32 transformers {out[False][0]:.6f} ours {out[False][1]:.6f}; "
          f"bf16 transformers {out[True][0]:.4f} ours {out[True][1]:.4f}")
    assert abs(out[False][0] - out[False][1]) < 1e-4, "fp32 losses differ: the models are not the same"
    assert abs(out[True][0] - out[True][1]) < 2e-2, "bf16 losses differ: the models are not the same"


def profile_step(step, label, rows, tries=3):
    """torch.profiler table of one step: the fastest of `tries` (the least disturbed by other processes)."""
    from torch.profiler import ProfilerActivity, profile
    best = None
    for _ in range(tries):
        with profile(activities=[ProfilerActivity.CPU]
                     + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])) as prof:
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, prof)
    print(f"\n### torch.profiler, one step: {label} ({best[0]:.2f} s under the profiler)\n")
    print(best[1].key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", choices=sorted(CONFIGS),
                   help="default: 6 layers, 6 heads, 384 wide, block 256; gpt2: the 124M config, block 1024")
    p.add_argument("--block_size", type=int, default=None, help="override the config's block size (= sequence length)")
    p.add_argument("--batch_size", type=int, default=8, help="micro-batch (sequences per step)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16 (autocast) and fp32")
    p.add_argument("--modes", default="eager,compile", help="comma list of our modes: eager, compile (per block)")
    p.add_argument("--steps", type=int, default=2, help="steps per timed measurement")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of measurements")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--optimizer", default="fused", choices=["fused", "foreach"],
                   help="AdamW implementation, both sides")
    p.add_argument("--pad_vocab_multiple", type=int, default=64, help="our vocab padding (transformers keeps 50257)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--malloc", default="default", choices=["default", "tuned"],
                   help="tuned: utils.hardware.tune_cpu_allocator() for the whole process (both sides), "
                        "as the loop may")
    p.add_argument("--warm_compile_cache", action="store_true",
                   help="reuse the inductor cache on disk (default: a fresh one, so compile time is a cold compile)")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler tables of one step (ours eager, transformers)")
    p.add_argument("--profile_rows", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "tuned" and not tune_cpu_allocator():
        print("note: could not tune the allocator (not glibc)")
    if not args.warm_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cache_")
    device = torch.device(args.device)
    dtypes = [d for d in args.dtypes.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    assert set(dtypes) <= {"bf16", "fp32"} and set(modes) <= {"eager", "compile"} and modes

    config, hf, ours = build_models(args, device)
    T = config.block_size
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randint(0, config.vocab_size, (args.batch_size, T), generator=g).to(device)
    y = torch.randint(0, config.vocab_size, (args.batch_size, T), generator=g).to(device)
    tokens = x.numel()
    flops_tok = model_flops_per_token(config, T)
    print(f"machine: {cpu_model_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, device {device}")
    print(f"config: {args.config} (n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
          f"vocab={config.vocab_size}, ours padded to {config.padded_vocab_size}), block {T}, micro-batch "
          f"{args.batch_size} = {tokens} tokens/step; transformers attention: {hf.config._attn_implementation}; "
          f"AdamW {args.optimizer}; allocator {args.malloc}")
    print(f"model FLOPs per token (6·N + 12·L·T·d): {flops_tok / 1e6:.1f} M")
    check_same_loss(hf, ours, x, y, device)

    # Variants: (name, model, is_hf). Ours compiled is a deep copy with each block torch.compile'd.
    models = [("transformers eager", hf, True)]
    if "eager" in modes:
        models.append(("ours eager", ours, False))
    if "compile" in modes:
        ours_c = copy.deepcopy(ours)
        # as utils/training/parallelize.py does: one compiled graph serves every block
        for block in ours_c.transformer.h:
            block.compile(dynamic=False)
        models.append(("ours compile", ours_c, False))
    if "eager" not in modes:
        del ours
    opts = {name: make_optimizer(m, args, device) for name, m, _ in models}

    variants, compile_s = [], {}
    for dt in dtypes:
        amp = dt == "bf16"
        for name, m, is_hf in models:
            step = make_step(m, opts[name], is_hf, x, y, amp, device)
            first = timed(step, 1, device)
            for _ in range(max(0, args.warmup - 1)):
                step()
            if name == "ours compile":
                compile_s[dt] = first - min(timed(step, 1, device) for _ in range(2))
            variants.append((dt, name, step))
            print(f"warmed up {dt} {name} (first step {first:.1f}s)", flush=True)

    peak_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}
    times = {(dt, name): [] for dt, name, _ in variants}
    peaks = {dt: [] for dt in dtypes}
    for r in range(args.repeats):
        for dt in dtypes:
            peaks[dt].append(measure_matmul_flops(peak_dtype[dt], device))
        k = r % len(variants)
        for dt, name, step in variants[k:] + variants[:k]:
            times[(dt, name)].append(timed(step, args.steps, device))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{dt} {n} {tokens / times[(dt, n)][-1]:.0f}"
                                                           for dt, n, _ in variants) + " tok/s", flush=True)

    # A round whose matmul peak fell below 80% of the run's best shared the CPU with other work:
    # its times say more about the neighbours than about the models, so the medians skip it.
    quiet = [r for r in range(args.repeats) if all(peaks[dt][r] >= 0.8 * max(peaks[dt]) for dt in dtypes)] \
        or list(range(args.repeats))
    date = datetime.date.today().isoformat()
    print(f"\n### Training throughput, {args.config} config, block {T}, micro-batch {args.batch_size}, "
          f"allocator {args.malloc} ({date})\n")
    print(f"quiet rounds (matmul peak >= 80% of the best): {[r + 1 for r in quiet]} of {args.repeats}\n")
    print("| precision | model | tokens/s (median, quiet rounds) | tokens/s (best) "
          "| × transformers (median of quiet rounds) | MFU (median) | compile |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dt in dtypes:
        peak = max(peaks[dt])
        hf_t = times[(dt, "transformers eager")]
        for dt2, name, _ in variants:
            if dt2 != dt:
                continue
            ts = times[(dt, name)]
            med = tokens / statistics.median(ts[r] for r in quiet)
            best = tokens / min(ts)
            ratios = [hf_t[r] / ts[r] for r in quiet]
            per_round = ", ".join(f"{x:.2f}" for x in ratios) if name != "transformers eager" else ""
            ratio = f"{statistics.median(ratios):.2f}" + (f" ({per_round})" if len(ratios) > 1 and per_round else "")
            comp = f"{compile_s[dt]:.0f} s" if name == "ours compile" else ""
            print(f"| {dt} | {name} | {med:,.0f} | {best:,.0f} | {ratio} | "
                  f"{100 * mfu(med, flops_tok, peak):.0f} % | {comp} |")
    for dt in dtypes:
        print(f"\nmeasured {dt} matmul peak (2048³) per round: "
              + ", ".join(f"{x / 1e9:.0f}" for x in peaks[dt]) + " GFLOP/s; MFU uses the best")
    print("MFU = median tokens/s of the quiet rounds × model FLOPs per token ÷ best measured matmul peak "
          "of the same dtype.")

    if device.type == "cuda" and "bf16" in dtypes:
        name, sheet = datasheet_bf16(device)
        if sheet is None:
            print(f"no datasheet bf16 peak known for {name}: add it to DATASHEET_BF16")
        else:
            rates = {n: tokens / statistics.median(times[("bf16", n)][r] for r in quiet)
                     for dt, n, _ in variants if dt == "bf16"}
            print(f"MFU against the datasheet bf16 peak of the {name} ({sheet / 1e12:.0f} TFLOP/s dense): "
                  + ", ".join(f"{n} {100 * mfu(rate, flops_tok, sheet):.1f} %" for n, rate in rates.items()))

    if args.profile:
        for dt in dtypes:
            for dt2, name, step in variants:
                if dt2 == dt and name in ("ours eager", "transformers eager"):
                    profile_step(step, f"{dt} {name}", args.profile_rows)


if __name__ == "__main__":
    main()
