"""Raw text files -> cleaned JSON Lines shards (`{"text": ...}` a line) + report.json.

Three passes, so that the output is the same for any number of workers:
  1. in parallel, one task per input file: read, clean, drop empty/short documents, write the
     survivors to a per-file part and return a 64-bit hash of each;
  2. exact duplicates: the hashes of all files, in input order, go through `np.unique`; the first
     occurrence of each text is kept (8 bytes of RAM per document, whatever the text size);
  3. the parts are streamed, in input order, into fixed-size shards, duplicates left out.
All of it happens in a temporary directory that is renamed to the output only when complete.
"""
import dataclasses
import hashlib
import os
import shutil

import numpy as np
from tqdm import tqdm

from utils.data.cleaning import clean_text
from utils.data.kinds import mark
from utils.data.parallel_map import ordered_map
from utils.data.readers import (
    BadLine,
    DataError,
    discover_files,
    iter_file,
    jsonl_line,
    output_writer,
    probe,
    write_json,
)

INPUT_KINDS = {"txt", "json", "jsonl", "wiki"}
MAX_BAD_LINES_LISTED = 1000


@dataclasses.dataclass
class PrepareOptions:
    split_paragraphs: bool = False  # .txt: one document per blank-line-separated block
    min_chars: int = 0              # drop cleaned documents shorter than this
    text_field: str = "text"        # JSON field that holds the document
    shard_mb: float = 256.0         # output shard size


def doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _text_of(record, path, lineno, field):
    """The document text of a record, or a BadLine saying why there is none."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if field not in record:
            keys = ", ".join(list(record)[:8]) or "none"
            return BadLine(path, lineno, f"missing field {field!r} (fields present: {keys}); "
                                         "pass --text_field to read another one")
        text = record[field]
        if not isinstance(text, str):
            return BadLine(path, lineno, f"field {field!r} is a {type(text).__name__}, not a string")
        return text
    return BadLine(path, lineno, f"expected a JSON object with a {field!r} field or a string, "
                                 f"got a {type(record).__name__}")


def clean_file(task):
    """Worker: clean one input file into `part_path`; returns its counts and document hashes."""
    path, part_path, opts = task
    stats = {"file": path, "documents_in": 0, "documents_kept": 0, "empty": 0, "too_short": 0,
             "changed_by_cleaning": 0, "chars_in": 0, "chars_out": 0, "bad_lines": 0, "bad_line_examples": []}
    bad = probe(path)
    if bad is not None:
        return stats, bad, np.zeros(0, np.uint64)
    hashes = []

    def bad_line(b):
        stats["bad_lines"] += 1
        if len(stats["bad_line_examples"]) < MAX_BAD_LINES_LISTED:
            stats["bad_line_examples"].append(b.as_dict())

    with open(part_path, "w", encoding="utf-8") as out:
        lineno, records = 0, iter_file(path, opts.split_paragraphs)
        while True:
            try:
                lineno, record = next(records)
            except StopIteration:
                break
            except (OSError, EOFError) as e:  # a truncated .gz/.bz2: keep what was read before
                bad_line(BadLine(path, lineno + 1,
                                 f"the file is truncated or corrupt after this point ({e}); the rest was skipped"))
                break
            text = record if isinstance(record, BadLine) else _text_of(record, path, lineno, opts.text_field)
            if isinstance(text, BadLine):
                bad_line(text)
                continue
            stats["documents_in"] += 1
            stats["chars_in"] += len(text)
            cleaned = clean_text(text)
            if not cleaned:
                stats["empty"] += 1
                continue
            if len(cleaned) < opts.min_chars:
                stats["too_short"] += 1
                continue
            stats["changed_by_cleaning"] += cleaned != text.strip()
            stats["documents_kept"] += 1
            stats["chars_out"] += len(cleaned)
            out.write(jsonl_line({"text": cleaned}))
            hashes.append(doc_hash(cleaned))
    return stats, None, np.array(hashes, dtype=np.uint64)


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """Boolean mask: True where a hash appears for the first time (in array order)."""
    keep = np.zeros(len(hashes), dtype=bool)
    if len(hashes):
        _, first = np.unique(hashes, return_index=True)
        keep[first] = True
    return keep


def prepare_pretrain(inputs, output, opts: PrepareOptions = None, num_workers=1, overwrite=False, log=print):
    """Run the whole preparation; returns the report (also written to output/report.json)."""
    opts = opts or PrepareOptions()
    if opts.min_chars < 0:
        raise DataError(f"--min_chars must be >= 0, got {opts.min_chars}")
    if opts.shard_mb <= 0:
        raise DataError(f"--shard_mb must be > 0, got {opts.shard_mb}")
    files = discover_files(inputs, INPUT_KINDS)
    writer = output_writer(output, overwrite, mark("pretrain_prepared"), inputs)
    with writer as tmp:
        parts_dir = os.path.join(tmp, ".parts")
        os.makedirs(parts_dir)
        tasks = [(f, os.path.join(parts_dir, f"part-{i:06d}.jsonl"), opts) for i, f in enumerate(files)]
        sizes = [os.path.getsize(f) for f in files]
        per_file, skipped, hashes, bad_examples = [], [], [], []
        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="cleaning", disable=None)
        for (stats, bad, h), size in zip(ordered_map(clean_file, tasks, min(num_workers, len(tasks))), sizes):
            bar.update(size)
            if bad is not None:
                skipped.append({"file": bad.file, "reason": bad.reason})
                log(f"warning: skipped {bad.file}: it {bad.reason}")
            elif stats["bad_lines"]:
                first = stats["bad_line_examples"][0]
                log(f"warning: {stats['file']}: {stats['bad_lines']} bad line(s) skipped "
                    f"(first at line {first['line']}: {first['reason']})")
            bad_examples += stats.pop("bad_line_examples")[: max(0, MAX_BAD_LINES_LISTED - len(bad_examples))]
            per_file.append(stats)
            hashes.append(h)
        bar.close()
        all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        keep = first_occurrences(all_hashes)
        total = {k: sum(s[k] for s in per_file) for k in ("documents_in", "documents_kept", "empty", "too_short",
                                                            "changed_by_cleaning", "chars_in", "bad_lines")}
        documents_out = int(keep.sum())
        if documents_out == 0:
            why = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3]) or (
                f"{total['documents_in']} document(s) read, {total['empty']} empty, {total['too_short']} shorter than "
                f"--min_chars, {total['bad_lines']} bad line(s)")
            raise DataError(f"no documents left to write ({why}); nothing was written")
        shards = _write_shards(tasks, keep, tmp, int(opts.shard_mb * 2**20))
        shutil.rmtree(parts_dir)
        report = {
            "inputs": [os.path.abspath(p) for p in inputs],
            "files_read": len(files) - len(skipped),
            "files_skipped": skipped,
            "documents_in": total["documents_in"],
            "documents_out": documents_out,
            "dropped": {"empty": total["empty"], "too_short": total["too_short"],
                        "duplicate": total["documents_kept"] - documents_out},
            "changed_by_cleaning": total["changed_by_cleaning"],
            "chars_in": total["chars_in"],
            "chars_out": sum(s["chars_out"] for s in per_file),  # before de-duplication
            "bad_lines": total["bad_lines"],
            "bad_line_examples": bad_examples,
            "options": {**dataclasses.asdict(opts)},
            "outputs": shards,
            "per_file": per_file,
        }
        write_json(os.path.join(tmp, "report.json"), report)
    return report


def _write_shards(tasks, keep, out_dir, shard_bytes):
    """Stream the parts, in order, into shard-00000.jsonl, ... leaving out duplicates."""
    shards, out, written, index = [], None, 0, 0
    try:
        for _, part, _ in tasks:
            if not os.path.exists(part):
                continue
            with open(part, "rb") as f:
                for line in f:
                    index += 1
                    if not keep[index - 1]:
                        continue
                    if out is None or written >= shard_bytes:
                        if out is not None:
                            out.close()
                        name = f"shard-{len(shards):05d}.jsonl"
                        shards.append({"file": name, "documents": 0, "bytes": 0})
                        out, written = open(os.path.join(out_dir, name), "wb"), 0
                    out.write(line)
                    written += len(line)
                    shards[-1]["documents"] += 1
                    shards[-1]["bytes"] += len(line)
            os.remove(part)
    finally:
        if out is not None:
            out.close()
    assert index == len(keep), "parts and hashes disagree"
    return shards
