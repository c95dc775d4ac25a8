"""Choosing the next token from logits: temperature, top-k, top-p, repetition penalty."""
import torch


def check_sampling_args(temperature, top_k, top_p, repetition_penalty):
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no limit), got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty is None or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")


def apply_repetition_penalty(logits, seq, valid, penalty):
    """CTRL's penalty on tokens already in the sequence: positive logits divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    V = logits.size(-1)
    # Padding goes to an extra column V that is dropped: every write is then a True, so repeated
    # indices cannot race (a padding False written over a real token's True, CUDA's scatter order).
    ids = seq if valid is None else torch.where(valid, seq, V)
    seen = torch.zeros(logits.size(0), V + 1, dtype=torch.bool, device=logits.device)
    seen = seen.scatter_(1, ids, True)[:, :V]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits, top_k=None, top_p=None):
    """Set logits outside the top-k and outside the top-p nucleus to -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits, seq, valid, temperature, top_k, top_p, repetition_penalty, generator=None):
    """logits (B, V) fp32 -> next token ids (B,)."""
    logits = apply_repetition_penalty(logits, seq, valid, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
