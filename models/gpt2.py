"""GPT-2, numerically identical to HF transformers' GPT2LMHeadModel, with a KV cache for generation.

References: OpenAI's GPT-2 (tensorflow), HF transformers' modeling_gpt2.py, nanoGPT's model.py.
Parameter names follow HF (`transformer.h.0.attn.c_attn.weight`, ...) but every projection is
an `nn.Linear`, so HF's Conv1D weights are transposed on import (utils/checkpoints/hf_mapping.py).
Nothing in here knows about distributed training: utils/ applies FSDP to this plain model.
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

from models.attention import DocumentMask
from models.loss import IGNORE_INDEX, linear_cross_entropy


@dataclass
class GPT2Config:
    vocab_size: int = 50257        # GPT-2's BPE vocabulary (50256 merges + <|endoftext|>)
    block_size: int = 1024         # maximum context length (HF: n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    embed_dropout: float = 0.0     # HF: embd_pdrop
    attn_dropout: float = 0.0      # HF: attn_pdrop
    resid_dropout: float = 0.0     # HF: resid_pdrop
    layer_norm_epsilon: float = 1e-5
    pad_vocab_multiple: int = 1    # round the embedding rows up to a multiple of this (64 is faster)

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_multiple)
        return (self.vocab_size + m - 1) // m * m

    SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_multiple")

    def shape_differences(self, other, mine="checkpoint", theirs="requested") -> list:
        """The fields that give the two configs different weights (dropout and eps do not), described."""
        other = other if isinstance(other, dict) else other.__dict__
        return [f"{k}: {mine} {getattr(self, k)!r} vs {theirs} {other[k]!r}"
                for k in self.SHAPE_FIELDS if k in other and getattr(self, k) != other[k]]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPT2Config field(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)


PRESETS = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),           # 124M
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),   # 350M
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),    # 774M
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),       # 1558M
    # Small presets for CPU runs: tiny for tests, mini for the quickstart.
    "gpt2-tiny": GPT2Config(n_layer=2, n_head=2, n_embd=128, block_size=128),
    "gpt2-mini": GPT2Config(n_layer=4, n_head=4, n_embd=256, block_size=256),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attn_dropout = config.attn_dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x, cache=None, docs=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.attn_dropout if self.training else 0.0
        if docs is not None:  # packed rows: each document attends only to itself (models/attention.py)
            y = docs.attend(q, k, v, dropout_p)
        elif cache is None:
            # Causal and right padding need no mask: padded positions only ever look left.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            k, v = cache.update(k, v)  # (B, nh, L, hs): everything cached so far, this step included
            if cache.attn_mask is None:
                # Prefill of equal-length prompts is plain causal; a 1-token step sees all the cache.
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, docs=None):
        x = x + self.attn(self.ln_1(x), cache, docs)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of every layer for a batch of left-padded sequences.

    Holds at most `block_size` positions. `valid` marks real (non-padding) tokens of the
    window; with no padding at all, attention runs on the fast mask-free path.
    """

    def __init__(self, config: GPT2Config, batch_size: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, hs)
        # Uninitialised: only positions already written are ever read (zeroing 75 MB for gpt2 costs ~30 ms).
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled
        self.layer = 0   # layer being written during a forward pass
        self.valid = None  # (B, length) bool, or None when there is no padding
        self.attn_mask = None

    def begin(self, new_valid):
        """Start a forward pass of T new tokens; `new_valid` (B, T) bool or None. Returns position ids."""
        T = new_valid.size(1) if new_valid is not None else None
        if new_valid is not None or self.valid is not None:
            B = self.k.size(1)
            if new_valid is None:
                new_valid = torch.ones(B, T, dtype=torch.bool, device=self.k.device)
            old = self.valid if self.valid is not None else \
                torch.ones(B, self.length, dtype=torch.bool, device=self.k.device)
            self.valid = torch.cat([old, new_valid], dim=1)  # (B, L)
            L, T = self.valid.size(1), new_valid.size(1)
            causal = torch.ones(T, L, dtype=torch.bool, device=self.k.device).tril(diagonal=L - T)
            mask = causal[None] & self.valid[:, None, :]  # (B, T, L)
            # A padding query would see no key at all (NaN); let it see itself, its output is unused.
            mask |= _diag(T, L, self.k.device)[None]
            self.attn_mask = mask[:, None]  # (B, 1, T, L)
            positions = (self.valid.long().cumsum(dim=1) - 1).clamp(min=0)[:, L - T:]  # (B, T)
            self.layer = 0
            return positions
        self.layer = 0
        return None

    def update(self, k, v):
        T = k.size(2)
        end = self.length + T
        self.k[self.layer, :, :, self.length:end] = k
        self.v[self.layer, :, :, self.length:end] = v
        out = self.k[self.layer, :, :, :end], self.v[self.layer, :, :, :end]
        self.layer += 1
        return out

    def advance(self, T):
        self.length += T

    def logit_positions(self, x):
        return x[:, -1:]  # (B, 1, C): the next token's


