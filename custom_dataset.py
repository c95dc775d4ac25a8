"""Datasets for the training loop: memmapped pretraining tokens and tokenised fine-tuning examples.

Both loaders draw from one GLOBAL sample order that does not depend on the number of ranks:
optimizer step k consumes the G = micro_batch_size * grad_accum_steps * world_size samples at
global positions [k*G, (k+1)*G), and rank r's micro-step m takes

    k*G + (m*world_size + r)*micro_batch_size + [0, micro_batch_size)

So 2 ranks x micro-batch b see, per step, the same samples as 1 rank x micro-batch b x 2
accumulation steps; ranks never share a sample; and `state_dict()` (global samples consumed,
identical on every rank) resumes at another world size exactly where the run stopped.

Pretraining: a source's windows are non-overlapping: window i = tokens[i*T : i*T + T + 1]
(x = first T, y = last T). Each epoch of a source visits every window once, in a permutation
seeded by (seed, source, epoch). With several sources, the source of global position q is drawn
from the weights by a counter-based RNG (seed, q // 4096): any rank can work out every source's
cursor without talking to the others.

Fine-tuning: examples are permuted per epoch with (seed, epoch); the stream runs on across epochs
(epoch = global position // number of examples). `finetune_collate` right-pads with EOT and puts
-100 in the labels wherever the target is a prompt token or padding. No attention mask: with
right padding and causal attention, padding never affects a real token.

Packed fine-tuning (pack=True): a sample is a row of max_seq_length tokens holding several examples
side by side, planned per epoch by best-fit decreasing over that epoch's permutation (`plan_rows`);
the rows, not the examples, then follow the global order above, so packing too is the same at every
world size and resumes mid-epoch from the position alone. A packed batch carries `doc_ids`, and the
model keeps each example's attention and positions to itself (models/attention.py).
"""
import bisect
import json
import math
import os
import sys
from typing import NamedTuple

import numpy as np
import torch

from models.loss import IGNORE_INDEX
from utils.data.kinds import not_built_hint
from utils.errors import UserError
from utils.tokenizer import EOT_TOKEN


class DatasetError(UserError, ValueError):
    """A built dataset (or a saved loader state) that this loader cannot use, and what to do about it."""

CHOICE_CHUNK = 4096
# Domain tags: the source choices and each source's permutations come from unrelated RNG streams.
_CHOICE_STREAM, _WINDOW_STREAM, _EXAMPLE_STREAM, _ROW_STREAM = 1, 2, 3, 4


class EmptySplitError(DatasetError):
    """A split with nothing to read (an empty val.jsonl, a val.bin shorter than one sequence)."""


def check_pretrain_dir(data_dir, split="train"):
    """Raise (saying what data_dir holds instead) unless it holds a built pretraining split; returns its path."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretraining data {path} not found: {not_built_hint(data_dir, 'pretrain')}")
    check_token_file(path, meta_tokens(data_dir, split))
    return path


def check_token_file(path, expected_tokens=None):
    """Raise unless `path` is whole: a number of uint16 tokens, as many as meta.json records (when it does).
    A copy cut short would otherwise fail deep inside numpy, or train on part of the data unnoticed."""
    size = os.path.getsize(path)
    if size % 2:
        raise DatasetError(f"{path} is {size} bytes, not a whole number of uint16 tokens (cut short?); rebuild it "
                           "with build_pretrain_datasets.py or copy it again")
    if expected_tokens is not None and size // 2 != expected_tokens:
        raise DatasetError(f"{path} holds {size // 2} tokens, but its meta.json records {expected_tokens} (cut short "
                           "or replaced?); rebuild it with build_pretrain_datasets.py or copy it again")


def meta_tokens(data_dir, split):
    """The token count meta.json records for a split (build_pretrain_datasets.py writes it), or None."""
    try:
        with open(os.path.join(data_dir, "meta.json"), encoding="utf-8") as f:
            tokens = json.load(f)["splits"][split]["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tokens if isinstance(tokens, int) else None


def _check_layout(micro_batch_size, grad_accum_steps, rank, world_size, seed):
    for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("grad_accum_steps", grad_accum_steps, 1),
                             ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not below world_size {world_size}")


class _GlobalOrder:
    """Bookkeeping shared by both loaders: global position of the current step and micro-step."""

    def _init_order(self, micro_batch_size, grad_accum_steps, rank, world_size, seed):
        _check_layout(micro_batch_size, grad_accum_steps, rank, world_size, seed)
        self.micro_batch_size, self.grad_accum_steps = int(micro_batch_size), int(grad_accum_steps)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.position = 0    # global samples consumed by completed optimizer steps
        self.micro_step = 0  # next micro-step within the current step

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def _my_offset(self) -> int:
        """Offset of this rank's next micro-batch inside the current step."""
        return (self.micro_step * self.world_size + self.rank) * self.micro_batch_size

    def _advance(self):
        self.micro_step += 1
        if self.micro_step == self.grad_accum_steps:
            self.micro_step = 0
            self.position += self.global_batch_size
            return True
        return False


