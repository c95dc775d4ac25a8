"""Causal attention confined to documents: packed rows of several examples, each seeing only itself.

A packed row holds several documents side by side; `doc_ids` (B, T) numbers them (a new document
starts wherever the id changes). Token t of a document attends to the tokens of that document up to
itself, and its position restarts at 0 where the document starts: exactly what it would see alone.

Three ways to compute that, all exact; which one runs is chosen per device (measured: BENCHMARKS.md,
"Packed fine-tuning"):

- "flex": torch.nn.attention.flex_attention with a block-sparse mask (CUDA): blocks of 128 x 128
  queries/keys outside every document are skipped, blocks wholly inside one are computed without a
  mask; nothing of size (T, T) is ever materialised. It has no attention dropout.
- "dense": F.scaled_dot_product_attention with a (B, 1, T, T) boolean mask, shared by the heads.
- "segments": one F.scaled_dot_product_attention(is_causal=True) call per document: the unpacked
  model's own kernel, at the price of one call per document.

Without documents the model keeps its mask-free is_causal path (models/gpt2.py).
"""
import torch
import torch.nn.functional as F

BACKENDS = ("flex", "dense", "segments")


def positions_in_document(doc_ids):
    """(B, T) position of each token within its document: 0 where the id changes (and at t = 0)."""
    T = doc_ids.size(1)
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # (B, T) index where each token's document starts
    return idx - first


def default_backend(device, dropout=False) -> str:
    """The fastest exact path measured on this kind of device (see the module docstring).

    CUDA: flex attention, unless attention dropout is active (flex has none): then one call per document.
    CPU: a dense boolean mask (flex attention on the CPU needs inductor and ran slower; per-document calls
    cost a call each)."""
    if torch.device(device).type == "cuda":
        return "segments" if dropout else "flex"
    return "dense"


_flex = {}  # compiled once per process: flex_attention is only fast compiled (eager it is a reference path)


def _compiled_flex():
    """(flex_attention, create_block_mask), compiled; as they are inside a block that torch.compile is tracing
    (--compile_model=true), where the surrounding graph compiles them."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if torch.compiler.is_compiling():
        return flex_attention, create_block_mask
    if "attention" not in _flex:
        _flex["attention"] = torch.compile(flex_attention, dynamic=False)
        # Compiled, create_block_mask never materialises the (B, T, T) mask either.
        _flex["block_mask"] = torch.compile(create_block_mask, dynamic=False)
    return _flex["attention"], _flex["block_mask"]


class DocumentMask:
    """Per-document causal attention for a batch of packed rows, prepared once per forward pass and shared
    by every layer. doc_ids: (B, T) integer tensor; backend: one of BACKENDS, or None for the device's default."""

    def __init__(self, doc_ids, backend=None, dropout=False):
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be (batch, time), got shape {tuple(doc_ids.shape)}")
        self.backend = backend or default_backend(doc_ids.device, dropout)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.backend!r}; choose one of {BACKENDS}")
        self.doc_ids = doc_ids
        self.positions = positions_in_document(doc_ids)  # (B, T)
        B, T = doc_ids.shape
        if self.backend == "dense":
            causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
            same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
            self.mask = (same & causal)[:, None]  # (B, 1, T, T): broadcast over the heads
        elif self.backend == "flex":
            _, create_block_mask = _compiled_flex()

            def same_document_causal(b, h, q_idx, kv_idx):
                return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

            self.block_mask = create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)
        else:
            # (row, start, end) of every document: one host read of the boundaries, for all layers.
            starts = (self.positions == 0).nonzero().tolist()
            self.segments = []
            for i, (b, s) in enumerate(starts):
                nb, ns = starts[i + 1] if i + 1 < len(starts) else (B, 0)
                self.segments.append((b, s, ns if nb == b else T))

    def attend(self, q, k, v, dropout_p=0.0):
        """q, k, v (B, nh, T, hs) -> (B, nh, T, hs), each query attending causally within its document."""
        if self.backend == "dense":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout_p)
        if self.backend == "flex":
            if dropout_p:
                raise ValueError("flex attention has no attention dropout: use the 'segments' backend")
            flex_attention, _ = _compiled_flex()
            return flex_attention(q, k, v, block_mask=self.block_mask)
        rows = [[] for _ in range(q.size(0))]
        for b, s, e in self.segments:
            rows[b].append(F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                          dropout_p=dropout_p, is_causal=True))
        return torch.cat([torch.cat(r, dim=2) for r in rows], dim=0)  # (B, nh, T, hs)