class StaticKVCache:
    """Keys and values in fixed-size buffers, written at given positions: the compiled decoder's cache.

    Every step has the same shapes whatever the position (the mask, not the buffer, grows), so one
    compiled step serves every token. Buffers are zero-filled once: a masked key must still be finite
    (softmax gives it weight 0, and 0 * NaN would be NaN). Positions past the current one may hold
    stale values; each forward writes its own positions before attending, so they are never read.
    `pos` (T,) are the positions of the T tokens; `logit_index` which of the T positions get logits.
    `span` (A,): a forward attends to the first A positions only (its size is all that is read; A covers
    pos). Reading the whole buffer instead made attention a fifth of a gpt2 step on CPU at L = 512.
    """

    def __init__(self, k, v, pos, logit_index, span):
        self.k, self.v = k, v  # one (B, nh, L, hs) buffer per layer each
        self.pos, self.logit_index = pos, logit_index
        self.span = span.size(0)
        self.attn_mask = (torch.arange(self.span, device=pos.device)[None, :] <= pos[:, None])[None, None]  # (1,1,T,A)
        self.layer = 0

    @staticmethod
    def buffers(config, batch_size, length, device, dtype):
        """(k, v): tuples of one buffer per layer. Separate buffers, not views of one: torch.compile
        writes into a whole graph input in place, but copied a view's whole base at every layer."""
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, length, hs)
        return tuple(tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer))
                     for _ in range(2))

    def begin(self, valid):
        self.layer = 0
        return self.pos[None]  # (1, T) position ids

    def update(self, k, v):
        k_all, v_all = self.k[self.layer], self.v[self.layer]  # (B, nh, L, hs) this layer's buffers
        k_all[:, :, self.pos] = k.to(k_all.dtype)
        v_all[:, :, self.pos] = v.to(v_all.dtype)
        self.layer += 1
        return k_all[:, :, :self.span], v_all[:, :, :self.span]  # (B, nh, A, hs)

    def advance(self, T):
        pass

    def logit_positions(self, x):
        return x.index_select(1, self.logit_index)  # (B, len(logit_index), C)


def _diag(T, L, device):
    """(T, L) bool with True where query i (the last T of L positions) meets its own key."""
    return torch.arange(L, device=device)[None, :] == (torch.arange(T, device=device) + L - T)[:, None]


