"""What pretrain.py --doc_mask=true changes, measured small: validation loss after the same steps, and speed.

    python bench/doc_mask_pretrain.py                  # gpt2-mini, windows of 256, micro-batch 8, 150 steps
    python bench/doc_mask_pretrain.py --corpora dialogues --model_type gpt2-tiny --seq_len 128 --steps 150

Two pretraining corpora built with the repo's own scripts from the sample corpora (make_sample_corpora.py):
- "books": Shakespeare's plays and the books of the King James Bible: long documents (tens of thousands
  of tokens each), so a window rarely holds an <|endoftext|>.
- "dialogues": every chatterbot-corpus question and answer as a document of its own (tens of tokens):
  a window of 256 holds several.

For each corpus, pretrain.py trains the model twice from the same seed on the same windows, without and
with --doc_mask=true (the two runs side by side, one thread each). Both final models are then scored on
the same validation windows both ways (plain causal attention over the window, and attention kept within
each document): the loss the in-loop evaluation reports is the diagonal. Speed: one training step
(forward + backward) on the same batches with and without document ids, the two timed interleaved in one
process (--speed_repeats rounds), medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.common import script  # noqa: E402
from custom_dataset import PretrainLoader  # noqa: E402
from utils.checkpoints.model import load_model  # noqa: E402


def build_corpora(work, which):
    raw = os.path.join(work, "raw")
    script("make_sample_corpora.py", "--output", raw)
    out = {}
    if "books" in which:
        script("prepare_data_pretrain.py", "--input", os.path.join(raw, "pretrain"), "--output",
               os.path.join(work, "books_clean"))
        script("build_pretrain_datasets.py", "--input", os.path.join(work, "books_clean"), "--output",
               os.path.join(work, "books"), "--val_fraction", 0.1)
        out["books"] = os.path.join(work, "books")
    if "dialogues" in which:
        prepared = os.path.join(work, "chat_prepared")
        script("prepare_data_finetune.py", "--input", os.path.join(raw, "finetune"), "--output", prepared)
        docs = os.path.join(work, "dialogues_raw")
        os.makedirs(docs)
        with open(os.path.join(prepared, "examples.jsonl"), encoding="utf-8") as f, \
                open(os.path.join(docs, "dialogues.jsonl"), "w", encoding="utf-8") as o:
            for line in f:
                ex = json.loads(line)
                o.write(json.dumps({"text": f"{ex['prompt']}\n{ex['completion']}"}) + "\n")
        script("prepare_data_pretrain.py", "--input", docs, "--output", os.path.join(work, "dialogues_clean"))
        script("build_pretrain_datasets.py", "--input", os.path.join(work, "dialogues_clean"), "--output",
               os.path.join(work, "dialogues"), "--val_fraction", 0.1)
        out["dialogues"] = os.path.join(work, "dialogues")
    return out


def val_loss(model, data_dir, args, doc_mask):
    loader = PretrainLoader([data_dir], "val", args.seq_len, args.batch_size, seed=0, doc_mask=doc_mask)
    total = count = 0
    with torch.no_grad():
        for _ in range(min(args.eval_batches, -(-len(loader) // args.batch_size))):
            x, y, *doc_ids = loader.next_batch()
            _, loss = model(x, targets=y, doc_ids=doc_ids[0] if doc_ids else None, reduction="sum")
            total, count = total + loss.item(), count + y.numel()
    return total / count


def speed(model, data_dir, args):
    """Median seconds of a training forward + backward, plain vs document mask, on the same batches."""
    loader = PretrainLoader([data_dir], "train", args.seq_len, args.batch_size, seed=1, doc_mask=True)
    batches = [loader.next_batch() for _ in range(3)]
    model.train()
    times = {False: [], True: []}
    for r in range(args.speed_repeats + 1):
        for masked in ((False, True) if r % 2 else (True, False)):
            t0 = time.perf_counter()
            for x, y, doc_ids in batches:
                _, loss = model(x, targets=y, doc_ids=doc_ids if masked else None, reduction="sum",
                                return_logits=False)
                loss.backward()
            model.zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                times[masked].append((time.perf_counter() - t0) / len(batches))
    eots = sum(int((doc_ids[:, 1:] != doc_ids[:, :-1]).sum()) for _, _, doc_ids in batches)
    return statistics.median(times[False]), statistics.median(times[True]), eots / (len(batches) * args.batch_size)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default="books,dialogues")
    p.add_argument("--model_type", default="gpt2-mini", help="a small preset of models/gpt2.py")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (pretrain.py's default is 16)")
    p.add_argument("--eval_batches", type=int, default=20)
    p.add_argument("--speed_repeats", type=int, default=5)
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} logical CPUs, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, fp32; load average {os.getloadavg()[0]:.1f}", flush=True)
    work = tempfile.mkdtemp(prefix="doc_mask_bench_")
    corpora = build_corpora(work, args.corpora.split(","))
    rows = []
    for name, data_dir in corpora.items():
        runs, procs = {}, []
        for doc_mask in (False, True):  # the two trainings side by side: the machine's load hits both alike
            runs[doc_mask] = os.path.join(work, f"{name}_{int(doc_mask)}")
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(REPO, "pretrain.py"), f"--model_type={args.model_type}",
                 f"--max_seq_length={args.seq_len}", f"--data_dir={data_dir}", f"--micro_batch_size={args.batch_size}",
                 f"--gradient_accum_steps={args.accum}", f"--max_train_iters={args.steps}", "--max_lr=1e-3",
                 "--min_lr=1e-4", "--warmup_steps=10",
                 "--eval_interval=0", "--eval_iters=2", "--device=cpu", "--mixed_precision=false", "--cpu_threads=1",
                 f"--doc_mask={str(doc_mask).lower()}", f"--ckpt_dir={runs[doc_mask]}/ckpt",
                 f"--log_dir={runs[doc_mask]}/runs", "--ckpt_interval=0"],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        t0 = time.perf_counter()
        if any(p.wait() for p in procs):
            raise SystemExit(f"{name}: a pretrain.py run failed")
        print(f"{name}: trained both in {time.perf_counter() - t0:.0f} s", flush=True)
        models = {m: load_model(os.path.join(run, "ckpt", "final")).eval() for m, run in runs.items()}
        scores = {(trained, scored): val_loss(models[trained], data_dir, args, scored)
                  for trained in (False, True) for scored in (False, True)}
        plain_s, masked_s, eots = speed(models[False], data_dir, args)
        rows.append((name, scores, plain_s, masked_s, eots))

    print(f"\n### {args.model_type}, windows of {args.seq_len}, micro-batch {args.batch_size} x {args.accum} "
          f"accumulation, {args.steps} steps; "
          f"val loss over {args.eval_batches} x {args.batch_size} windows\n")
    print("| corpus | documents starting per window | trained | val loss, scored plain | val loss, scored "
          "doc-masked | step s plain | step s doc-masked |")
    print("|---|---|---|---|---|---|---|")
    for name, scores, plain_s, masked_s, eots in rows:
        for trained in (False, True):
            label = "--doc_mask=true" if trained else "plain"
            print(f"| {name} | {eots:.2f} | {label} | {scores[(trained, False)]:.4f} | {scores[(trained, True)]:.4f} | "
                  f"{plain_s:.3f} | {masked_s:.3f} |")


if __name__ == "__main__":
    main()
