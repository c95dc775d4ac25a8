"""Shared test setup, as fixtures: launching the real scripts (as a user would, in subprocesses),
reading a run's metrics, and writing tiny built datasets.

Tests under tests/e2e/ launch subprocesses or torchrun; they are marked `slow` (the README's test
command runs them too; `-m "not slow"` skips them for a quick loop)."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(script, *args, nproc=1, timeout=600, check=True, env=None):
    """`python script args` (nproc=1) or `torchrun --standalone --nproc_per_node N script args`."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [os.path.join(REPO, script), *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", **(env or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def _read_metrics(log_dir):
    """{step: record} from the run's metrics.jsonl; a resumed run's records replace the earlier ones."""
    steps, evals = {}, {}
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            (evals if "eval_loss" in r else steps)[r["step"]] = r
    return steps, evals


def _synthetic_sentences(n_docs, seed=0):
    """Small-vocabulary English: a tiny model learns it in a few steps."""
    rng = random.Random(seed)
    subjects = ["the king", "a small dog", "my brother", "the old woman", "the ship", "our teacher"]
    verbs = ["sees", "loves", "finds", "carries", "follows", "remembers"]
    objects = ["the river", "a red apple", "the long road", "his letter", "the morning light", "a quiet song"]
    return [" ".join(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
                     for _ in range(rng.randint(3, 12))) for _ in range(n_docs)]


def _write_pretrain_data(directory, n_docs=1500):
    """A built pretraining dataset (train.bin/val.bin uint16 + meta.json), the format of DESIGN.md §7."""
    from utils.tokenizer import get_tokenizer
    enc = get_tokenizer()
    tokens = []
    for doc in _synthetic_sentences(n_docs):
        tokens += enc.encode_ordinary(doc) + [enc.eot_token]
    tokens = np.array(tokens, dtype=np.uint16)
    split = int(len(tokens) * 0.9)
    os.makedirs(directory, exist_ok=True)
    tokens[:split].tofile(os.path.join(directory, "train.bin"))
    tokens[split:].tofile(os.path.join(directory, "val.bin"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"dtype": "uint16", "eot_token": 50256}, f)
    return directory


# The built fine-tuning and preference fixtures ask about the colour of things.
COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
THINGS = ["apple", "car", "house", "bird", "boat", "flower", "book", "door"]


def _write_finetune_data(directory, n_train=96, n_val=16):
    """A built fine-tuning dataset (train.jsonl/val.jsonl of prompt_ids/completion_ids)."""
    from utils.prompt_template import format_completion, format_prompt
    from utils.tokenizer import get_tokenizer
    enc = get_tokenizer()
    rng = random.Random(1)
    colours, things = COLOURS, THINGS
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                c, t = rng.choice(colours), rng.choice(things)
                prompt = format_prompt(f"What colour is the {t}?",
                                       context=f"The {t} is {c}." if rng.random() < 0.5 else None)
                f.write(json.dumps({"prompt_ids": enc.encode_ordinary(prompt),
                                    "completion_ids": enc.encode_ordinary(format_completion(f"The {t} is {c}."))})
                        + "\n")
    return directory


def _write_preference_data(directory, n_train=64, n_val=16, seed=2):
    """A built preference dataset: the colour questions of _write_finetune_data, chosen = the right colour,
    rejected = a wrong one; meta.json says "kind": "preference"."""
    from utils.prompt_template import format_completion, format_prompt
    from utils.tokenizer import get_tokenizer
    enc = get_tokenizer()
    rng = random.Random(seed)
    colours, things = COLOURS, THINGS
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                c, wrong, t = *rng.sample(colours, 2), rng.choice(things)
                prompt = format_prompt(f"What colour is the {t}?", context=f"The {t} is {c}.")
                f.write(json.dumps({"prompt_ids": enc.encode_ordinary(prompt),
                                    # chosen answers of two lengths (per-token vs per-answer averages differ)
                                    "chosen_ids": enc.encode_ordinary(format_completion(
                                        f"The {t} is {c}." if things.index(t) % 2 else
                                        f"The {t} is {c}, as the context says.")),
                                    "rejected_ids": enc.encode_ordinary(format_completion(
                                        f"It is {wrong}, I think" if rng.random() < 0.5 else wrong))}) + "\n")
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"format": "minigpt-finetune-tokens-v1", "kind": "preference", "max_seq_len": 1024}, f)
    return directory


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{os.sep}e2e{os.sep}" in str(item.path):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def repo():
    """The repository root (scripts are launched from here)."""
    return REPO


@pytest.fixture(scope="session")
def run_script():
    return _run_script


@pytest.fixture(scope="session")
def read_metrics():
    return _read_metrics


@pytest.fixture(scope="session")
def write_pretrain_data():
    return _write_pretrain_data


@pytest.fixture(scope="session")
def write_finetune_data():
    return _write_finetune_data


@pytest.fixture(scope="session")
def write_preference_data():
    return _write_preference_data


@pytest.fixture(scope="session")
def snapshot():
    """snapshot(root) -> {relative path: bytes} of every file under root: what "left intact" is checked against."""
    def snapshot(root):
        out = {}
        for d, _, names in os.walk(root):
            for n in names:
                with open(os.path.join(d, n), "rb") as f:
                    out[os.path.relpath(os.path.join(d, n), root)] = f.read()
        return out
    return snapshot