class PretrainLoader(_GlobalOrder):
    """Batches of (x, y) windows from one or more build_pretrain_datasets.py outputs, mixed by weight."""

    def __init__(self, sources, split, block_size, micro_batch_size, grad_accum_steps=1,
                 rank=0, world_size=1, seed=0, doc_mask=False):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        sources = [(s, 1.0) if isinstance(s, (str, os.PathLike)) else tuple(s) for s in sources]
        if not sources:
            raise ValueError("no pretraining sources given: pass [(data_dir, weight), ...]")
        self._init_order(micro_batch_size, grad_accum_steps, rank, world_size, seed)
        self.split, self.block_size, self.doc_mask = split, int(block_size), bool(doc_mask)
        self.data_dirs = [str(d) for d, _ in sources]
        weights = np.array([float(w) for _, w in sources])
        if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            raise ValueError(f"source weights must be positive numbers, got {weights.tolist()}")
        self.weights = (weights / weights.sum()).tolist()
        self._cum_weights = np.cumsum(weights / weights.sum())
        self._data = [self._open(d) for d in self.data_dirs]  # memmaps: opened once, never read whole
        self.windows = [(len(a) - 1) // self.block_size if len(a) else 0 for a in self._data]
        for d, a, w in zip(self.data_dirs, self._data, self.windows):
            if w < 1:
                # block_size is the training scripts' --max_seq_length: name the flag the user sets
                raise EmptySplitError(f"{os.path.join(d, split + '.bin')} has {len(a)} tokens, fewer than one "
                                      f"sequence of --max_seq_length={self.block_size} tokens + 1; use a smaller "
                                      "--max_seq_length or more data"
                                      + (" (build_pretrain_datasets.py: a larger --val_fraction)"
                                         if split == "val" else ""))
        self.source_counts = [0] * len(self._data)  # samples drawn from each source before `position`
        self._perms, self._choice_cache, self._step = {}, {}, None

    def _open(self, data_dir):
        path = check_pretrain_dir(data_dir, self.split)
        meta_path = os.path.join(data_dir, "meta.json")
        if os.path.isfile(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("dtype", "uint16") != "uint16":
                raise DatasetError(f"{meta_path} says dtype {meta.get('dtype')!r}; this loader reads uint16 tokens")
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=np.uint16)
        return np.memmap(path, dtype=np.uint16, mode="r")

    def __len__(self):
        """Windows in one pass over this split (summed over sources)."""
        return self.windows_per_epoch

    @property
    def windows_per_epoch(self) -> int:
        """Windows in one pass over this split (summed over sources)."""
        return sum(self.windows)

    @property
    def source_epochs(self) -> list:
        """Completed epochs of each source (as a float: 1.5 = half-way through the second)."""
        return [c / w for c, w in zip(self.source_counts, self.windows)]

    def _sources_of(self, start, stop) -> np.ndarray:
        """Source index of each global position in [start, stop)."""
        if len(self._data) == 1:
            return np.zeros(stop - start, dtype=np.int64)
        out = []
        for chunk in range(start // CHOICE_CHUNK, (stop - 1) // CHOICE_CHUNK + 1):
            if chunk not in self._choice_cache:
                if len(self._choice_cache) > 8:
                    self._choice_cache.pop(next(iter(self._choice_cache)))
                u = np.random.default_rng((self.seed, _CHOICE_STREAM, chunk)).random(CHOICE_CHUNK)
                picks = np.searchsorted(self._cum_weights, u, side="right")
                self._choice_cache[chunk] = np.minimum(picks, len(self._data) - 1)
            lo, hi = max(start, chunk * CHOICE_CHUNK), min(stop, (chunk + 1) * CHOICE_CHUNK)
            out.append(self._choice_cache[chunk][lo - chunk * CHOICE_CHUNK: hi - chunk * CHOICE_CHUNK])
        return np.concatenate(out)

    def _window(self, source, j) -> int:
        """The window of the j-th sample ever drawn from `source`."""
        epoch, i = divmod(int(j), self.windows[source])
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) >= 2 * len(self._data):
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng((self.seed, _WINDOW_STREAM, source, epoch))
            self._perms[key] = rng.permutation(self.windows[source])
        return int(self._perms[key][i])

    def _step_plan(self):
        """(source, index within that source) of every sample of the current step; the same on every rank."""
        if self._step is None:
            G = self.global_batch_size
            src = self._sources_of(self.position, self.position + G)
            j = np.empty(G, dtype=np.int64)
            for s in range(len(self._data)):
                mask = src == s
                j[mask] = self.source_counts[s] + np.arange(int(mask.sum()))
            self._step = (src, j)
        return self._step

    def next_batch(self):
        """(x, y): int64 CPU tensors of shape (micro_batch_size, block_size); y is x shifted by one.
        With doc_mask: (x, y, doc_ids), a new document starting at every <|endoftext|> of x (see `eot_doc_ids`)."""
        src, j = self._step_plan()
        off, T = self._my_offset(), self.block_size
        rows = []
        for s, k in zip(src[off:off + self.micro_batch_size], j[off:off + self.micro_batch_size]):
            w = self._window(int(s), k)
            rows.append(self._data[s][w * T: w * T + T + 1])
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        if self._advance():
            counts = np.bincount(src, minlength=len(self._data))
            self.source_counts = [c + int(n) for c, n in zip(self.source_counts, counts)]
            self._step = None
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        return (x, y, eot_doc_ids(x)) if self.doc_mask else (x, y)

    def state_dict(self) -> dict:
        """Plain ints and lists, the same on every rank and for any world size (taken between steps)."""
        return {"position": self.position, "micro_step": self.micro_step, "source_counts": list(self.source_counts),
                "seed": self.seed, "block_size": self.block_size, "windows": list(self.windows)}

    def load_state_dict(self, d):
        for key, mine in (("seed", self.seed), ("block_size", self.block_size), ("windows", self.windows)):
            if key in d and list(np.atleast_1d(d[key])) != list(np.atleast_1d(mine)):
                raise DatasetError(f"data loader state was saved with {key}={d[key]}, this loader has {key}={mine}: "
                                 f"resume with the same data, seed and block_size")
        if len(d["source_counts"]) != len(self._data):
            raise DatasetError(f"data loader state has {len(d['source_counts'])} sources, "
                               f"this loader has {len(self._data)}")
        self.position, self.micro_step = int(d["position"]), int(d.get("micro_step", 0))
        self.source_counts = [int(c) for c in d["source_counts"]]
        self._step = None


def eot_doc_ids(x, eot=EOT_TOKEN):
    """(B, T) document ids of pretraining windows: <|endoftext|> opens the next document. So the EOT that ends
    a document is the first token of the next one, from which the model predicts a document's first token
    with nothing before it (as unconditional sampling from <|endoftext|> does); a document's last token
    still predicts the EOT, from its own document. A window's first tokens (the tail of a document begun
    in an earlier window) are document 0."""
    return (x == eot).long().cumsum(dim=1)


class FinetuneBatch(NamedTuple):
    """(input_ids, labels), both (B, T) int64; unpacks as a pair."""
    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def num_targets(self) -> int:
        """Tokens that carry a loss (labels != -100): what the loss is normalised by."""
        return int((self.labels != IGNORE_INDEX).sum())


class PackedBatch(NamedTuple):
    """(input_ids, labels, doc_ids), all (B, T) int64: rows of several examples, each its own document;
    the row's padding is one more document. The model is trained as model(input_ids, targets=labels,
    doc_ids=doc_ids)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _truncate(p, c, max_seq_length):
    """Fit prompt + completion into max_seq_length tokens: the prompt loses its start; if the
    completion alone is too long, it keeps its start and one prompt token stays in front of it."""
    if max_seq_length is None or len(p) + len(c) <= max_seq_length:
        return p, c
    if len(c) >= max_seq_length:
        return p[-1:], c[:max_seq_length - 1]
    return p[len(p) + len(c) - max_seq_length:], c


def finetune_collate(examples, pad_id=EOT_TOKEN, max_seq_length=None) -> FinetuneBatch:
    """Right-padded (input_ids, labels) from (prompt_ids, completion_ids) pairs (or dicts with those keys).

    For seq = prompt + completion (at most `max_seq_length` tokens, the same meaning as
    build_finetune_datasets.py's --max_seq_len): input_ids = seq[:-1], labels[t] = seq[t + 1] where
    that is a completion token, else -100; padding is `pad_id` with label -100. T is the longest
    row's length. The model is trained as model(input_ids, targets=labels).
    """
    if max_seq_length is not None and max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
    rows = [_example_tokens(ex, max_seq_length) for ex in examples]
    T = max(max(len(x), 1) for x, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, (x, y) in enumerate(rows):
        input_ids[b, :len(x)], labels[b, :len(y)] = torch.from_numpy(x), torch.from_numpy(y)
    return FinetuneBatch(input_ids, labels)


def _example_tokens(ex, max_seq_length):
    """(input ids, labels) of one example, n tokens each (n = len(prompt + completion) - 1 after truncation):
    input = seq[:-1], label[t] = seq[t + 1] where that is a completion token, else -100."""
    if isinstance(ex, dict):
        ex = (ex["prompt_ids"], ex["completion_ids"])
    p, c = (np.asarray(x, dtype=np.int64) for x in ex)
    p, c = _truncate(p, c, max_seq_length)
    seq = np.concatenate([p, c])
    n = len(seq) - 1
    labels = np.full(max(n, 0), IGNORE_INDEX, dtype=np.int64)
    first = max(len(p) - 1, 0)  # input position whose target is the first completion token
    labels[first:n] = seq[first + 1:]
    return seq[:-1], labels


def packed_collate(rows, row_length, pad_id=EOT_TOKEN, max_seq_length=None) -> PackedBatch:
    """Rows of examples side by side -> PackedBatch of shape (len(rows), row_length).

    rows: one list of (prompt_ids, completion_ids) pairs per row. Each example is tokenised exactly as
    `finetune_collate` does it (same truncation, same labels) and numbered 0, 1, ... in its row; the
    padding after the last one is `pad_id` with label -100 and a document of its own.
    """
    input_ids = torch.full((len(rows), row_length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), row_length), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.zeros((len(rows), row_length), dtype=torch.long)
    for b, examples in enumerate(rows):
        s = 0
        for d, ex in enumerate(examples):
            x, y = _example_tokens(ex, max_seq_length)
            if s + len(x) > row_length:
                raise ValueError(f"row {b} holds {s + len(x)} tokens, more than row_length {row_length}")
            input_ids[b, s:s + len(x)], labels[b, s:s + len(x)] = torch.from_numpy(x), torch.from_numpy(y)
            doc_ids[b, s:s + len(x)] = d
            s += len(x)
        doc_ids[b, s:] = len(examples)
    return PackedBatch(input_ids, labels, doc_ids)


def best_fit_decreasing(sizes, capacity) -> list:
    """Bins of item indices, each bin's sizes summing to at most `capacity` (every size must fit one).

    Items in decreasing size (ties: in the order given), each into the open bin it fills best (the least
    room left that still fits), else a new bin: O(n log capacity), deterministic. The bin count depends only
    on the sizes, so every epoch's permutation of the same examples packs into as many rows."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and (sizes.max() > capacity or sizes.min() < 0):
        raise ValueError(f"item sizes must lie in [0, {capacity}], got {sizes.min()}..{sizes.max()}")
    bins = []
    rooms = []     # sorted distinct rooms that some open bin has left
    by_room = {}   # room -> open bins with exactly that room (a stack: deterministic)
    for i in np.argsort(-sizes, kind="stable").tolist():
        size = int(sizes[i])
        j = bisect.bisect_left(rooms, size)
        if j < len(rooms):  # the tightest bin that still fits
            room = rooms[j]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(j)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        room -= size
        if room > 0:
            if room not in by_room:
                bisect.insort(rooms, room)
                by_room[room] = []
            by_room[room].append(b)
    return bins


def plan_rows(lengths, capacity, seed, epoch, shuffle=True) -> list:
    """One epoch's packed rows (lists of example indices): best-fit decreasing over the epoch's permutation
    of the examples (ties of equal length fall in permutation order), then the rows themselves shuffled.
    A pure function of (lengths, capacity, seed, epoch): every rank plans the same rows, cheaply (one sort
    and one pass over the lengths per epoch)."""
    n = len(lengths)
    order = np.random.default_rng((seed, _EXAMPLE_STREAM, epoch)).permutation(n) if shuffle else np.arange(n)
    rows = [[int(order[i]) for i in row] for row in best_fit_decreasing(np.asarray(lengths)[order], capacity)]
    if shuffle:
        rows = [rows[i] for i in np.random.default_rng((seed, _ROW_STREAM, epoch)).permutation(len(rows))]
    return rows


_noted = set()  # the val loader is made afresh at every evaluation: say it once


def check_lengths(path, prompts, completions, max_seq_length, log=True):
    """finetune_collate cuts examples longer than max_seq_length. Refuse when a completion would lose its
    end (" END" included: the model would learn not to stop); note how many lose the start of their prompt
    (what build_finetune_datasets.py itself does to long prompts)."""
    n_prompt = np.array([len(p) for p in prompts])
    n_completion = np.array([len(c) for c in completions])
    cut = int((n_prompt + n_completion > max_seq_length).sum())
    if not cut:
        return
    meta_path = os.path.join(os.path.dirname(path), "meta.json")
    built = None
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            built = json.load(f).get("max_seq_len")
    built = f" was built with --max_seq_len {built};" if built else ""
    lost_end = int((n_completion >= max_seq_length).sum())  # _truncate keeps one prompt token in front
    if lost_end:
        raise DatasetError(f"{path}{built} at --max_seq_length={max_seq_length}, {lost_end} of its {len(prompts)} "
                           f"examples would lose the end of their completion (\" END\" included): rebuild it with "
                           f"build_finetune_datasets.py --max_seq_len {max_seq_length} (which drops those) or raise "
                           f"--max_seq_length")
    if log and (path, max_seq_length) not in _noted:
        _noted.add((path, max_seq_length))
        print(f"note: {path}{built} at --max_seq_length={max_seq_length}, {cut} of its {len(prompts)} examples "
              f"lose the start of their prompt", file=sys.stderr, flush=True)


def load_id_lists(path, keys, shape):
    """One list of int32 arrays per key, from a train.jsonl / val.jsonl of token-id lists (every key but the
    first, the prompt, must be non-empty: an answer). `shape` names the expected line in the error."""
    out = tuple([] for _ in keys)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                ids = [ex[k] for k in keys]
                if not all(isinstance(a, list) for a in ids) or not all(ids[1:]):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise DatasetError(f"{path}:{lineno}: expected {shape}; rebuild it with "
                                   "build_finetune_datasets.py") from None
            for dst, a in zip(out, ids):
                dst.append(np.asarray(a, dtype=np.int32))
    return out


def load_examples(path):
    """(prompts, completions): lists of int32 arrays from a train.jsonl / val.jsonl."""
    return load_id_lists(path, ("prompt_ids", "completion_ids"),
                         '{"prompt_ids": [...], "completion_ids": [...]} with a non-empty completion')


class FinetuneLoader(_GlobalOrder):
    """Batches of padded fine-tuning examples from a build_finetune_datasets.py train.jsonl / val.jsonl.

    pack=True: batches of packed rows of max_seq_length tokens (PackedBatch); a sample of the global order is
    then a row, and len() counts rows. limit: only the first `limit` examples of the file (evaluation: the
    same examples whether packed or not)."""

    def __init__(self, path, micro_batch_size, grad_accum_steps=1, rank=0, world_size=1, seed=0,
                 max_seq_length=None, shuffle=True, pack=False, limit=None):
        if not os.path.isfile(path):
            hint = not_built_hint(os.path.dirname(path) or ".", "finetune")
            raise FileNotFoundError(f"fine-tuning data {path} not found: {hint}")
        self._init_order(micro_batch_size, grad_accum_steps, rank, world_size, seed)
        self.path, self.max_seq_length, self.shuffle = str(path), max_seq_length, bool(shuffle)
        self._prompts, self._completions = load_examples(path)
        if limit is not None:
            self._prompts, self._completions = self._prompts[:limit], self._completions[:limit]
        if not self._prompts:
            raise EmptySplitError(f"{path} holds no examples; rebuild it with build_finetune_datasets.py "
                             f"(for val.jsonl: a --val_fraction above 0)")
        if max_seq_length is not None:
            check_lengths(path, self._prompts, self._completions, max_seq_length, log=rank == 0)
        self._perm = (None, None)
        self.pack = bool(pack)
        if self.pack:
            if max_seq_length is None:
                raise ValueError("pack=True needs max_seq_length (the length of a packed row)")
            # Tokens each example takes in a row (after truncation); one that has none carries no target.
            lengths = np.minimum([len(p) + len(c) for p, c in zip(self._prompts, self._completions)],
                                 max_seq_length) - 1
            self._packable = np.flatnonzero(lengths > 0)
            self._lengths = lengths[self._packable]
            if not len(self._lengths):
                raise EmptySplitError(f"{path}: no example has a token to train on; rebuild it with "
                                      f"build_finetune_datasets.py")
            self.row_length = max_seq_length
            self._rows = (0, plan_rows(self._lengths, self.row_length, self.seed, 0, self.shuffle))

    def __len__(self):
        """Samples per epoch: examples, or packed rows (the same count in every epoch)."""
        return len(self._rows[1]) if self.pack else len(self._prompts)

    @property
    def num_examples(self) -> int:
        return len(self._prompts)

    def _row(self, g) -> list:
        """Example indices of the g-th packed row of the global stream."""
        epoch, i = divmod(g, len(self))
        if self._rows[0] != epoch:
            self._rows = (epoch, plan_rows(self._lengths, self.row_length, self.seed, epoch, self.shuffle))
        return [int(self._packable[j]) for j in self._rows[1][i]]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self) / self.global_batch_size)

    @property
    def epoch(self) -> int:
        """Epoch of the next sample (of the global stream)."""
        return (self.position + self.micro_step * self.world_size * self.micro_batch_size) // len(self)

    def set_epoch(self, epoch: int):
        """Jump to the first sample of `epoch` (at a step boundary)."""
        self.position, self.micro_step = int(epoch) * len(self), 0

    def _example_index(self, g) -> int:
        epoch, i = divmod(g, len(self))
        if not self.shuffle:
            return i
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, _EXAMPLE_STREAM, epoch)).permutation(len(self)))
        return int(self._perm[1][i])

    def next_batch(self) -> FinetuneBatch | PackedBatch:
        """(input_ids, labels), see `finetune_collate`; `.num_targets` counts the loss tokens.
        Packed: (input_ids, labels, doc_ids) of max_seq_length-token rows, see `packed_collate`."""
        start = self.position + self._my_offset()
        if self.pack:
            rows = [[(self._prompts[i], self._completions[i]) for i in self._row(g)]
                    for g in range(start, start + self.micro_batch_size)]
            self._advance()
            return packed_collate(rows, self.max_seq_length, pad_id=EOT_TOKEN, max_seq_length=self.max_seq_length)
        picked = [self._example_index(g) for g in range(start, start + self.micro_batch_size)]
        batch = finetune_collate([(self._prompts[i], self._completions[i]) for i in picked],
                                 pad_id=EOT_TOKEN, max_seq_length=self.max_seq_length)
        self._advance()
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "micro_step": self.micro_step, "seed": self.seed,
                "num_examples": self.num_examples, "shuffle": int(self.shuffle), "pack": int(self.pack)}

    def load_state_dict(self, d):
        # A state without "pack" was saved before packing existed: unpacked.
        for key, mine in (("seed", self.seed), ("num_examples", self.num_examples), ("shuffle", int(self.shuffle)),
                          ("pack", int(self.pack))):
            saved = int(d.get(key, 0 if key == "pack" else mine))
            if saved != mine:
                raise DatasetError(f"data loader state was saved with {key}={saved}, this loader has {key}={mine}: "
                                 f"resume with the same data, seed, shuffle and pack")
        self.position, self.micro_step = int(d["position"]), int(d.get("micro_step", 0))


