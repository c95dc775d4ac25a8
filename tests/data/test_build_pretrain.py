import json
import os

import pytest

import build_pretrain_datasets
from utils.data import build_pretrain as data_build_pretrain
from utils.data.build_pretrain import build_pretrain, check_vocab_fits, plan_chunks
from utils.data.readers import DataError
from utils.tokenizer import get_tokenizer

EOT = 50256
DOCS = ([f"Document number {i}: " + "words and more words " * (i % 7) for i in range(60)]
        + ["unicode: naïve café — 日本語 🤖", "a literal <|endoftext|> inside a document",
           "  spaces\n\nand\tnewlines  "])


@pytest.fixture
def cleaned(tmp_path, write):
    d = tmp_path / "cleaned"
    write(d / "shard-00000.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in DOCS[:40]))
    write(d / "shard-00001.jsonl",
          "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in DOCS[40:]).rstrip("\n"))
    write(d / "report.json", "{}")  # prepare's report sits beside the shards and is not read
    return d


def split_docs(tokens):
    """A flat token file -> list of documents (token lists), checking it ends with EOT."""
    assert len(tokens) == 0 or tokens[-1] == EOT
    docs, cur = [], []
    for t in tokens.tolist():
        if t == EOT:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def test_token_stream_equals_an_independent_encode_of_every_document(cleaned, tmp_path, monkeypatch,
                                                                     build_pretrain_cli):
    monkeypatch.setattr(data_build_pretrain, "CHUNK_BYTES", 200)  # many chunks, cut mid-file
    (train, val), meta = build_pretrain_cli(cleaned, tmp_path / "out", "--val_fraction", "0.1", "--num_workers", "2")
    enc = get_tokenizer()
    expected = [enc.encode_ordinary(t) for t in DOCS]  # "<|endoftext|>" in text is ordinary text
    train_docs, val_docs = split_docs(train), split_docs(val)
    assert len(val_docs) == round(0.1 * len(DOCS))
    # every document is in exactly one split, whole, in input order within its split
    ti = vi = 0
    for doc in expected:
        if ti < len(train_docs) and train_docs[ti] == doc:
            ti += 1
        else:
            assert val_docs[vi] == doc
            vi += 1
    assert (ti, vi) == (len(train_docs), len(val_docs))
    assert EOT not in expected[-2] and len(expected[-2]) > 5
    assert meta["splits"] == {"train": {"file": "train.bin", "tokens": len(train), "documents": len(train_docs)},
                              "val": {"file": "val.bin", "tokens": len(val), "documents": len(val_docs)}}
    assert (meta["dtype"], meta["eot_token"], meta["vocab_size"]) == ("uint16", EOT, 50257)
    assert [(os.path.basename(s["file"]), s["bytes"]) for s in meta["sources"]] == [
        (n, os.path.getsize(cleaned / n)) for n in ("shard-00000.jsonl", "shard-00001.jsonl")]


def test_same_seed_is_byte_identical_for_any_num_workers(cleaned, tmp_path, monkeypatch, build_pretrain_cli):
    monkeypatch.setattr(data_build_pretrain, "CHUNK_BYTES", 300)
    files = []
    for i, (workers, seed) in enumerate([("1", "5"), ("2", "5"), ("0", "5"), ("2", "6")]):
        out = tmp_path / f"out{i}"
        build_pretrain_cli(cleaned, out, "--val_fraction", "0.2", "--num_workers", workers, "--seed", seed)
        files.append({n: (out / n).read_bytes() for n in ("train.bin", "val.bin", "meta.json")})
    assert files[0] == files[1] == files[2]
    assert files[3]["val.bin"] != files[0]["val.bin"]  # another seed, another split


def test_val_fraction_zero_and_the_one_document_case(cleaned, tmp_path, write, fails, no_output, build_pretrain_cli):
    (train, val), meta = build_pretrain_cli(cleaned, tmp_path / "o1", "--val_fraction", "0")
    assert len(val) == 0 and meta["splits"]["train"]["documents"] == len(DOCS)
    one = write(tmp_path / "one" / "a.jsonl", '{"text": "only"}\n')
    msg = fails(build_pretrain_datasets,
                ["--input", os.path.dirname(one), "--output", str(tmp_path / "o2"), "--val_fraction", "0.5"])
    assert "a validation split needs at least 2 documents, the input has 1" in msg and no_output(tmp_path / "o2")


def test_plan_chunks_covers_every_line_once(tmp_path, write):
    a = write(tmp_path / "a.jsonl", "x" * 50 + "\n" + "short\n" + "y" * 10)  # long line, no final newline
    b = write(tmp_path / "b.jsonl", "")
    c = write(tmp_path / "c.jsonl", "1\n2\n3\n")
    chunks, n = plan_chunks([a, b, c], chunk_bytes=8)
    assert n == 6
    covered = {}
    for path, start, end, line, doc, count in chunks:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        assert data.count(b"\n") + (not data.endswith(b"\n")) == count
        covered.setdefault(path, []).append((start, end))
        assert doc == sum(ch[5] for ch in chunks[:chunks.index((path, start, end, line, doc, count))])
    assert covered[a][0][0] == 0 and covered[a][-1][1] == os.path.getsize(a) and b not in covered


def test_bad_lines_are_skipped_and_listed_in_meta(tmp_path, write, build_pretrain_cli):
    src = write(tmp_path / "in" / "a.jsonl",
                b'{"text": "good"}\nnot json\n{"txt": "x"}\n{"text": "caf\xe9"}\n{"text": "also good"}\n')
    (train, _), meta = build_pretrain_cli(tmp_path / "in", tmp_path / "out", "--val_fraction", "0")
    assert split_docs(train) == [get_tokenizer().encode("good"), get_tokenizer().encode("also good")]
    assert meta["bad_lines"] == 3
    assert [(b["file"], b["line"]) for b in meta["bad_line_examples"]] == [(src, 2), (src, 3), (src, 4)]
    assert "missing field 'text'" in meta["bad_line_examples"][1]["reason"]
    assert "not valid UTF-8" in meta["bad_line_examples"][2]["reason"]


def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path, write, fails, no_output):
    out = str(tmp_path / "out")
    msg = fails(build_pretrain_datasets, ["--input", str(tmp_path / "nope"), "--output", out])
    assert msg.endswith("does not exist; check the path")
    (tmp_path / "empty").mkdir()
    msg = fails(build_pretrain_datasets, ["--input", str(tmp_path / "empty"), "--output", out])
    assert "holds no .jsonl files" in msg
    write(tmp_path / "bad" / "a.jsonl", "not json at all\n")
    msg = fails(build_pretrain_datasets, ["--input", str(tmp_path / "bad"), "--output", out, "--val_fraction", "0"])
    assert "no documents with text" in msg and "1 bad line(s)" in msg
    assert no_output(out)
    write(tmp_path / "ok" / "a.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    os.makedirs(out)
    write(os.path.join(out, "train.bin"), b"old")
    msg = fails(build_pretrain_datasets, ["--input", str(tmp_path / "ok"), "--output", out])
    assert "already exists and was not written by this script" in msg  # --overwrite would be refused too
    assert open(os.path.join(out, "train.bin"), "rb").read() == b"old"


def test_a_failure_halfway_leaves_nothing_under_the_output_name(cleaned, tmp_path, monkeypatch, fails, no_output):
    monkeypatch.setattr(data_build_pretrain, "CHUNK_BYTES", 100)
    real, calls = data_build_pretrain.encode_docs, []

    def flaky(texts):
        calls.append(1)
        if len(calls) == 4:
            raise DataError("simulated failure")
        return real(texts)
    monkeypatch.setattr(data_build_pretrain, "encode_docs", flaky)
    msg = fails(build_pretrain_datasets,
                ["--input", str(cleaned), "--output", str(tmp_path / "out"), "--num_workers", "0"])
    assert msg.endswith("simulated failure") and no_output(tmp_path / "out")


def test_a_vocab_larger_than_uint16_is_refused():
    check_vocab_fits(65536)
    with pytest.raises(DataError, match="the tokenizer has 100277 tokens, which do not fit uint16"):
        check_vocab_fits(100277)


def test_a_val_fraction_rounded_up_to_one_document_is_noted(cleaned, tmp_path):
    """Issue 20 item 8: the default --val_fraction on a small corpus gives one document, and says so."""
    notes = []
    meta = build_pretrain(str(cleaned), str(tmp_path / "o"), val_fraction=0.005, log=notes.append)
    assert meta["splits"]["val"]["documents"] == 1  # 0.005 x 63 = 0.3 documents, raised to one
    [note] = [n for n in notes if n.startswith("note: --val_fraction")]
    assert "0.005 of 63 documents is 0.32 of a document; val.bin gets 1" in note and "--val_fraction (e.g. 0.1" in note
    notes = []
    build_pretrain(str(cleaned), str(tmp_path / "o2"), val_fraction=0.1, log=notes.append)  # 6 documents: as asked
    assert not [n for n in notes if "val_fraction" in n]


def test_build_refuses_out_of_range_val_fraction(cleaned, tmp_path):
    with pytest.raises(DataError, match=r"--val_fraction must be in \[0, 1\)"):
        build_pretrain(str(cleaned), str(tmp_path / "o"), val_fraction=1.0)


def test_compressed_input_is_refused_with_a_hint(tmp_path, write, fails, no_output):
    import gzip
    write(tmp_path / "in" / "a.jsonl.gz", gzip.compress(b'{"text": "x"}\n'))
    msg = fails(build_pretrain_datasets, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")])
    assert "is compressed; this step reads plain .jsonl" in msg and no_output(tmp_path / "o")
