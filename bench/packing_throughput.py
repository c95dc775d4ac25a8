"""Packed against padded fine-tuning: target tokens/s and padding, same model, same examples, one run.

    python bench/packing_throughput.py                     # 6 layers, 6 heads, 384 wide, rows of 256, micro-batch 8
    python bench/packing_throughput.py --examples 512 --repeats 5
    python bench/packing_throughput.py --device cuda --dtype bf16 --seq_len 1024   # the CUDA rows (bench/gpu.sh)

Two data sets with long-tailed lengths, built the way users build theirs:
- "chat": the sample chat set (chatterbot-corpus, make_sample_corpora.py -> prepare_data_finetune.py ->
  build_finetune_datasets.py): short questions and answers, multi-turn ones carrying their history.
- "instruct": the same questions, one in ten given a long context (a King James Bible passage of 60 to
  200 words, from the sample corpora), as in instruction sets with a few long contexts.

Each side trains one pass over the same first --examples examples of the shuffled train split, through
the real loader (custom_dataset.FinetuneLoader, --pack false/true) and the real model call
(model(x, targets, doc_ids, reduction="sum"), backward, AdamW step), micro-batch --batch_size rows
either way (what a user gets by adding --pack=true). Sides: "padded" (the unpacked batches, mask-free
causal attention), and packed rows with each CPU attention path of models/attention.py: "dense" (one
boolean mask) and "segments" (one attention call per example). Flex attention has no backward on the CPU
(torch 2.13: "FlexAttention does not support backward on CPU"), so there it appears in the forward-only
(evaluation) rows, compiled, next to the others. On CUDA the packed sides are "flex" (the default there:
a block-sparse mask, compiled) and "segments" (what runs when attention dropout is on). Batches are
collated before timing (the loader's cost is the same small share on both sides). The sides are timed
interleaved, round after round (the order rotates), so other load on the machine hits each alike;
medians are reported, the factor against padded as the median of the within-round factors.

Target tokens/s = completion tokens (the loss tokens) / seconds; padding = the share of the batches'
positions that hold no token of any example.
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.common import script  # noqa: E402
from custom_dataset import IGNORE_INDEX, FinetuneLoader  # noqa: E402
from models.gpt2 import GPT2Config, GPT2LMHeadModel  # noqa: E402
from utils.prompt_template import format_completion, format_prompt  # noqa: E402
from utils.tokenizer import get_tokenizer  # noqa: E402


def build_data(work, max_seq_len):
    """{name: train.jsonl path} of the two data sets (see the module docstring)."""
    raw, prepared, chat = (os.path.join(work, d) for d in ("raw", "prepared", "chat"))
    script("make_sample_corpora.py", "--output", raw)
    script("prepare_data_finetune.py", "--input", os.path.join(raw, "finetune"), "--output", prepared)
    script("build_finetune_datasets.py", "--input", prepared, "--output", chat, "--max_seq_len", max_seq_len,
           "--val_fraction", 0.05)
    # The instruction set: the prepared questions, one in ten with a long Bible passage as its context.
    with open(os.path.join(raw, "pretrain", "kjv_bible.jsonl"), encoding="utf-8") as f:
        bible = " ".join(json.loads(line)["text"] for line in f).split()
    rng = random.Random(0)
    enc = get_tokenizer()
    instruct = os.path.join(work, "instruct")
    os.makedirs(instruct)
    with open(os.path.join(prepared, "examples.jsonl"), encoding="utf-8") as f, \
            open(os.path.join(instruct, "train.jsonl"), "w") as out:
        for line in f:
            ex = json.loads(line)
            context = None
            if rng.random() < 0.1:
                start, n = rng.randrange(len(bible) - 200), rng.randint(60, 200)
                context = " ".join(bible[start:start + n])
            p = enc.encode_ordinary(format_prompt(ex["prompt"], context=context))
            c = enc.encode_ordinary(format_completion(ex["completion"]))
            if len(c) < max_seq_len:
                out.write(json.dumps({"prompt_ids": p, "completion_ids": c}) + "\n")
    return {"chat": os.path.join(chat, "train.jsonl"), "instruct": os.path.join(instruct, "train.jsonl")}


def batches_of(path, pack, args):
    """The micro-batches of one epoch over the first --examples examples of the train split (loader's
    `limit`), in the loader's shuffled order; the last batch is cut where the epoch ends."""
    loader = FinetuneLoader(path, args.batch_size, seed=args.seed, max_seq_length=args.seq_len, pack=pack,
                            limit=args.examples)
    out = []
    for start in range(0, len(loader), args.batch_size):
        batch = loader.next_batch()
        keep = min(args.batch_size, len(loader) - start)
        out.append(type(batch)(*(t[:keep] for t in batch)))
    return out