class PreferenceBatch(NamedTuple):
    """DPO's micro-batch: chosen rows then rejected rows, so one forward scores both.

    input_ids, labels: (2B, T) int64, rows [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}], labels
    exactly the answer tokens (as finetune_collate); index: (B,) the pairs' line numbers in their file (for
    reference log-probabilities computed once, see utils/training/dpo.py)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


def _truncate_pair(p, c, r, max_seq_length):
    """Over max_seq_length, the prompt loses its start until prompt + the longer answer fit (what
    build_finetune_datasets.py does, and TRL)."""
    if max_seq_length is not None and len(p) + max(len(c), len(r)) > max_seq_length:
        p = p[len(p) + max(len(c), len(r)) - max_seq_length:]
    return p, c, r


def preference_collate(pairs, index, pad_id=EOT_TOKEN, max_seq_length=None) -> PreferenceBatch:
    """(prompt_ids, chosen_ids, rejected_ids) triples -> PreferenceBatch (truncated by `_truncate_pair`)."""
    rows = [_truncate_pair(p, c, r, max_seq_length) for p, c, r in pairs]
    x, y = finetune_collate([(p, c) for p, c, _ in rows] + [(p, r) for p, _, r in rows], pad_id=pad_id)
    return PreferenceBatch(x, y, torch.as_tensor(index, dtype=torch.long))


class PackedPreferenceBatch(NamedTuple):
    """DPO's packed micro-batch: rows holding whole pairs, a pair's chosen and rejected sequences side by side
    in one row as two documents (each attends only to itself, positions from 0).

    input_ids, labels, doc_ids: (B, T) int64 as in PackedBatch; index: (P,) the line numbers of the P pairs
    the rows hold; sequence: (B, T) which of the 2P sequences each token belongs to, numbered as
    PreferenceBatch's rows (chosen of pair k = k, rejected = P + k; padding = 2P), so that segment sums over
    it give exactly PreferenceBatch's per-row sums (utils/training/dpo.py)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    index: torch.Tensor
    sequence: torch.Tensor


