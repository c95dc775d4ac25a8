"""Evaluate a model on a list of tasks, in one process or over every rank of a process group.

Examples are dealt to ranks round-robin (rank r scores examples r, r + W, ...); the per-example
scores are gathered and the metrics computed over all of them in data set order, so W ranks give
the numbers one rank gives. Used by evaluate.py and, with `eval_tasks`, by the training loop.
"""
import contextlib
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from custom_dataset import check_token_file, meta_tokens
from utils.errors import UserError
from utils.evaluation.data import SIZES, load_docs
from utils.evaluation.scoring import score_requests
from utils.evaluation.tasks import (
    DOWNSTREAM,
    MULTIPLE_CHOICE,
    build_examples,
    lambada_metrics,
    multiple_choice_metrics,
    parse_tasks,
)
from utils.tokenizer import get_tokenizer


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(items):
    """Every rank's list of (index, value) -> the union, sorted by index, on every rank."""
    rank, world = _rank_world()
    if world == 1:
        return sorted(items, key=lambda t: t[0])
    parts = [None] * world
    dist.all_gather_object(parts, items)
    return sorted((x for p in parts for x in p), key=lambda t: t[0])


@contextlib.contextmanager
def scoring_mode(model):
    """What scoring needs around the model, whatever the training loop made of it:
    FSDP2 gathers the root's own parameters (embeddings, final LayerNorm, lm_head) only inside the
    root's forward, and scoring calls the blocks directly, so they are gathered here; torch.compile'd
    blocks run eagerly (eval shapes vary: a recompile each)."""
    from torch.distributed.fsdp import FSDPModule
    fsdp = isinstance(model, FSDPModule)
    if fsdp:
        model.unshard()
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        if fsdp:
            model.reshard()


def load_examples(task, limit=None, data_dir=None, wheel_dir=None):
    """The task's first `limit` examples in data set order (lm-eval's --limit)."""
    docs = load_docs(task, data_dir, wheel_dir)
    if limit is not None:
        docs = docs[:limit]
    return build_examples(task, docs, source=f"{task} data")


def score_examples(model, examples, batch_size, device, sync_steps=False):
    """Scores of every example's choices ([[Score]], data set order), the work shared over the ranks."""
    rank, world = _rank_world()
    mine = list(range(rank, len(examples), world))
    requests = [r for i in mine for r in examples[i].requests]
    with scoring_mode(model):
        scores = score_requests(model, get_tokenizer(), requests, batch_size, device, sync_steps)
    per_example, k = [], 0
    for i in mine:
        n = len(examples[i].requests)
        per_example.append((i, scores[k:k + n]))
        k += n
    return [s for _, s in _gather(per_example)]


def task_metrics(task, examples, scores):
    if task in MULTIPLE_CHOICE:
        return multiple_choice_metrics(task, examples, scores)
    return lambada_metrics(scores)


def score_task(model, task, examples, batch_size, device, sync_steps=False):
    """Metrics of one multiple-choice or LAMBADA task over `examples`."""
    return task_metrics(task, examples, score_examples(model, examples, batch_size, device, sync_steps))


def evaluate_tasks(model, specs, data_dir=None, wheel_dir=None, val_data=None, batch_size=32, device="cpu",
                   sync_steps=False, log=None, loaded=None):
    """{task: metrics} for [(task, limit)]. sync_steps: the model is FSDP-sharded (all ranks step together).
    loaded: {task: examples} already read with load_examples (the others are read here)."""
    results = {}
    for task, limit in specs:
        if task == "val_loss":
            results[task] = val_loss(model, val_data, limit, batch_size, device)
        else:
            examples = (loaded or {}).get(task) or load_examples(task, limit, data_dir, wheel_dir)
            results[task] = score_task(model, task, examples, batch_size, device, sync_steps)
        if log:
            log(task, results[task])
    return results


def find_val_bin(path):
    if not path:
        raise UserError("val_loss needs a built pretraining dataset: pass --val_data DIR (or DIR/val.bin)")
    p = os.path.join(path, "val.bin") if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise UserError(f"--val_data {path}: no val.bin there; build one with build_pretrain_datasets.py")
    check_token_file(p, meta_tokens(os.path.dirname(p), "val") if os.path.basename(p) == "val.bin" else None)
    if os.path.getsize(p) == 0:
        raise UserError(f"{p} is empty (built with --val_fraction 0?); rebuild the dataset with a --val_fraction "
                        "above 0, or pass another --val_data")
    return p


@torch.no_grad()
def val_loss(model, val_data, limit=None, batch_size=32, device="cpu"):
    """Mean next-token loss over val.bin cut into consecutive windows of block_size + 1 tokens (the
    first `limit` windows), and bits per byte: the summed loss in bits over the UTF-8 bytes of the
    target tokens as decoded (<|endoftext|> counts as its 13 characters)."""
    tokens = np.memmap(find_val_bin(val_data), dtype=np.uint16, mode="r")
    T = model.config.block_size
    n_windows = (len(tokens) - 1) // T
    if n_windows < 1:
        raise UserError(f"{val_data}: val.bin has {len(tokens)} tokens, fewer than one {T + 1}-token window")
    if limit is not None:
        n_windows = min(n_windows, limit)
    enc = get_tokenizer()
    n_bytes = torch.tensor([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=torch.float64)
    rank, world = _rank_world()
    was_training = model.training
    model.eval()
    loss_sum, n_tok, byte_sum = 0.0, 0, 0.0
    mine = list(range(rank, n_windows, world))
    for b in range(0, len(mine), batch_size):
        w = torch.from_numpy(np.stack([tokens[i * T: i * T + T + 1].astype(np.int64) for i in mine[b:b + batch_size]]))
        x, y = w[:, :-1].to(device), w[:, 1:].to(device)
        _, loss = model(x, targets=y, reduction="sum", return_logits=False)  # chunked: never (B, T, vocab) logits
        loss_sum += float(loss.double())
        n_tok += y.numel()
        byte_sum += float(n_bytes[w[:, 1:]].sum())
    model.train(was_training)
    if world > 1:
        t = torch.tensor([loss_sum, n_tok, byte_sum], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        loss_sum, n_tok, byte_sum = t.tolist()
    return {"loss": loss_sum / n_tok, "bits_per_byte": loss_sum / math.log(2) / byte_sum, "n": n_windows,
            "tokens": int(n_tok)}


def default_limit_note(task, limit):
    """'10042' or '500 of 10042' (examples) for the log line; val_loss counts windows."""
    if task == "val_loss":
        return f"{limit} windows" if limit else "all windows"
    total = SIZES[task]
    return f"{limit} of {total}" if limit and limit < total else f"{total}"


def load_eval_tasks(eval_tasks: str):
    """[(task, examples)] for a training config's `eval_tasks` ("hellaswag:500,piqa"), read when training
    starts: a missing data set fails then, not at the first evaluation hours later."""
    if not eval_tasks:
        return []
    return [(t, load_examples(t, n)) for t, n in parse_tasks(eval_tasks, "--eval_tasks", DOWNSTREAM)]


def evaluate_in_loop(model, eval_sets, batch_size, device):
    """{"hellaswag_acc_norm": ..., ...} of the loaded `eval_sets` on the (FSDP-sharded) model being
    trained; every rank calls it. The trainer logs them as eval/<task>_<metric>."""
    out = {}
    for task, examples in eval_sets:
        metrics = score_task(model, task, examples, batch_size, device, sync_steps=True)
        out.update({f"{task}_{k}": v for k, v in metrics.items() if k != "n"})
    return out