def stats(batches):
    targets = sum(int((b[1] != IGNORE_INDEX).sum()) for b in batches)
    positions = sum(b[0].numel() for b in batches)
    if len(batches[0]) == 3:  # packed: the last document of a row is its padding
        real = sum(int((b[2] < b[2].amax(dim=1, keepdim=True)).sum()) for b in batches)
    else:  # padded: a row's tokens end at its last target
        real = sum(int(torch.where(b[1] != IGNORE_INDEX, torch.arange(1, b[1].size(1) + 1), 0).amax(dim=1).sum())
                   for b in batches)
    return {"targets": targets, "positions": positions, "padding": 1 - real / positions, "batches": len(batches)}


def run_pass(model, opt, batches, train, amp):
    device = model.lm_head.weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for b, n_targets in batches:
        x, y, *doc = b
        doc_ids = doc[0] if doc else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), torch.set_grad_enabled(train):
            _, loss = model(x, targets=y, doc_ids=doc_ids, reduction="sum", return_logits=False)
        if train:
            (loss / n_targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=256, help="examples per pass (from the shuffled train split)")
    p.add_argument("--seq_len", type=int, default=256, help="max_seq_length: packed row length, truncation limit")
    p.add_argument("--batch_size", type=int, default=8, help="micro-batch: rows per step, both sides")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--no_flex", action="store_true", help="CPU: skip the compiled flex-attention forward rows")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, as the loop runs it")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    print(f"machine: {os.cpu_count()} logical CPUs, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; "
          f"load average {os.getloadavg()[0]:.1f}")
    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=6, n_head=6, n_embd=384, block_size=args.seq_len, pad_vocab_multiple=64)
    model = GPT2LMHeadModel(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    work = tempfile.mkdtemp(prefix="packing_bench_")
    data = build_data(work, args.seq_len)

    sides, on_device = {}, {}  # (data, side, train) -> (CPU batches, backend); the same batches on the device
    cuda = device.type == "cuda"
    for name, path in data.items():
        padded, packed = batches_of(path, False, args), batches_of(path, True, args)
        assert stats(padded)["targets"] == stats(packed)["targets"], "the sides must see the same examples"
        for batches in (padded, packed):
            on_device[id(batches)] = [(tuple(t.to(device) for t in b), max(int((b[1] != IGNORE_INDEX).sum()), 1))
                                      for b in batches]
        for train in (True, False):
            sides[(name, "padded", train)] = (padded, None)
            for backend in (("flex", "segments") if cuda else ("dense", "segments")):
                sides[(name, backend, train)] = (packed, backend)
            if not cuda and not train and not args.no_flex:
                sides[(name, "flex", train)] = (packed, "flex")

    def run(key, warmup=False):
        batches, backend = sides[key]
        model.doc_attention = backend
        model.train(key[2])
        batches = on_device[id(batches)]
        return run_pass(model, opt, batches[:1] + batches[-1:] if warmup else batches, key[2], args.dtype == "bf16")

    t0 = time.perf_counter()
    for key in sides:  # warm-up (and flex attention's compile: a full and the last, shorter batch) untimed
        run(key, warmup=True)
    print(f"warm-up (flex attention compile included): {time.perf_counter() - t0:.0f} s")
    times = {key: [] for key in sides}
    keys = list(sides)
    for r in range(args.repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[key].append(run(key))
        print(f"\nround {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.1f}; medians so far:",
              flush=True)
        report(sides, times, data, args)


def report(sides, times, data, args):
    for train in (True, False):
        print(f"\n### {'training (forward + backward + AdamW)' if train else 'forward only (evaluation)'}, "
              f"{args.examples} examples, rows of {args.seq_len}, micro-batch {args.batch_size}\n")
        print("| data | side | batches | padding | target tokens | median s | target tokens/s | vs padded |")
        print("|---|---|---|---|---|---|---|---|")
        for name in data:
            base = None
            for side in ("padded", "dense", "segments", "flex"):
                key = (name, side, train)
                if key not in sides:
                    continue
                s = stats(sides[key][0])
                t = statistics.median(times[key])
                base = base or times[key]
                # The factor is taken within each round (the load changes between rounds), then its median.
                factor = statistics.median(b / x for b, x in zip(base, times[key]))
                label = "padded (unpacked)" if side == "padded" else f"packed, {side}"
                print(f"| {name} | {label} | {s['batches']} | {s['padding']:.1%} | {s['targets']:,} | {t:.2f} | "
                      f"{s['targets'] / t:,.0f} | {factor:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