def _pair_tokens(p, c, r, max_seq_length):
    """The pair's chosen and rejected sequences, tokenised as preference_collate does: ((x, y), (x, y))."""
    p, c, r = _truncate_pair(p, c, r, max_seq_length)
    return _example_tokens((p, c), None), _example_tokens((p, r), None)


def packed_preference_collate(rows, row_length, pad_id=EOT_TOKEN, max_seq_length=None) -> PackedPreferenceBatch:
    """Rows of pairs -> PackedPreferenceBatch of shape (len(rows), row_length).

    rows: one list of (index, (prompt_ids, chosen_ids, rejected_ids)) per row. Each pair is tokenised exactly
    as preference_collate does it; its chosen then its rejected sequence take the next two documents of the row;
    the padding after the last pair is `pad_id` with label -100, documents of its own of at most row_length / 2
    tokens (row_length is 2 x max_seq_length: no document is longer than the model's block_size)."""
    n_pairs = sum(len(row) for row in rows)
    input_ids = torch.full((len(rows), row_length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), row_length), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.zeros((len(rows), row_length), dtype=torch.long)
    sequence = torch.full((len(rows), row_length), 2 * n_pairs, dtype=torch.long)
    index, k = [], 0
    for b, pairs in enumerate(rows):
        s, d = 0, 0
        for i, (p, c, r) in pairs:
            for seq_number, (x, y) in zip((k, n_pairs + k), _pair_tokens(p, c, r, max_seq_length)):
                if s + len(x) > row_length:
                    raise ValueError(f"row {b} holds {s + len(x)} tokens, more than row_length {row_length}")
                input_ids[b, s:s + len(x)], labels[b, s:s + len(x)] = torch.from_numpy(x), torch.from_numpy(y)
                doc_ids[b, s:s + len(x)], sequence[b, s:s + len(x)] = d, seq_number
                s, d = s + len(x), d + 1
            index.append(i)
            k += 1
        # The padding: documents of at most row_length / 2 (max_seq_length) tokens, as its positions must
        # stay below the model's block_size too.
        doc_ids[b, s:] = d + torch.arange(row_length - s) // max(row_length // 2, 1)
    return PackedPreferenceBatch(input_ids, labels, doc_ids, torch.as_tensor(index, dtype=torch.long), sequence)


