"""Log-likelihood of continuations given contexts, batched, as lm-eval-harness computes it.

A request is a (context, continuation) string pair. Tokenization follows lm-eval's `_encode_pair`
(trailing spaces of the context move to the continuation; the continuation's tokens are what
encoding the whole string adds after the context's tokens) and its left truncation to the model's
window. The score of a request is the summed log-probability of its continuation tokens and whether
greedy decoding would have produced them (`is_greedy`, LAMBADA's accuracy).

Speed: requests that share their context tokens (the choices of a HellaSwag, PIQA or ARC question)
are one group. Each batch runs two forwards: the groups' contexts once each (keeping every layer's
keys and values), then each group's continuations packed into one row, attending to that cached
prefix. A 4-choice HellaSwag question computes its context once instead of four times, and the
vocabulary projection runs only where a continuation token is predicted.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


@dataclass
class Score:
    loglik: float      # summed log-probability of the continuation tokens (natural log)
    is_greedy: bool    # every continuation token was the argmax
    n_tokens: int      # continuation tokens (llm.c's per-token normalisation divides by this)


def encode_pair(tokenizer, context: str, continuation: str):
    """lm-eval's HFLM._encode_pair for a causal model: (context ids, continuation ids). An empty
    context is <|endoftext|>, as lm-eval's loglikelihood() makes it."""
    if not context:
        return [tokenizer.eot_token], tokenizer.encode(continuation, allowed_special="all")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, allowed_special="all")
    ctx = tokenizer.encode(context, allowed_special="all")
    return ctx, whole[len(ctx):]


def fit_window(ctx, cont, block_size):
    """lm-eval's left truncation: the model sees the last block_size + 1 tokens of context + continuation,
    minus the final one. Returns the (possibly shortened) context ids and the continuation ids."""
    if not cont:
        raise UserError("a continuation encodes to no tokens; nothing to score")
    if len(cont) > block_size:
        raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's {block_size}-token window")
    excess = len(ctx) + len(cont) - (block_size + 1)
    return (ctx[excess:] if excess > 0 else ctx), cont


class _PrefixCache:
    """Stands in for models.gpt2.KVCache inside Block.forward (`update(k, v)`, `attn_mask`).

    Prefix pass (`prefix=None`): records every layer's keys/values and attends causally.
    Continuation pass: each row's keys/values are its group's context followed by its own.
    """

    def __init__(self, prefix=None, attn_mask=None):
        self.prefix = prefix        # list over layers of (k, v), each (G, nh, Lc, hs)
        self.attn_mask = attn_mask  # (G, 1, P, Lc + P) bool, or None for plain causal
        self.recorded = []
        self.layer = 0

    def update(self, k, v):
        if self.prefix is None:
            self.recorded.append((k, v))
            return k, v
        pk, pv = self.prefix[self.layer]
        self.layer += 1
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (G, nh, Lc + P, hs)


def _hidden(model, idx, pos, cache):
    """The transformer body on (B, T) tokens at (B, T) positions -> final-LayerNorm'd (B, T, C)."""
    tr = model.transformer
    x = tr.wte(idx) + tr.wpe(pos)
    for block in tr.h:
        x = block(x, cache)
    return tr.ln_f(x)


def _token_scores(model, h, targets, chunk=2048):
    """(N, C) hidden states and (N,) target ids -> (N,) log-probabilities, (N,) argmax == target.

    The vocabulary projection is chunked: 2048 positions x 50257 fp32 logits is 400 MB at most."""
    logps, greedy = [], []
    vocab = model.config.vocab_size
    for i in range(0, h.size(0), chunk):
        logits = model.lm_head(h[i:i + chunk])[:, :vocab].float()  # (n, V); padding rows of the vocab dropped
        t = targets[i:i + chunk]
        logps.append(logits.gather(1, t[:, None])[:, 0] - torch.logsumexp(logits, dim=1))
        greedy.append(logits.argmax(dim=1) == t)
    return torch.cat(logps), torch.cat(greedy)


