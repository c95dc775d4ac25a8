import json
import math
import os

import numpy as np
import pytest
import torch

from custom_dataset import IGNORE_INDEX, FinetuneLoader, PretrainLoader, finetune_collate

T = 8


def make_source(root, name, n_tokens, offset=0, val_tokens=None):
    """A tiny pretraining dir whose token t is (offset + t) % 60000: a window is known by its first token."""
    d = os.path.join(root, name)
    os.makedirs(d)
    (np.arange(offset, offset + n_tokens) % 60000).astype(np.uint16).tofile(os.path.join(d, "train.bin"))
    (np.arange(val_tokens or 3 * T + 1) % 60000).astype(np.uint16).tofile(os.path.join(d, "val.bin"))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"dtype": "uint16"}, f)
    return d


def window_ids(x, offset=0):
    """Window index of each row of x (its first token says where it starts)."""
    return [(int(r[0]) - offset) // T for r in x]


def loaders(sources, B, A, W, seed=0, split="train"):
    return [PretrainLoader(sources, split, T, B, grad_accum_steps=A, rank=r, world_size=W, seed=seed) for r in range(W)]


def run_steps(ls, steps):
    """Per optimizer step: [per rank: [per micro-step: x]]."""
    out = []
    for _ in range(steps):
        out.append([[loader.next_batch()[0] for _ in range(loader.grad_accum_steps)] for loader in ls])
    return out


def test_windows_x_y_and_memmap(tmp_path):
    src = make_source(tmp_path, "a", 10 * T + 3)
    loader = PretrainLoader([(src, 1.0)], "train", T, 4)
    assert loader.windows_per_epoch == 10
    assert isinstance(loader._data[0], np.memmap)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1) and x.is_contiguous() and y.is_contiguous()  # y is x shifted by one
    assert all(int(r[0]) % T == 0 for r in x)  # non-overlapping windows start at multiples of T