def load_pairs(path):
    """(prompts, chosen, rejected): lists of int32 arrays from a preference train.jsonl / val.jsonl."""
    return load_id_lists(path, ("prompt_ids", "chosen_ids", "rejected_ids"),
                         '{"prompt_ids", "chosen_ids", "rejected_ids"} lists with non-empty answers')


class PreferenceLoader(FinetuneLoader):
    """FinetuneLoader's order (shuffled per epoch, resumable, any world size) over preference pairs.

    pack=True: batches of PackedPreferenceBatch rows of 2 x max_seq_length tokens (the room one pair takes
    unpacked at its longest, so every pair fits one row), a pair being one packing unit of its two sequences'
    tokens; planned by the same best-fit decreasing per epoch (`plan_rows`), so the same at every world size and
    resumable mid-epoch; len() then counts rows. `collate` stays unpacked (reference log-probs by pair)."""

    def __init__(self, path, micro_batch_size, grad_accum_steps=1, rank=0, world_size=1, seed=0,
                 max_seq_length=None, shuffle=True, pack=False):
        if not os.path.isfile(path):
            hint = not_built_hint(os.path.dirname(path) or ".", "finetune")
            raise FileNotFoundError(f"preference data {path} not found: {hint}")
        self._init_order(micro_batch_size, grad_accum_steps, rank, world_size, seed)
        self.path, self.max_seq_length, self.shuffle = str(path), max_seq_length, bool(shuffle)
        self._prompts, self._chosen, self._rejected = load_pairs(path)
        if not self._prompts:
            raise EmptySplitError(f"{path} holds no pairs; rebuild it with build_finetune_datasets.py "
                                  f"(for val.jsonl: a --val_fraction above 0)")
        if max_seq_length is not None:
            longest = [max(len(c), len(r)) for c, r in zip(self._chosen, self._rejected)]
            lost = sum(n > max_seq_length - 1 for n in longest)
            if lost:
                raise DatasetError(f"{path}: at --max_seq_length={max_seq_length}, {lost} of its {len(longest)} pairs "
                                   f"have an answer that does not fit: rebuild it with build_finetune_datasets.py "
                                   f"--max_seq_len {max_seq_length} (which drops those) or raise --max_seq_length")
        self._perm = (None, None)
        self.pack = bool(pack)
        if self.pack:
            if max_seq_length is None:
                raise ValueError("pack=True needs max_seq_length (a packed row holds 2 x max_seq_length tokens)")
            # A pair's tokens in a row: its two sequences after _truncate_pair, each len(prompt + answer) - 1.
            n_p, n_c, n_r = (np.array([len(a) for a in arrays]) for arrays in (self._prompts, self._chosen,
                                                                                 self._rejected))
            n_p = n_p - np.maximum(n_p + np.maximum(n_c, n_r) - max_seq_length, 0)
            self._lengths = np.maximum(n_p + n_c - 1, 0) + np.maximum(n_p + n_r - 1, 0)
            self._packable = np.arange(len(self._lengths))
            self.row_length = 2 * max_seq_length
            self._rows = (0, plan_rows(self._lengths, self.row_length, self.seed, 0, self.shuffle))

    def pair(self, i):
        return self._prompts[i], self._chosen[i], self._rejected[i]

    def collate(self, picked) -> PreferenceBatch:
        return preference_collate([self.pair(i) for i in picked], picked, pad_id=EOT_TOKEN,
                                  max_seq_length=self.max_seq_length)

    def next_batch(self) -> PreferenceBatch | PackedPreferenceBatch:
        start = self.position + self._my_offset()
        if self.pack:
            rows = [[(i, self.pair(i)) for i in self._row(g)] for g in range(start, start + self.micro_batch_size)]
            self._advance()
            return packed_preference_collate(rows, self.row_length, pad_id=EOT_TOKEN,
                                             max_seq_length=self.max_seq_length)
        batch = self.collate([self._example_index(g) for g in range(start, start + self.micro_batch_size)])
        self._advance()
        return batch