def score_batch(model, groups, device):
    """Score one batch. `groups`: list of (context ids, [continuation ids, ...]). Returns a list of
    lists of Score, one per continuation, in the same nesting.

    Pass 1 runs each group's context once and keeps its keys/values. Pass 2 runs, per group, all its
    continuations packed into one row (each minus its last token), every one attending to the
    group's context and causally to itself only: no continuation waits on another's padding.
    Always both passes, even when every continuation is one token (LAMBADA often): under FSDP each
    pass all-gathers the weights, and all ranks must make the same calls."""
    G = len(groups)
    ctx_lens = torch.tensor([len(c) for c, _ in groups])
    Lc = int(ctx_lens.max())
    # 1) contexts, right-padded (causal attention: padding never reaches a real position)
    idx = torch.zeros(G, Lc, dtype=torch.long)
    for g, (c, _) in enumerate(groups):
        idx[g, :len(c)] = torch.tensor(c)
    cache = _PrefixCache()
    h = _hidden(model, idx.to(device), torch.arange(Lc, device=device)[None].expand(G, Lc), cache)  # (G, Lc, C)
    last = h[torch.arange(G, device=device), ctx_lens.to(device) - 1]  # (G, C): predicts every cont[0]

    # 2) packed continuations. Per packed position: its token, the token it predicts, its request and
    # its offset in that continuation (position = context length + offset).
    P = max(1, max(sum(len(c) - 1 for c in cs) for _, cs in groups))
    inp = torch.zeros(G, P, dtype=torch.long)
    tgt = torch.zeros(G, P, dtype=torch.long)
    req = torch.full((G, P), -1, dtype=torch.long)  # -1: padding
    off = torch.zeros(G, P, dtype=torch.long)
    first = []  # (group, first token) of every request, in order
    r = 0
    for g, (_, cs) in enumerate(groups):
        p = 0
        for c in cs:
            n = len(c) - 1
            inp[g, p:p + n] = torch.tensor(c[:-1])
            tgt[g, p:p + n] = torch.tensor(c[1:])
            req[g, p:p + n] = r
            off[g, p:p + n] = torch.arange(n)
            first.append((g, c[0]))
            p += n
            r += 1
    R = r
    pos = (ctx_lens[:, None] + off).clamp(max=model.config.block_size - 1)  # padding clamped into the table
    prefix_keys = torch.arange(Lc)[None, None, :] < ctx_lens[:, None, None]  # (G, 1, Lc): the real context
    same = (req[:, :, None] == req[:, None, :]) & (req[:, None, :] >= 0)  # (G, P, P): same continuation
    causal = off[:, :, None] >= off[:, None, :]
    mask = torch.cat([prefix_keys.expand(G, P, Lc), same & causal], dim=2)[:, None]  # (G, 1, P, Lc + P)
    h = _hidden(model, inp.to(device), pos.to(device), _PrefixCache(cache.recorded, mask.to(device)))  # (G, P, C)

    # 3) log-probabilities: each request's first token from its context's last position, the rest packed
    real = req >= 0
    g_first = torch.tensor([g for g, _ in first], device=device)
    hs = torch.cat([last[g_first], h[real.to(device)]])  # (R + real positions, C)
    targets = torch.cat([torch.tensor([t for _, t in first]), tgt[real]]).to(device)
    owner = torch.cat([torch.arange(R), req[real]]).to(device)
    lp, gr = _token_scores(model, hs, targets)
    logliks = torch.zeros(R, dtype=torch.float64, device=device).index_add_(0, owner, lp.double())
    misses = torch.zeros(R, dtype=torch.long, device=device).index_add_(0, owner, (~gr).long())
    logliks, greedy = logliks.tolist(), (misses == 0).tolist()
    out, r = [], 0
    for _, cs in groups:
        out.append([Score(logliks[r + i], greedy[r + i], len(c)) for i, c in enumerate(cs)])
        r += len(cs)
    return out


def make_batches(groups, batch_size):
    """Order groups longest first (less padding) and cut them into batches of `batch_size` groups:
    the rows of both passes (contexts, then packed continuations), as lm-eval's batch size counts the
    rows of its one pass. Few large forwards beat many small ones: on CPU a forward of a few hundred
    tokens is bound by reading the weights. Returns lists of group indices."""
    order = sorted(range(len(groups)), key=lambda i: -(len(groups[i][0]) + sum(len(c) - 1 for c in groups[i][1])))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def group_requests(token_pairs):
    """[(ctx ids, cont ids)] -> (groups [(ctx ids, [cont ids, ...])], where[i] = (group, position))."""
    index, groups, where = {}, [], []
    for ctx, cont in token_pairs:
        key = tuple(ctx)
        if key not in index:
            index[key] = len(groups)
            groups.append((ctx, []))
        g = index[key]
        where.append((g, len(groups[g][1])))
        groups[g][1].append(cont)
    return groups, where


@torch.no_grad()
def score_requests(model, tokenizer, requests, batch_size=32, device="cpu", sync_steps=False):
    """[(context, continuation)] -> [Score], in order.

    sync_steps: under FSDP every rank must run the same number of forwards (each one all-gathers
    the weights); ranks with fewer batches run throwaway one-token batches to keep in step.
    """
    block_size = model.config.block_size
    pairs = [fit_window(*encode_pair(tokenizer, c, x), block_size) for c, x in requests]
    groups, where = group_requests(pairs)
    batches = make_batches(groups, batch_size)
    n_steps = len(batches)
    if sync_steps and dist.is_initialized():
        t = torch.tensor([n_steps], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_steps = int(t.item())
    was_training = model.training
    model.eval()
    group_scores = [None] * len(groups)
    for step in range(n_steps):
        if step < len(batches):
            for i, s in zip(batches[step], score_batch(model, [groups[i] for i in batches[step]], device)):
                group_scores[i] = s
        else:
            score_batch(model, [([tokenizer.eot_token], [[tokenizer.eot_token] * 2])], device)  # keeps FSDP in step
    model.train(was_training)
    return [group_scores[g][k] for g, k in where]
