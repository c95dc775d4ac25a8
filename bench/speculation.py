"""Prompt-lookup speculation on a trained checkpoint: acceptance rate and speed-up over plain greedy decoding.

    python bench/speculation.py --checkpoint quickstart/checkpoints/pretrain/final --val_data quickstart/data/built
    python bench/speculation.py --checkpoint quickstart/checkpoints/merged \
        --examples quickstart/data/finetune_clean/examples.jsonl --quantize int8 --compile

--val_data: prompts are windows of held-out text (val.bin), `--prompt_len` tokens each, spread evenly
over the file. --examples: prompts are fine-tuning questions (a cleaned examples.jsonl, the first
`--prompts` distinct questions) in the fine-tuning template, measured twice: the question alone, and
with a context that holds the answer (the example's own context, else its answer text), as in
extractive question answering, the case prompt lookup is for. Each prompt is decoded greedily with
prepare_for_decode's decoder, without and with speculate="lookup", interleaved. In fp32 the outputs must
be equal (checked); with int8 the row reports how many were (docs/decoding.md, Limits: int8 widens the
near-ties that a 9-row check and a 1-row step can round differently). `--new_tokens` are generated
whatever the text (no stop at the end marker).
"""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.checkpoints.model import load_model  # noqa: E402
from utils.generation.loading import prepare_for_decode  # noqa: E402
from utils.prompt_template import format_prompt  # noqa: E402
from utils.tokenizer import get_tokenizer  # noqa: E402


def text_windows(val_data, n, length):
    tokens = np.fromfile(os.path.join(val_data, "val.bin"), dtype=np.uint16).astype(np.int64)
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(int)
    return [tokens[s:s + length].tolist() for s in starts]


def question_prompts(path, n):
    """(questions alone, questions with a context holding the answer) as token lists."""
    enc, seen, alone, with_context = get_tokenizer(), set(), [], []
    with open(path) as f:
        for line in f:
            ex = json.loads(line)
            if ex["prompt"] in seen or ex.get("history"):
                continue
            seen.add(ex["prompt"])
            alone.append(enc.encode_ordinary(format_prompt(ex["prompt"])))
            with_context.append(enc.encode_ordinary(format_prompt(ex["prompt"], ex.get("context") or ex["completion"])))
            if len(alone) == n:
                break
    return alone, with_context


def measure(plain, spec, prompts, n):
    """Tokens/s of both decoders over the prompts (interleaved) and the speculative decoder's counts."""
    spec.decode_plan["stats"] = {"forwards": 0, "drafted": 0, "accepted": 0}
    t_plain = t_spec = 0.0
    same = 0
    with torch.inference_mode():
        for ids in prompts:
            idx = torch.tensor([ids])
            t0 = time.perf_counter()
            a = plain.generate(idx, n, temperature=0)
            t1 = time.perf_counter()
            b = spec.generate(idx, n, temperature=0)
            t2 = time.perf_counter()
            equal = torch.equal(a, b)
            assert equal or spec.decode_plan["quantize"] != "none", "fp32 speculative output differs from plain greedy"
            same += equal
            t_plain, t_spec = t_plain + t1 - t0, t_spec + t2 - t1
    s, total = spec.decode_plan["stats"], n * len(prompts)
    rate, per_forward = s["accepted"] / max(1, s["drafted"]), (total - len(prompts)) / max(1, s["forwards"])
    return (f"{total / t_plain:.1f} | {total / t_spec:.1f} | {t_plain / t_spec:.2f}x | {s['drafted']} | "
            f"{s['accepted']} | {rate:.0%} | {per_forward:.2f} | {same}/{len(prompts)} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--val_data", help="built dataset dir (val.bin): held-out text windows as prompts")
    source.add_argument("--examples", help="cleaned fine-tuning examples.jsonl: questions as prompts")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt_len", type=int, default=96, help="--val_data: tokens per prompt")
    p.add_argument("--new_tokens", type=int, default=96)
    p.add_argument("--quantize", default="none", choices=("none", "int8"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.val_data:
        sets = {f"held-out text ({args.prompt_len} tokens)": text_windows(args.val_data, args.prompts, args.prompt_len)}
    else:
        alone, with_context = question_prompts(args.examples, args.prompts)
        sets = {"questions": alone, "questions + context holding the answer": with_context}
    base = load_model(args.checkpoint)
    plain = prepare_for_decode(copy.deepcopy(base), quantize=args.quantize, compile=args.compile)
    spec = prepare_for_decode(copy.deepcopy(base), quantize=args.quantize, compile=args.compile, speculate="lookup")
    n = args.new_tokens
    for prompts in sets.values():  # warm-up: compilation for every prompt bucket, the caches' first touch
        measure(plain, spec, prompts, n)
    rows = {name: measure(plain, spec, prompts, n) for name, prompts in sets.items()}
    print(f"# {args.checkpoint}: {args.prompts} prompts per row, {n} new tokens each, greedy, quantize "
          f"{args.quantize}, compile {args.compile}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| prompts | plain tokens/s | lookup tokens/s | speed-up | drafted | accepted | acceptance | "
          "new tokens per forward | outputs equal to plain greedy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row}")


if __name__ == "__main__":
    main()
