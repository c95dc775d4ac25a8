"""Generation throughput: our decoders against transformers' `generate`, same weights, one run, interleaved.

    python bench/generate_throughput.py --threads 1         # gpt2 (124M), batch 1, prompt 16, 256 new tokens, greedy
    python bench/generate_throughput.py                     # torch's default thread count
    python bench/generate_throughput.py --rows "transformers generate,ours int8 + compile" --repeats 5

Both sides hold the same random-init fp32 weights (a transformers GPT2LMHeadModel mapped into ours).
Rows (--rows picks some):
  transformers generate                 eager fp32, DynamicCache: the baseline every ratio is against
  transformers bf16                     the same in bf16 weights
  transformers static cache + compile   cache_implementation="static", forward under torch.compile
  ours                                  model.generate as the generation scripts ran it before issue 23
                                        (growing cache, decode layout)
  ours compile                          prepare_for_decode(model, compile=True): static cache, compiled, fp32
  ours int8                             prepare_for_decode(model, quantize="int8"), eager
  ours int8 + compile                   prepare_for_decode(model, quantize="int8", compile=True): the target row
Each row is warmed up once (that call includes compilation: reported as start-up), then all rows are
timed interleaved, rotating the order each repeat, so load from other processes hits them alike.
fp32 rows must give transformers' greedy tokens (checked); bf16 and int8 rows report how many of the
new tokens agree with it before the first difference.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.gpt2 import PRESETS, GPT2Config, GPT2LMHeadModel  # noqa: E402
from utils.checkpoints.hf_mapping import config_to_hf, hf_to_ours  # noqa: E402
from utils.generation.loading import decode_layout, prepare_for_decode  # noqa: E402
from utils.tokenizer import EOT_TOKEN  # noqa: E402

ROWS = ("transformers generate", "transformers bf16", "transformers static cache + compile", "ours", "ours compile",
        "ours int8", "ours int8 + compile")
EXACT = ("transformers static cache + compile", "ours", "ours compile")  # fp32: same tokens as the baseline


def build(preset, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config.from_preset(preset)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config))).eval()
    ours = GPT2LMHeadModel(config).eval()
    ours.load_state_dict(hf_to_ours(dict(hf.state_dict()), config), strict=False)
    return hf, ours


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def timed(f, device):
    """f() and its wall time, the GPU's queue drained on both sides."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = f()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def make_rows(names, hf, ours, idx, n):
    # min_new_tokens: never stop early at eos; pad_token_id set only to silence the "no pad token" notice.
    hf_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=EOT_TOKEN)
    rows = {}
    for name in names:
        if name == "transformers generate":
            rows[name] = lambda: hf.generate(idx, **hf_kwargs)
        elif name == "transformers bf16":
            hf16 = copy.deepcopy(hf).to(torch.bfloat16)
            rows[name] = lambda m=hf16: m.generate(idx, **hf_kwargs)
        elif name == "transformers static cache + compile":
            hfc = copy.deepcopy(hf)
            hfc.generation_config.cache_implementation = "static"
            hfc.forward = torch.compile(hfc.forward, dynamic=False)
            rows[name] = lambda m=hfc: m.generate(idx, **hf_kwargs)
        else:
            model = decode_layout(copy.deepcopy(ours))
            if name != "ours":
                model = prepare_for_decode(model, quantize="int8" if "int8" in name else None,
                                           compile="compile" in name)
            rows[name] = lambda m=model: m.generate(idx, n, temperature=0)
    return rows


def agree(a, b, start):
    """New tokens of a and b that agree before the first difference."""
    a, b = a[0, start:].tolist(), b[0, start:].tolist()
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt2", choices=sorted(PRESETS), help="model preset, random init (default gpt2)")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row, after one warm-up each (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    args = p.parse_args()
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown or "transformers generate" not in names:
        p.error(f"--rows: unknown {unknown}; 'transformers generate' (the baseline) must be one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf, ours = build(args.config)
    hf, ours = hf.to(args.device), ours.to(args.device)
    assert args.prompt_len + args.new_tokens <= ours.config.block_size, "keep the run inside one context window"
    idx = torch.randint(0, 50257, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(args.device)
    n = args.new_tokens
    runs = make_rows(names, hf, ours, idx, n)
    times = {name: [] for name in runs}
    startup, outs = {}, {}
    with torch.inference_mode():
        for name, f in runs.items():  # warm-up: the first call compiles where a row compiles
            outs[name], startup[name] = timed(f, args.device)
            print(f"# warm-up {name}: {startup[name]:.1f} s", file=sys.stderr, flush=True)
        base = outs["transformers generate"]
        for name in EXACT:
            if name in outs:
                assert torch.equal(outs[name], base), f"greedy tokens differ: {name} vs transformers"
        order = list(runs)
        for r in range(args.repeats):
            for name in order[r % len(order):] + order[: r % len(order)]:
                times[name].append(timed(runs[name], args.device)[1])

    print(f"# {args.config}, batch 1, prompt {args.prompt_len}, {n} new tokens, greedy, "
          f"{args.repeats} repeats interleaved")
    if args.device == "cuda":
        print(f"# {torch.cuda.get_device_name()}")
    print(f"# {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at the end, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("| implementation | tokens/s (median) | tokens/s (best) | vs transformers (median) | first call (s) | "
          "new tokens equal to transformers' |")
    print("|---|---|---|---|---|---|")
    base_rate = n / statistics.median(times["transformers generate"])
    for name, ts in times.items():
        med, best = n / statistics.median(ts), n / min(ts)
        same = agree(outs[name], base, args.prompt_len)
        print(f"| {name} | {med:.1f} | {best:.1f} | {med / base_rate:.2f}x | {startup[name]:.1f} | "
              f"{'all' if same == n else f'first {same}'} |")


if __name__ == "__main__":
    main()
