"""Cleaned JSON Lines shards -> train.bin / val.bin (flat uint16 GPT-2 tokens, EOT after every
document) + meta.json.

  1. plan: the shards are cut into ~4 MB chunks at line ends (a line is a document); this fixes
     every document's global index, whatever the number of workers;
  2. split: exactly round(val_fraction * documents) documents, drawn with `--seed`, go to val;
  3. tokenise: workers read their chunk straight from the file, encode with tiktoken and send
     back uint16 bytes; the main process appends them to the two files in chunk order, with at
     most 2 x workers chunks in flight, so memory stays flat whatever the corpus size.
"""
import json
import os

import numpy as np
from tqdm import tqdm

from utils.data.kinds import check_build_input, mark
from utils.data.parallel_map import ordered_map
from utils.data.readers import BadLine, BadLines, DataError, discover_files, output_writer, write_json
from utils.tokenizer import get_tokenizer

CHUNK_BYTES = 4 << 20
DTYPE = np.uint16
FORMAT = mark("pretrain_built").value


def check_vocab_fits(n_vocab: int, dtype=DTYPE):
    limit = int(np.iinfo(dtype).max) + 1
    if n_vocab > limit:
        raise DataError(f"the tokenizer has {n_vocab} tokens, which do not fit {np.dtype(dtype).name} "
                        f"(at most {limit}); this format stores GPT-2 tokens only")


def plan_chunks(files, chunk_bytes):
    """[(path, start, end, first_line, first_doc, n_lines)] covering every line of every file."""
    chunks, doc = [], 0
    for path in files:
        with open(path, "rb") as f:
            offset, line, carry = 0, 1, b""
            while True:
                block = f.read(chunk_bytes)
                data = carry + block
                cut = data.rfind(b"\n") + 1 if block else len(data)  # at EOF the last line needs no newline
                if cut == 0 and block:  # one line longer than a chunk: keep reading
                    carry = data
                    continue
                if cut:
                    n = data.count(b"\n", 0, cut) + (0 if data[cut - 1:cut] == b"\n" else 1)
                    chunks.append((path, offset, offset + cut, line, doc, n))
                    offset, line, doc = offset + cut, line + n, doc + n
                carry = data[cut:]
                if not block:
                    break
    return chunks, doc


