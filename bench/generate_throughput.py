"""Generation throughput: our KV-cache `generate` against transformers' `generate`, same weights, one run.

    python bench/generate_throughput.py                      # gpt2 (124M), batch 1, prompt 16, 256 new tokens, greedy
    python bench/generate_throughput.py --config gpt2-medium --repeats 5 --threads 1

Both models hold the same random-init fp32 weights (a transformers GPT2LMHeadModel mapped into
ours). Rows: transformers `generate` (its DynamicCache KV cache); ours as `model.generate` runs on
a freshly built model; ours as generate_pretrained.py / generate_finetuned.py run it (weights in the
CPU decode layout, utils.generation.streaming.decode_layout). Each is warmed up, then all are timed
interleaved, rotating the order each repeat, so load from other processes hits them alike.
Reported: tokens/s (median and best of the repeats) and ratios to transformers. All rows produce
the same greedy tokens (checked).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.gpt2 import PRESETS, GPT2Config, GPT2LMHeadModel  # noqa: E402
from utils.checkpoints.hf_mapping import config_to_hf, hf_to_ours  # noqa: E402
from utils.generation.loading import decode_layout  # noqa: E402
from utils.tokenizer import EOT_TOKEN  # noqa: E402


def build(preset, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config.from_preset(preset)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config))).eval()
    models = []
    for _ in range(2):
        ours = GPT2LMHeadModel(config).eval()
        ours.load_state_dict(hf_to_ours(dict(hf.state_dict()), config), strict=False)
        models.append(ours)
    return hf, models[0], decode_layout(models[1])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt2", choices=sorted(PRESETS), help="model preset, random init (default gpt2)")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row, after one warm-up each (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf, ours, ours_decode = build(args.config)
    assert args.prompt_len + args.new_tokens <= ours.config.block_size, "keep the run inside one context window"
    idx = torch.randint(0, 50257, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens
    # min_new_tokens: never stop early at eos; pad_token_id set only to silence the "no pad token" notice.
    hf_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=EOT_TOKEN)
    runs = {
        "transformers generate": lambda: hf.generate(idx, **hf_kwargs),
        "ours": lambda: ours.generate(idx, n, temperature=0),
        "ours, decode layout (generate_*.py)": lambda: ours_decode.generate(idx, n, temperature=0),
    }
    times = {name: [] for name in runs}
    with torch.inference_mode():
        outs = {name: f() for name, f in runs.items()}  # warm-up
        for name, out in outs.items():
            assert torch.equal(out, outs["transformers generate"]), f"greedy tokens differ: {name} vs transformers"
        order = list(runs)
        for r in range(args.repeats):
            for name in order[r % len(order):] + order[: r % len(order)]:
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)

    print(f"# {args.config}, batch 1, prompt {args.prompt_len}, {n} new tokens, greedy, fp32, "
          f"{args.repeats} repeats interleaved; same greedy tokens on every row")
    print(f"# {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("| implementation | tokens/s (median) | tokens/s (best) | vs transformers (median) |")
    print("|---|---|---|---|")
    base = n / statistics.median(times["transformers generate"])
    for name, ts in times.items():
        med, best = n / statistics.median(ts), n / min(ts)
        print(f"| {name} | {med:.1f} | {best:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
