"""Packed fine-tuning rows: best-fit decreasing, every example once per epoch, exact tokens and labels,
the same rows at every world size, resume mid-epoch; and the pretraining windows' document ids."""
import json
import random

import numpy as np
import pytest
import torch

from custom_dataset import (
    IGNORE_INDEX,
    FinetuneLoader,
    PackedBatch,
    best_fit_decreasing,
    eot_doc_ids,
    finetune_collate,
    packed_collate,
    plan_rows,
)


def naive_best_fit_decreasing(sizes, capacity):
    """The textbook version, O(n x bins): the reference for the fast one."""
    bins = []  # [room, items]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        fitting = [b for b in bins if b[0] >= sizes[i]]
        if fitting:
            best = min(fitting, key=lambda b: b[0])
        else:
            best = [capacity, []]
            bins.append(best)
        best[0] -= sizes[i]
        best[1].append(i)
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_matches_the_textbook_version(seed):
    rng = random.Random(seed)
    # Long-tailed: many short examples, a few near the capacity.
    sizes = [min(64, int(rng.paretovariate(1.2) * 4)) for _ in range(300)]
    bins = best_fit_decreasing(sizes, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))  # every item exactly once
    assert all(sum(sizes[i] for i in b) <= 64 for b in bins)
    ref = naive_best_fit_decreasing(sizes, 64)
    # Ties between bins with equal room may be broken differently; the fills cannot differ.
    assert sorted(sum(sizes[i] for i in b) for b in bins) == sorted(64 - room for room, _ in ref)
    assert len(bins) >= -(-sum(sizes) // 64)  # never fewer bins than the volume needs


def test_best_fit_decreasing_by_hand():
    # 6 opens a bin (room 4), 5 another (room 5); 4 goes where it fits tightest (room 4), 3 and 2 into room 5.
    assert best_fit_decreasing([4, 6, 5, 3, 2], 10) == [[1, 0], [2, 3, 4]]  # two full rows
    with pytest.raises(ValueError, match=r"item sizes must lie in \[0, 10\]"):
        best_fit_decreasing([11], 10)


def test_plan_is_a_pure_function_of_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(1, 30, 200)
    a, b = plan_rows(lengths, 32, seed=3, epoch=1), plan_rows(lengths, 32, seed=3, epoch=1)
    assert a == b
    other = plan_rows(lengths, 32, seed=3, epoch=2)
    assert other != a and len(other) == len(a)  # another epoch: other rows, as many of them
    assert sorted(i for r in other for i in r) == list(range(200))


def write_examples(path, lengths, seed=0):
    """Example i: prompt (1000 + i) repeated, completion of random ids; total length lengths[i]."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i, n in enumerate(lengths):
            p = rng.randint(1, n - 1)
            f.write(json.dumps({"prompt_ids": [1000 + i] * p, "completion_ids": [rng.randint(0, 999)
                                                                                for _ in range(n - p)]}) + "\n")
    return str(path)


def examples_in(batch):
    """Example indices in a packed batch, read from the tokens (each prompt is 1000 + i)."""
    out = []
    for row, docs, labels in zip(batch.input_ids, batch.doc_ids, batch.labels):
        for d in docs.unique().tolist():
            first = int(row[docs == d][0])
            if first != 50256:
                out.append(first - 1000)
            else:
                assert (labels[docs == d] == IGNORE_INDEX).all()  # the padding document has no target
    return out


@pytest.fixture
def long_tailed(tmp_path):
    rng = random.Random(1)
    lengths = [min(48, 2 + int(rng.paretovariate(1.1) * 3)) for _ in range(60)]
    return write_examples(tmp_path / "train.jsonl", lengths), lengths


def test_packed_rows_hold_the_examples_tokens_and_labels_exactly(long_tailed):
    path, lengths = long_tailed
    loader = FinetuneLoader(path, 4, seed=7, max_seq_length=48, pack=True)
    plain = FinetuneLoader(path, 1, shuffle=False, max_seq_length=48)
    batch = loader.next_batch()
    assert isinstance(batch, PackedBatch) and batch.input_ids.shape == (4, 48)
    for b in range(4):
        docs = batch.doc_ids[b]
        assert (docs[1:] >= docs[:-1]).all()  # documents side by side, then the padding
        for d in docs.unique().tolist():
            x = batch.input_ids[b][docs == d]
            if int(x[0]) == 50256:  # the padding
                continue
            i = int(x[0]) - 1000
            ref_x, ref_y = finetune_collate([(plain._prompts[i], plain._completions[i])], max_seq_length=48)
            n = lengths[i] - 1
            assert x.tolist() == ref_x[0, :n].tolist()
            assert batch.labels[b][docs == d].tolist() == ref_y[0, :n].tolist()


def test_every_example_once_per_epoch_and_little_padding(long_tailed):
    path, lengths = long_tailed
    loader = FinetuneLoader(path, 1, seed=7, max_seq_length=48, pack=True)
    rows = len(loader)
    assert -(-sum(n - 1 for n in lengths) // 48) <= rows < len(lengths) / 2
    epochs = []
    for _ in range(2):  # two epochs
        seen, padding = [], 0
        for _ in range(rows):
            batch = loader.next_batch()
            found = examples_in(batch)
            seen += found
            padding += 48 - sum(lengths[i] - 1 for i in found)
        assert sorted(seen) == list(range(len(lengths)))  # every example, once
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert padding <= 0.1 * rows * 48  # rows nearly full


def test_two_ranks_equal_one_rank_and_resume_mid_epoch(long_tailed):
    path, _ = long_tailed
    two = [FinetuneLoader(path, 2, rank=r, world_size=2, seed=4, max_seq_length=48, pack=True) for r in range(2)]
    one = FinetuneLoader(path, 2, grad_accum_steps=2, seed=4, max_seq_length=48, pack=True)
    stream_two, stream_one = [], []
    for _ in range(3):
        stream_two += [t for loader in two for t in loader.next_batch().input_ids.tolist()]
        stream_one += [t for _ in range(2) for t in one.next_batch().input_ids.tolist()]
    assert stream_two == stream_one
    # Resume from the state after 3 steps, at another world size: the same rows follow.
    resumed = FinetuneLoader(path, 1, grad_accum_steps=4, seed=4, max_seq_length=48, pack=True)
    resumed.load_state_dict(two[0].state_dict())
    after = [t for _ in range(4) for t in resumed.next_batch().input_ids.tolist()]
    assert after == [t for _ in range(2) for t in one.next_batch().input_ids.tolist()]
    unpacked = FinetuneLoader(path, 1, seed=4, max_seq_length=48)
    with pytest.raises(ValueError, match="saved with pack=1, this loader has pack=0"):
        unpacked.load_state_dict(two[0].state_dict())


def test_limit_packs_only_the_first_examples(long_tailed):
    path, _ = long_tailed
    val = FinetuneLoader(path, 4, shuffle=False, max_seq_length=48, pack=True, limit=10)
    seen = []
    for _ in range(-(-len(val) // 4)):
        seen += examples_in(val.next_batch())
    assert sorted(set(seen)) == list(range(10))


def test_packed_collate_refuses_an_overfull_row():
    with pytest.raises(ValueError, match="holds 6 tokens, more than row_length 4"):
        packed_collate([[([1, 2], [3, 7]), ([4, 5], [6, 8])]], 4)


def test_eot_opens_a_document_in_pretraining_windows():
    x = torch.tensor([[5, 6, 50256, 7, 8, 50256, 50256, 9]])
    assert eot_doc_ids(x).tolist() == [[0, 0, 1, 1, 1, 2, 3, 3]]