def val_mask(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which documents go to val: exactly round(f * n) of them (at least one when f > 0), by seed."""
    mask = np.zeros(n_docs, dtype=bool)
    if val_fraction <= 0 or n_docs == 0:
        return mask
    n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    if n_val < 1:
        raise DataError(f"a validation split needs at least 2 documents, the input has {n_docs}; "
                        f"add documents or pass --val_fraction 0")
    mask[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
    return mask


def encode_docs(texts):
    """GPT-2 tokens of each text followed by EOT, as one uint16 array ("<|endoftext|>" inside a
    text is encoded as ordinary text, never as the special token)."""
    enc = get_tokenizer()
    eot = np.array([enc.eot_token], dtype=np.uint32)
    parts = []
    for text in texts:
        parts.append(enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()))
        parts.append(eot)
    return np.concatenate(parts).astype(DTYPE) if parts else np.zeros(0, DTYPE)


def tokenize_chunk(task):
    """Worker: (path, start, end, first_line, is_val bytes, text_field)
    -> (train bytes, val bytes, counts, bad lines)."""
    path, start, end, first_line, is_val, field = task
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    assert len(lines) == len(is_val)
    texts, bad = ([], []), []
    for i, raw in enumerate(lines):
        lineno = first_line + i
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            bad.append(BadLine(path, lineno, "not valid UTF-8; convert the file to UTF-8").as_dict())
            continue
        except json.JSONDecodeError as e:
            bad.append(BadLine(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})").as_dict())
            continue
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            what = "not a JSON object" if not isinstance(record, dict) else (
                f"missing field {field!r}" if field not in record else f"field {field!r} is not a string")
            bad.append(BadLine(path, lineno, f"{what}; expected {{\"{field}\": ...}} "
                                             "(prepare_data_pretrain.py writes that)").as_dict())
            continue
        if text:
            texts[is_val[i]].append(text)
    train, val = encode_docs(texts[0]), encode_docs(texts[1])
    return train.tobytes(), val.tobytes(), len(texts[0]), len(texts[1]), bad


def build_pretrain(input_dir, output, val_fraction=0.0005, seed=1337, num_workers=1, overwrite=False,
                   text_field="text", log=print, chunk_bytes=None):
    """Run the whole build; returns meta (also written to output/meta.json)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    enc = get_tokenizer()
    check_vocab_fits(enc.n_vocab)
    check_build_input(input_dir, "pretrain_prepared")
    files = discover_files([input_dir], {"jsonl"})
    for f in files:
        if f.endswith((".gz", ".bz2")):
            raise DataError(f"{f} is compressed; this step reads plain .jsonl (prepare_data_pretrain.py writes it): "
                            f"decompress the file or run prepare_data_pretrain.py on it")
    writer = output_writer(output, overwrite, mark("pretrain_built"), [input_dir])
    chunks, n_docs = plan_chunks(files, chunk_bytes or CHUNK_BYTES)
    is_val = val_mask(n_docs, val_fraction, seed)
    if val_fraction > 0 and round(val_fraction * n_docs) < 1:  # raised to one document: not what was asked
        log(f"note: --val_fraction {val_fraction:g} of {n_docs:,} documents is {val_fraction * n_docs:.2g} of a "
            f"document; val.bin gets 1, the minimum, so the validation loss measures that one document. Pass a "
            f"larger --val_fraction (e.g. {min(0.1, max(0.01, round(10 / n_docs, 3))):g}) for a steadier figure")
    tasks = ((path, s, e, line, is_val[d:d + n].view(np.uint8).tobytes(), text_field)
             for path, s, e, line, d, n in chunks)
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    bad = BadLines()
    with writer as tmp:
        with open(os.path.join(tmp, "train.bin"), "wb") as ftrain, open(os.path.join(tmp, "val.bin"), "wb") as fval:
            bar = tqdm(total=sum(e - s for _, s, e, *_ in chunks), unit="B", unit_scale=True, desc="tokenizing",
                       disable=None)
            for (_, s, e, *_), (train, val, n_train, n_val, bad_lines) in zip(
                    chunks, ordered_map(tokenize_chunk, tasks, num_workers)):
                ftrain.write(train)
                fval.write(val)
                counts["train"][0] += len(train) // 2
                counts["train"][1] += n_train
                counts["val"][0] += len(val) // 2
                counts["val"][1] += n_val
                for b in bad_lines:
                    bad.add(b)
                bar.update(e - s)
                bar.set_postfix(tokens=f"{counts['train'][0] + counts['val'][0]:.3g}")
            bar.close()
        if counts["train"][1] + counts["val"][1] == 0:
            raise DataError(f"no documents with text in {input_dir} ({bad.count} bad line(s)); "
                            f"expected JSON Lines of {{\"{text_field}\": ...}} as written by prepare_data_pretrain.py")
        bad.warn(log, "meta.json")
        meta = {
            "format": FORMAT,
            "tokenizer": "gpt2 (tiktoken r50k_base)",
            "vocab_size": enc.n_vocab,
            "dtype": np.dtype(DTYPE).name,
            "eot_token": enc.eot_token,
            "splits": {name: {"file": f"{name}.bin", "tokens": c[0], "documents": c[1]} for name, c in counts.items()},
            "val_fraction": val_fraction,
            "seed": seed,
            "sources": [{"file": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files],
            "bad_lines": bad.count,
            "bad_line_examples": bad.examples,
        }
        write_json(os.path.join(tmp, "meta.json"), meta)
    return meta
