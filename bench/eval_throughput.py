"""HellaSwag scoring throughput: ours (utils/evaluation, shared-context KV prefix) against lm-eval-harness's
HF backend, on the same exported model, the same examples and the same batch size, in one run.

    python bench/eval_throughput.py                       # gpt2 (124M) random init, 64 examples, batch 16
    python bench/eval_throughput.py --model_type gpt2-mini --examples 200 --repeats 5

Needs `lm-eval` (not a requirement of this repo; see bench/lm_eval_compare.py). A random-init model
with our GPT-2 init is saved as a checkpoint and exported with convert_hf_checkpoint's code to a
transformers directory; lm-eval's HFLM loads that directory (fp32). Both sides score the first N
HellaSwag validation examples, 4 (context, ending) requests each: ours through `score_requests`
(each context once, its 4 endings against the cached prefix), lm-eval through `HFLM.loglikelihood`
(each request as one sequence). Each side is warmed up, then the sides alternate, rotating which goes
first, so load from other processes hits them alike. Reported: examples/s, median over the repeats,
and the largest per-request log-likelihood difference (a check that both computed the same thing).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.gpt2 import GPT2Config, GPT2LMHeadModel  # noqa: E402
from utils.checkpoint import save_model  # noqa: E402
from utils.checkpoints.hf import export_to_hf  # noqa: E402
from utils.evaluation.run import load_examples  # noqa: E402
from utils.evaluation.scoring import score_requests  # noqa: E402
from utils.tokenizer import get_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", default="gpt2")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        sys.exit("bench/eval_throughput.py needs lm-eval: pip install lm-eval==0.4.13 accelerate (in a separate venv)")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset(args.model_type)).eval()
    examples = load_examples("hellaswag", args.examples)
    requests = [r for ex in examples for r in ex.requests]
    tok = get_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, os.path.join(tmp, "ckpt"))
        export_to_hf(os.path.join(tmp, "ckpt"), os.path.join(tmp, "hf"))
        lm = HFLM(pretrained=os.path.join(tmp, "hf"), batch_size=args.batch_size, device="cpu", dtype="float32")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]

    def ours():
        return [s.loglik for s in score_requests(model, tok, requests, batch_size=args.batch_size)]

    def theirs():
        return [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]

    sides = {"ours (shared-context KV prefix)": ours, "lm-eval HFLM": theirs}
    results = {name: fn() for name, fn in sides.items()}  # warm-up, and the numbers to compare
    diff = max(abs(a - b) for a, b in zip(*results.values()))
    times = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.repeats):
        for name in names[r % 2:] + names[:r % 2]:
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
    n_tok = sum(len(c) + len(x) for c, x in requests)
    print(f"{args.model_type}, {len(examples)} HellaSwag examples ({len(requests)} requests, ~{n_tok} characters), "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.repeats} repeats")
    base = statistics.median(times["lm-eval HFLM"])
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:<34} {len(examples) / med:8.2f} examples/s (median {med:.2f} s, best {min(times[name]):.2f} s)"
              f"  {base / med:.2f}x lm-eval")
    print(f"largest |loglik ours - lm-eval| over {len(requests)} requests: {diff:.2e}")


if __name__ == "__main__":
    main()