@pytest.mark.parametrize("B,A,W", [(3, 1, 1), (2, 2, 2), (1, 1, 3)])
def test_an_epoch_visits_every_window_once_and_ranks_never_share(tmp_path, B, A, W):
    n_windows = 24
    src = make_source(tmp_path, "a", n_windows * T + 1)
    ls = loaders([(src, 1)], B, A, W, seed=3)
    G = B * A * W
    seen = []
    for step in run_steps(ls, n_windows // G):
        per_rank = [sum((window_ids(x) for x in micro), []) for micro in step]
        flat = sum(per_rank, [])
        assert len(set(flat)) == len(flat)  # no window twice in a step, so no two ranks share one
        seen += flat
    assert sorted(seen) == list(range(n_windows))
    # the next epoch is another permutation of all windows
    nxt = sum((window_ids(x) for s in run_steps(ls, n_windows // G) for m in s for x in m), [])
    assert sorted(nxt) == list(range(n_windows)) and nxt != seen


def test_two_ranks_equal_one_rank_with_two_accumulation_steps(tmp_path):
    a = make_source(tmp_path, "a", 50 * T + 1)
    b = make_source(tmp_path, "b", 7 * T + 1, offset=30000)
    sources = [(a, 0.7), (b, 0.3)]
    two_ranks = run_steps(loaders(sources, 2, 1, 2, seed=9), 12)
    one_rank = run_steps(loaders(sources, 2, 2, 1, seed=9), 12)
    for s2, s1 in zip(two_ranks, one_rank):
        # rank r's micro-step m is global slot m*W + r: with A=1, W=2 that is 1 rank's micro-step r
        assert torch.equal(s2[0][0], s1[0][0]) and torch.equal(s2[1][0], s1[0][1])


def test_state_dict_resumes_exactly_even_at_another_world_size(tmp_path):
    a = make_source(tmp_path, "a", 13 * T + 1)
    b = make_source(tmp_path, "b", 5 * T + 1, offset=30000)
    sources = [(a, 2.0), (b, 1.0)]
    reference = run_steps(loaders(sources, 2, 1, 2, seed=1), 10)
    first = loaders(sources, 2, 1, 2, seed=1)
    run_steps(first, 4)
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1]
    assert all(type(v) in (int, float, list) for v in states[0].values())
    assert all(type(i) is int for v in states[0].values() if isinstance(v, list) for i in v)
    resumed = loaders(sources, 2, 2, 1, seed=1)  # one rank, two accumulation steps
    resumed[0].load_state_dict(json.loads(json.dumps(states[0])))
    for ref, got in zip(reference[4:], run_steps(resumed, 6)):
        assert torch.equal(ref[0][0], got[0][0]) and torch.equal(ref[1][0], got[0][1])
    other = loaders(sources, 2, 1, 1, seed=2)[0]
    with pytest.raises(ValueError, match="saved with seed=1, this loader has seed=2"):
        other.load_state_dict(states[0])


def test_sources_are_mixed_by_weight_and_each_visits_its_windows_once_per_epoch(tmp_path):
    a = make_source(tmp_path, "a", 100 * T + 1)
    b = make_source(tmp_path, "b", 20 * T + 1, offset=30000)
    loader = PretrainLoader([(a, 0.75), (b, 0.25)], "train", T, 8, seed=4)
    from_a, from_b = [], []
    for _ in range(100):  # 800 samples
        x, _ = loader.next_batch()
        for r in x:
            (from_b if int(r[0]) >= 30000 else from_a).append(int(r[0]))
    assert 0.70 < len(from_a) / 800 < 0.80
    for ids, n in ((from_a, 100), (from_b, 20)):
        for e in range(len(ids) // n):  # every full epoch of a source is a permutation of its windows
            assert len(set(ids[e * n:(e + 1) * n])) == n
    assert loader.state_dict()["source_counts"] == [len(from_a), len(from_b)]


def test_val_split_and_fresh_loaders_repeat(tmp_path):
    src = make_source(tmp_path, "a", 10 * T + 1, val_tokens=6 * T + 1)
    first = [PretrainLoader([(src, 1)], "val", T, 2, seed=0).next_batch()[0] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert PretrainLoader([(src, 1)], "val", T, 2).windows_per_epoch == 6


def test_missing_or_too_small_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; run build_pretrain_datasets.py"):
        PretrainLoader([(str(tmp_path / "nope"), 1)], "train", T, 2)
    os.makedirs(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match=r"train.bin not found: .* run build_pretrain_datasets.py"):
        PretrainLoader([(str(tmp_path / "half"), 1)], "train", T, 2)
    src = make_source(tmp_path, "a", T)
    # named by the flag the user sets (--max_seq_length), not the loader's block_size (issue 20 item 8)
    with pytest.raises(ValueError, match=r"has 8 tokens, fewer than one sequence of --max_seq_length=8 tokens \+ 1; "
                                         r"use a smaller --max_seq_length or more data$"):
        PretrainLoader([(src, 1)], "train", T, 2)
    with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
        PretrainLoader([(src, 1)], "val", T, 2, rank=2, world_size=2)


# --- fine-tuning ---

def test_collate_masks_exactly_prompt_and_padding():
    examples = [([1, 2, 3], [10, 11]), ([4], [12, 13, 14, 15]), ([5, 6], [16])]
    x, labels = finetune_collate(examples)
    assert x.shape == labels.shape == (3, 4)
    for b, (p, c) in enumerate(examples):
        seq = p + c
        for t in range(4):
            target_is_completion = len(p) <= t + 1 < len(seq)
            assert (labels[b, t] != IGNORE_INDEX) == target_is_completion
            if target_is_completion:
                assert labels[b, t] == seq[t + 1]
            assert x[b, t] == (seq[t] if t < len(seq) - 1 else 50256)  # right-padded with EOT
    assert finetune_collate(examples).num_targets == 2 + 4 + 1


def test_collate_truncates_the_prompt_from_the_left():
    x, labels = finetune_collate([(list(range(100, 110)), [1, 2, 3])], max_seq_length=6)
    assert x.tolist() == [[107, 108, 109, 1, 2]] and labels.tolist() == [[-100, -100, 1, 2, 3]]
    x, labels = finetune_collate([([100, 101], list(range(1, 10)))], max_seq_length=4)  # completion alone too long
    assert x.tolist() == [[101, 1, 2]] and labels.tolist() == [[1, 2, 3]]


def write_examples(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt_ids": [1000 + i] * (1 + i % 3), "completion_ids": [i, i]}) + "\n")
    return str(path)


def example_ids(batch):
    return [int(row[0]) - 1000 for row in batch.input_ids]  # example i's prompt is 1000 + i


def test_finetune_epochs_ranks_and_resume(tmp_path):
    path = write_examples(tmp_path / "train.jsonl", 10)
    ranks = [FinetuneLoader(path, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    assert len(ranks[0]) == 10 and ranks[0].steps_per_epoch == math.ceil(10 / 4)
    ids = []
    for _ in range(5):  # 20 samples = 2 epochs
        step = [example_ids(loader.next_batch()) for loader in ranks]
        assert not set(step[0]) & set(step[1])
        ids += step[0] + step[1]
    assert sorted(ids[:10]) == sorted(ids[10:]) == list(range(10)) and ids[:10] != ids[10:]
    assert ranks[0].epoch == 2
    single = FinetuneLoader(path, 2, grad_accum_steps=2, seed=5)
    single.load_state_dict(FinetuneLoader(path, 2, seed=5).state_dict())
    again = sum((example_ids(single.next_batch()) for _ in range(10)), [])
    assert again == ids
    single.set_epoch(1)
    assert single.epoch == 1 and example_ids(single.next_batch()) == ids[10:12]
    resumed = FinetuneLoader(path, 1, world_size=1, grad_accum_steps=4, seed=5)
    ranks[0].set_epoch(0)
    ranks[0].next_batch()  # one step of 4 samples (the other rank's state would be the same)
    resumed.load_state_dict(ranks[0].state_dict())
    assert [example_ids(resumed.next_batch())[0] for _ in range(4)] == ids[4:8]


def test_finetune_loader_pads_and_masks(tmp_path):
    path = write_examples(tmp_path / "train.jsonl", 3)
    batch = FinetuneLoader(path, 3, shuffle=False).next_batch()
    x, y = batch
    assert x.tolist() == [[1000, 0, 50256, 50256], [1001, 1001, 1, 50256], [1002, 1002, 1002, 2]]
    assert y.tolist() == [[0, 0, -100, -100], [-100, 1, 1, -100], [-100, -100, 2, 2]]
    assert batch.num_targets == 6


def test_finetune_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run build_finetune_datasets.py"):
        FinetuneLoader(str(tmp_path / "train.jsonl"), 2)
    (tmp_path / "val.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no examples"):
        FinetuneLoader(str(tmp_path / "val.jsonl"), 2)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected"):
        FinetuneLoader(str(tmp_path / "bad.jsonl"), 2)
