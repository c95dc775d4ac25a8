"""Prompt-lookup speculation on a trained checkpoint: acceptance rate and speed-up over plain greedy decoding.

    python bench/speculation.py --checkpoint quickstart/checkpoints/merged --val_data quickstart/data/built
    python bench/speculation.py --checkpoint out/final --val_data data/built --prompts 8 --new_tokens 128 --compile

Prompts are windows of held-out text (val.bin: text the model did not train on), `--prompt_len` tokens
each, spread evenly over the file. Each prompt is decoded greedily with prepare_for_decode's decoder,
without and with speculate="lookup", interleaved; the outputs must be equal (checked).
"""
import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.checkpoints.model import load_model  # noqa: E402
from utils.generation.loading import prepare_for_decode  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--val_data", required=True, help="built dataset dir (val.bin)")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt_len", type=int, default=96)
    p.add_argument("--new_tokens", type=int, default=96)
    p.add_argument("--quantize", default="none", choices=("none", "int8"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = np.fromfile(os.path.join(args.val_data, "val.bin"), dtype=np.uint16).astype(np.int64)
    starts = np.linspace(0, len(tokens) - args.prompt_len - 1, args.prompts).astype(int)
    prompts = [torch.from_numpy(tokens[s:s + args.prompt_len])[None] for s in starts]
    base = load_model(args.checkpoint)
    plain = prepare_for_decode(copy.deepcopy(base), quantize=args.quantize, compile=args.compile)
    spec = prepare_for_decode(copy.deepcopy(base), quantize=args.quantize, compile=args.compile, speculate="lookup")
    n = args.new_tokens
    plain.generate(prompts[0], n, temperature=0)  # warm-up (and compilation)
    spec.generate(prompts[0], n, temperature=0)
    spec.decode_plan["stats"] = {"forwards": 0, "drafted": 0, "accepted": 0}
    t_plain = t_spec = 0.0
    with torch.inference_mode():
        for idx in prompts:
            t0 = time.perf_counter()
            a = plain.generate(idx, n, temperature=0)
            t1 = time.perf_counter()
            b = spec.generate(idx, n, temperature=0)
            t2 = time.perf_counter()
            assert torch.equal(a, b), "speculative output differs from plain greedy"
            t_plain, t_spec = t_plain + t1 - t0, t_spec + t2 - t1
    s = spec.decode_plan["stats"]
    total = n * len(prompts)
    print(f"# {args.checkpoint}: {len(prompts)} prompts of {args.prompt_len} held-out tokens, {n} new tokens each, "
          f"greedy, quantize {args.quantize}, compile {args.compile}, {torch.get_num_threads()} threads; "
          f"outputs equal to plain greedy")
    print("| plain tokens/s | lookup tokens/s | speed-up | drafted | accepted | acceptance | new tokens per forward |")
    print("|---|---|---|---|---|---|---|")
    rate, per_forward = s["accepted"] / max(1, s["drafted"]), (total - len(prompts)) / max(1, s["forwards"])
    print(f"| {total / t_plain:.1f} | {total / t_spec:.1f} | {t_plain / t_spec:.2f}x | {s['drafted']} | "
          f"{s['accepted']} | {rate:.0%} | {per_forward:.2f} |")


if __name__ == "__main__":
    main()
