"""DPO on the quickstart's chat model: does it learn which answer belongs to which question, and keep its answers?

    python bench/dpo_demo.py                          # needs a finished quickstart (bash quickstart.sh)
    python bench/dpo_demo.py --quickstart DIR --negatives 6 --beta 0.5 --max_lr 2e-5 --epochs 2

Pairs from the quickstart's prepared chat data (DIR/finetune_clean/examples.jsonl): for every example, the
chosen answer is its own and each rejected one another question's answer (drawn with a seeded generator, never
an answer the same question also has). Then the repo's own scripts, as a user runs them: prepare_data_finetune.py,
build_finetune_datasets.py (10% of the pairs held out), finetune_dpo.py from DIR/checkpoints/merged (full DPO
unless --lora_r), and the quickstart's answers check (12 trained questions, greedy, exact match) before and after.
Prints one table row: held-out rewards/accuracies and margins (step 0 -> first eval -> last), exact match
before -> after, wall time. docs/dpo.md's demonstration table is made of these rows.
"""
import argparse
import json
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.common import script  # noqa: E402


def make_pairs(examples_path, negatives, seed):
    """[{"prompt", "chosen", "rejected"[, "context"][, "history"]}]: each example with `negatives` other answers."""
    with open(examples_path) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    answers_of = {}
    for ex in examples:
        answers_of.setdefault(ex["prompt"], set()).add(ex["completion"])
    pool = sorted({ex["completion"] for ex in examples})
    rng = random.Random(seed)
    pairs = []
    for ex in examples:
        wrong = [a for a in pool if a not in answers_of[ex["prompt"]]]
        for rejected in rng.sample(wrong, min(negatives, len(wrong))):
            pair = {"prompt": ex["prompt"], "chosen": ex["completion"], "rejected": rejected}
            pair.update({k: ex[k] for k in ("context", "history") if ex.get(k)})
            pairs.append(pair)
    return pairs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", default=os.path.join(REPO, "quickstart"), help="a finished quickstart's --out")
    p.add_argument("--out", default="/tmp/dpo_demo", help="where pairs, checkpoints and logs go (replaced)")
    p.add_argument("--negatives", type=int, default=6, help="rejected answers per example (default: 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss_type", default="sigmoid")
    p.add_argument("--sft_weight", type=float, default=0.0, help="RPO's NLL term on the chosen answers (default: 0)")
    p.add_argument("--max_lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lora_r", type=int, default=0)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args()

    import shutil

    from quickstart import answers_demo
    from utils.training.metrics import read_metrics

    qs = os.path.abspath(args.quickstart)
    merged, ft_built = f"{qs}/checkpoints/merged", f"{qs}/finetune_built"
    if not os.path.isdir(merged):
        p.error(f"{merged} does not exist: run the quickstart first (bash quickstart.sh)")
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(f"{args.out}/raw")
    pairs = make_pairs(f"{qs}/finetune_clean/examples.jsonl", args.negatives, args.seed)
    with open(f"{args.out}/raw/pairs.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in pairs)
    script("prepare_data_finetune.py", "--input", f"{args.out}/raw/pairs.jsonl", "--output", f"{args.out}/prepared",
           quiet=False)
    script("build_finetune_datasets.py", "--input", f"{args.out}/prepared", "--output", f"{args.out}/built",
           "--max_seq_len", 128, "--val_fraction", 0.1, quiet=False)
    print("\nbefore DPO:", flush=True)
    before = answers_demo(merged, ft_built, 12, 4, 40)
    t0 = time.time()
    script("finetune_dpo.py", f"--pretrained_ckpt={merged}", f"--data_dir={args.out}/built",
           f"--beta={args.beta}", f"--loss_type={args.loss_type}", f"--sft_weight={args.sft_weight}",
           f"--max_lr={args.max_lr}",
           f"--min_lr={args.max_lr / 10}", f"--num_epochs={args.epochs}", f"--lora_r={args.lora_r}",
           f"--micro_batch_size={args.micro_batch_size}", "--gradient_accum_steps=1", "--warmup_steps=5",
           "--max_seq_length=128", "--eval_interval=25", "--eval_iters=100", "--ckpt_interval=1000",
           "--log_interval=25", f"--ckpt_dir={args.out}/ckpt", f"--log_dir={args.out}/runs",
           nproc=args.nproc, quiet=False)
    seconds = time.time() - t0
    final = f"{args.out}/ckpt/final"
    if args.lora_r:
        script("convert_lora_checkpoint.py", "--base", merged, "--lora", final, "--output", f"{args.out}/merged",
               quiet=False)
        final = f"{args.out}/merged"
    print("\nafter DPO:", flush=True)
    after = answers_demo(final, ft_built, 12, 4, 40)
    train_steps, evals = read_metrics(f"{args.out}/runs")
    steps = sorted(evals)
    acc = [evals[s]["eval_rewards/accuracies"] for s in steps]
    with open(f"{args.out}/built/meta.json") as f:
        splits = json.load(f)["splits"]
    setting = [args.loss_type, f"beta {args.beta:g}", f"lr {args.max_lr:g}"]
    setting += [f"sft_weight {args.sft_weight:g}"] * bool(args.sft_weight)
    setting += [f"LoRA r {args.lora_r}"] * bool(args.lora_r)
    shown = sorted({steps[0], steps[min(1, len(steps) - 1)], steps[-1]})
    n_steps = max(train_steps)
    cells = [str(args.negatives), f"{splits['train']['examples']} / {splits['val']['examples']}", ", ".join(setting),
             f"{args.epochs}, {n_steps}",
             " -> ".join(f"{evals[s]['eval_rewards/accuracies']:.2f} (step {s})" for s in shown)
             + f" (best {max(acc):.2f})",
             f"{evals[steps[-1]]['eval_rewards/margins']:.3f}",
             f"{round(before['trained_exact_match'] * 12)}/12 -> {round(after['trained_exact_match'] * 12)}/12",
             f"{seconds:.0f} s"]
    print("\n| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