class GPT2LMHeadModel(nn.Module):
    doc_attention = None  # how doc_ids attention runs (models/attention.py BACKENDS); None = the device's fastest

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.embed_dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied lm_head is counted once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None, valid=None, reduction="mean", return_logits=True, doc_ids=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss over targets != -100 or None).

        `reduction`: "mean" over target tokens, or "sum" (the training loop divides by the number
        of target tokens in the whole accumulation window across ranks); "none" with return_logits=False:
        (B, T) per-token losses, 0 where ignored (DPO sums them per answer).
        `return_logits=False` (training): logits come back as None and the loss is computed chunk
        by chunk without ever holding the batch's logits (models/loss.py): same value, much faster.

        `cache`/`valid` are for generation only: a KVCache to read and extend, and (B, T) bool
        marking real tokens of left-padded prompts. With a cache, logits are for the last position only.

        `doc_ids` (B, T), optional (packed rows, training and evaluation): the document of each token; a new
        one starts where the id changes. Each document then attends only to itself and its positions restart
        at 0, exactly as if it ran alone (so a row may be longer than block_size; a document may not).
        Without it: plain causal attention over the whole row.
        """
        B, T = idx.size()
        docs = None
        if doc_ids is not None:
            assert cache is None, "doc_ids are for training and evaluation, not for the KV cache"
            # No T <= block_size here: a row may hold more (DPO packs a pair's two sequences in one); each
            # document's positions restart at 0, and one longer than block_size fails at the position embedding.
            docs = DocumentMask(doc_ids, self.doc_attention, dropout=self.training and self.config.attn_dropout > 0)
            pos = docs.positions  # (B, T)
        elif cache is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens exceeds block_size {self.config.block_size}"
            pos = torch.arange(T, dtype=torch.long, device=idx.device)[None]  # (1, T)
        else:
            pos = cache.begin(valid)
            if pos is None:
                pos = torch.arange(cache.length, cache.length + T, dtype=torch.long, device=idx.device)[None]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache, docs)
        if cache is not None:
            cache.advance(T)
            x = cache.logit_positions(x)  # only the positions generation samples from: no lm_head over the prompt
        x = self.transformer.ln_f(x)
        if targets is not None and not return_logits and reduction in ("mean", "sum", "none"):
            if isinstance(self.lm_head, nn.Linear):
                loss = linear_cross_entropy(x, self.lm_head.weight, targets, self.config.vocab_size, reduction)
            else:  # a replaced head (int8: utils/generation/quantize.py) computes its own logits, a row at a time
                losses = torch.stack([F.cross_entropy(self.lm_head(xr)[:, :self.config.vocab_size].float(), tr,
                                                      ignore_index=IGNORE_INDEX, reduction="none")
                                      for xr, tr in zip(x, targets)])  # (B, T)
                loss = losses if reduction == "none" else losses.sum()
                if reduction == "mean":
                    loss = loss / (targets != IGNORE_INDEX).sum()
            return None, loss  # "none": (B, T) per-token losses, 0 where the target is -100
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # padding rows never take probability mass
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction=reduction)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, stop_tokens=(), generator=None, use_cache=True, callback=None,
                 speculate=None):
        """Continue `idx` by up to `max_new_tokens` tokens; returns prompt and new tokens together.

        idx: a (B, T) LongTensor of equal-length prompts -> (B, T + n) tensor, rows that stopped
        early padded with their stop token; or a list of token-id lists of any lengths -> a list
        of lists, each ending at its stop token (included) if one was produced.
        temperature 0 is greedy. Past `block_size` the model sees the last `block_size` tokens,
        exactly as if the whole window were recomputed each step.
        callback: called with each step's (B,) new tokens (for streaming); returning True stops.
        speculate: "lookup" drafts tokens from earlier text (prompt lookup) and checks them in one
        forward; greedy, batch 1, and the same tokens as without it. None: what prepare_for_decode set.
        """
        ragged = not torch.is_tensor(idx)
        seq, valid, lengths = self._prompt_batch(idx)
        new = []
        for next_token in self.generate_tokens(seq, valid, max_new_tokens, temperature, top_k, top_p,
                                               repetition_penalty, stop_tokens, generator, use_cache, speculate):
            new.append(next_token)
            if callback is not None and callback(next_token):
                break
        seq = torch.cat([seq, *(t[:, None] for t in new)], dim=1)
        if not ragged:
            return seq
        T0 = seq.size(1) - len(new)
        out = []
        for i, n in enumerate(lengths):
            row = seq[i, T0 - n:].tolist()
            tail = row[n:]
            for j, t in enumerate(tail):
                if t in stop_tokens:
                    tail = tail[: j + 1]
                    break
            out.append(row[:n] + tail)
        return out

    def _prompt_batch(self, idx):
        """A (B, T) tensor or ragged lists -> (seq (B, T0) left-padded, valid (B, T0) bool or None, lengths)."""
        device = self.transformer.wte.weight.device
        if torch.is_tensor(idx):
            if idx.dim() != 2 or idx.size(1) == 0:
                raise ValueError("idx must be a (batch, time) tensor with at least one token")
            return idx.to(device), None, None
        if not idx or any(len(p) == 0 for p in idx):
            raise ValueError("every prompt needs at least one token")
        lengths = [len(p) for p in idx]
        T0 = max(lengths)
        seq = torch.zeros(len(idx), T0, dtype=torch.long, device=device)
        valid = torch.zeros(len(idx), T0, dtype=torch.bool, device=device)
        for i, p in enumerate(idx):
            seq[i, T0 - len(p):] = torch.as_tensor(p, dtype=torch.long)
            valid[i, T0 - len(p):] = True
        return seq, (None if all(n == T0 for n in lengths) else valid), lengths

    @torch.no_grad()
    def generate_tokens(self, seq, valid, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, stop_tokens=(), generator=None, use_cache=True, speculate=None):
        """Yield each step's (B,) new tokens after the (B, T0) prompts `seq` (`valid`: left padding or None).

        Rows that hit a stop token repeat it until every row has; then the iterator ends. A model
        prepared by utils.generation.loading.prepare_for_decode decodes equal-length prompts with a
        static cache (and its compiled steps); otherwise the growing KVCache is used.
        """
        from models.sampling import check_sampling_args, sample_next_token  # keeps this file about the model
        check_sampling_args(temperature, top_k, top_p, repetition_penalty)
        plan = getattr(self, "decode_plan", None)
        speculate = speculate if speculate is not None else (plan or {}).get("speculate")
        if speculate not in (None, "none", "lookup"):
            raise ValueError(f"speculate must be None, 'none' or 'lookup', got {speculate!r}")
        speculate = speculate == "lookup"
        if speculate and (temperature != 0 or repetition_penalty != 1.0 or seq.size(0) != 1 or valid is not None):
            raise ValueError("speculate='lookup' needs greedy decoding (temperature 0, no repetition penalty) "
                             "of a single prompt")
        B, device = seq.size(0), seq.device
        stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        was_training = self.training
        self.eval()
        if plan is not None and use_cache and valid is None:
            steps = self._static_logits(seq, max_new_tokens, plan, speculate)
        else:
            steps = self._dynamic_logits(seq, valid, use_cache)
        try:
            produced = 0
            logits = next(steps)
            while produced < max_new_tokens:
                if torch.is_tensor(logits):
                    logits = logits[:, -1, :].float()
                    next_token = sample_next_token(logits, seq, valid, temperature, top_k, top_p, repetition_penalty,
                                                   generator)
                    drafted = [next_token]
                else:  # speculation: the tokens greedy decoding gives, several at once
                    drafted = [torch.tensor([t], device=device) for t in logits]
                for next_token in drafted[: max_new_tokens - produced]:
                    if stop.numel():
                        next_token = torch.where(finished, seq[:, -1], next_token)  # finished rows repeat their stop
                        finished |= torch.isin(next_token, stop)
                    seq = torch.cat([seq, next_token[:, None]], dim=1)
                    if valid is not None:
                        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
                    produced += 1
                    yield next_token
                    if stop.numel() and bool(finished.all()):
                        return
                if produced < max_new_tokens:
                    logits = steps.send(seq)
        finally:
            steps.close()
            self.train(was_training)

    def _dynamic_logits(self, seq, valid, use_cache):
        """A coroutine: yields (B, 1, V) logits for the next token; is sent the sequence grown by it."""
        cache = None
        window = self.config.block_size
        while True:
            if not use_cache:
                logits, _ = self(seq[:, -window:]) if valid is None else self._forward_window(seq, valid, window, None)
            elif cache is None or cache.length >= window:
                # (Re)fill the cache from the last `window` tokens; positions restart at the window's first real token.
                cache = KVCache(self.config, seq.size(0), seq.device, self.transformer.wte.weight.dtype)
                logits, _ = self._forward_window(seq, valid, window, cache)
            else:
                logits, _ = self(seq[:, -1:], cache=cache, valid=None if valid is None else valid[:, -1:])
            new_seq = yield logits
            if valid is not None:
                valid = torch.cat([valid, torch.ones_like(valid[:, -1:])], dim=1)
            seq = new_seq

    def _forward_window(self, seq, valid, window, cache):
        ctx = seq[:, -window:]
        ctx_valid = None if valid is None else valid[:, -window:]
        if cache is None:  # no-cache reference path with padding: a throwaway cache does the masking
            cache = KVCache(self.config, seq.size(0), seq.device, self.transformer.wte.weight.dtype)
        return self(ctx, cache=cache, valid=ctx_valid)

    # ------------------------------------------------------------------------- the static-cache decoder

    def forward_static(self, idx, pos, logit_index, k, v, span):
        """idx (B, T) at positions pos (T,) into the static cache buffers k, v, attending to the first
        len(span) positions -> logits (B, len(logit_index), V).

        The one function prepare_for_decode compiles (prefill, decode step and speculative check are
        its three shapes); every argument is a tensor, so nothing about a position is baked into it,
        and span's length is a dynamic dimension (see _spans): one compiled step for every position.
        """
        logits, _ = self(idx, cache=StaticKVCache(k, v, pos, logit_index, span))
        return logits

    def _static_logits(self, seq, max_new_tokens, plan, speculate):
        """The coroutine of _dynamic_logits on a static cache: fixed shapes, so a compiled step is reused.

        The cache holds a power-of-two bucket of positions (prompt + new tokens, at most block_size),
        and prompts are right-padded to a power-of-two bucket: a handful of shapes in all, never one
        per token or per prompt length. Right padding is exact: a padded position is causal-masked from
        the real ones and overwritten by the decode step that reaches it before anyone attends to it.
        With `speculate`, yields lists of tokens (see _speculate).
        """
        B, T0 = seq.shape
        window = self.config.block_size
        L = _bucket(min(T0 + max_new_tokens, window), window)
        k, v = plan["cache"](self, B, L)
        prefill, step = plan["prefill"], plan["step"]
        device = seq.device
        span = _spans(L, device)

        def fill(seq):
            ctx = seq[:, -L:]
            n = ctx.size(1)
            P = _bucket(max(n, 16), L)
            padded = torch.nn.functional.pad(ctx, (0, P - n))
            pos = torch.arange(P, device=device)
            return prefill(padded, pos, torch.tensor([n - 1], device=device), k, v, span(P)), n

        logits, cur = fill(seq)
        last = torch.zeros(1, dtype=torch.long, device=device)
        if speculate:
            yield from self._speculate(seq, logits, cur, L, k, v, plan, span)
            return
        while True:
            seq = yield logits
            if cur >= L:  # the window is full: recompute it, as the dynamic cache does
                logits, cur = fill(seq)
                continue
            logits = step(_last_token(seq), torch.tensor([cur], device=device), last, k, v, span(cur + 1))
            cur += 1

    def _speculate(self, seq, logits, cur, L, k, v, plan, span, draft_len=8):
        """Greedy decoding that checks up to `draft_len` drafted tokens per forward (prompt lookup decoding).

        Draft: the tokens that followed the latest earlier occurrence of the sequence's last n-gram
        (n = 3, 2, 1). Check: one forward of [pending token, draft] gives the greedy token after each;
        the draft is accepted up to its first disagreement, plus the model's own token there. So the
        output is plain greedy decoding's (up to float rounding of a 9-row vs 1-row matmul on exact ties).
        Yields lists of new tokens; is sent the grown sequence. Counts go to plan["stats"].
        """
        device = seq.device
        stats = plan.setdefault("stats", {"forwards": 0, "drafted": 0, "accepted": 0})
        tokens = seq[0].tolist()
        pending = int(logits[0, -1].float().argmax())
        all_index = torch.arange(draft_len + 1, device=device)
        last = torch.zeros(1, dtype=torch.long, device=device)
        new = [pending]
        while True:
            sent = yield new
            tokens = sent[0].tolist()
            draft = lookup_draft(tokens, draft_len)
            if cur + draft_len + 1 > L:
                draft = []  # no room for a full check block: plain steps to the end of the cache
            if cur >= L:
                plain = plan["prefill"]  # the window is full: recompute it, as plain decoding does
                ctx = sent[:, -L:]
                logits = plain(ctx, torch.arange(L, device=device), torch.tensor([L - 1], device=device), k, v,
                               span(L))
                new = [int(logits[0, -1].float().argmax())]
                cur = L
                stats["forwards"] += 1
                continue
            if not draft:
                logits = plan["step"](_last_token(sent), torch.tensor([cur], device=device), last, k, v,
                                      span(cur + 1))
                new, cur = [int(logits[0, -1].float().argmax())], cur + 1
                stats["forwards"] += 1
                continue
            block = [tokens[-1]] + draft + [draft[-1]] * (draft_len - len(draft))
            logits = plan["verify"](torch.tensor([block], device=device),
                                    torch.arange(cur, cur + draft_len + 1, device=device), all_index, k, v,
                                    span(cur + draft_len + 1))
            greedy = logits[0].float().argmax(-1).tolist()  # greedy[i]: the token after block[i]
            a = 0
            while a < len(draft) and draft[a] == greedy[a]:
                a += 1
            new, cur = draft[:a] + [greedy[a]], cur + a + 1
            stats["forwards"] += 1
            stats["drafted"] += len(draft)
            stats["accepted"] += a


def lookup_draft(tokens, n_draft, max_ngram=3):
    """Prompt lookup: the up-to-`n_draft` tokens after the latest earlier match of the last n-gram, or []."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest match first, never the tail itself
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + n_draft]
    return []


def _last_token(seq):
    """(B, 1) last tokens with strides of their own: a view's strides follow seq's length, and a
    compiled step would be recompiled for every new stride."""
    return seq[:, -1:].clone(memory_format=torch.contiguous_format)


SPAN_BLOCK = 64  # a forward on the static cache attends to the written positions rounded up to this


def _spans(L, device):
    """span(n) -> a (A,) tensor, A = n rounded up to SPAN_BLOCK (at most L): how many cache positions a
    forward attends to. Only its size is used, and it is marked dynamic, so torch.compile makes one
    graph for every A (rounding keeps CUDA graphs, recorded per size, to L / SPAN_BLOCK of them)."""
    buffer = torch.empty(L, dtype=torch.int8, device=device)

    def span(n):
        view = buffer[:min(L, -(-n // SPAN_BLOCK) * SPAN_BLOCK)]
        torch._dynamo.maybe_mark_dynamic(view, 0)
        return view
    return span


def _bucket(n, cap):
    """The smallest power of two >= n, at most `cap`."""
    return min(1 << max(0, (n - 1).bit_length()), cap)
