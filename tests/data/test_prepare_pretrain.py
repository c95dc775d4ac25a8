import bz2
import gzip
import io
import json
import os
import subprocess
import sys

import pytest

import build_finetune_datasets
import build_pretrain_datasets
import make_sample_corpora
import prepare_data_finetune
import prepare_data_pretrain
from utils.cli import run
from utils.data import prepare_pretrain as data_prepare_pretrain
from utils.data.readers import BadLine, _iter_json_array, discover_files


@pytest.fixture
def corpus(tmp_path, write):
    raw = tmp_path / "raw"
    # wikiextractor --json layout: text/AA/wiki_00, no extension
    write(raw / "wiki" / "AA" / "wiki_00",
          "".join(json.dumps({"id": str(i), "url": f"u{i}", "title": f"T{i}", "text": f"Article {i}.\nBody  text {i}."})
                  + "\n" for i in range(3)))
    write(raw / "wiki" / "AB" / "wiki_00", '<doc id="9" url="u9" title="Doc">\nDoc\n\nWikidoc body.\n</doc>\n')
    write(raw / "books" / "a.txt", "Book A line one.\nLine two.\n\n\nSecond paragraph of A.\n")
    write(raw / "books" / "b.txt", "Article 0.\nBody text 0.")  # duplicate of a wiki article after cleaning
    write(raw / "arr.json", json.dumps([{"text": "array doc ☃"}, "plain string doc", {"text": "cafÃ©"}]))
    write(raw / "lines.jsonl.gz", gzip.compress(b'{"text": "gzipped doc"}\n'))
    write(raw / "README", "not a data file: ignored inside a directory")
    return raw


def test_reads_every_format(corpus, tmp_path, prepare_pretrain_cli):
    docs, report = prepare_pretrain_cli([corpus], tmp_path / "out")
    # files in sorted order; the wiki copy of "Article 0" comes after books/b.txt, so it is the duplicate
    assert docs == ["array doc ☃", "plain string doc", "café", "Book A line one.\nLine two.\n\nSecond paragraph of A.",
                    "Article 0.\nBody text 0.", "gzipped doc", "Article 1.\nBody text 1.", "Article 2.\nBody text 2.",
                    "Doc\n\nWikidoc body."]
    assert report["documents_in"] == 10 and report["documents_out"] == 9
    assert report["dropped"] == {"empty": 0, "too_short": 0, "duplicate": 1}
    assert report["bad_lines"] == 0 and report["files_skipped"] == []


def test_split_paragraphs_and_min_chars(tmp_path, write, prepare_pretrain_cli):
    src = write(tmp_path / "p.txt", "first para\nstill first\n\n  \n\nsecond\n\n\n\nthird para here\n")
    docs, report = prepare_pretrain_cli([src], tmp_path / "out", "--split_paragraphs", "--min_chars", "7")
    assert docs == ["first para\nstill first", "third para here"]
    assert report["dropped"]["too_short"] == 1


def test_output_is_identical_for_any_num_workers_and_run(corpus, tmp_path):
    outs = []
    for i, workers in enumerate(["0", "2", "2"]):
        out = tmp_path / f"out{i}"
        run(prepare_data_pretrain.PROG, prepare_data_pretrain.main,
            ["--input", str(corpus), "--output", str(out), "--num_workers", workers, "--shard_mb", "0.00005"])
        outs.append({n: (out / n).read_bytes() for n in sorted(os.listdir(out))})
    assert len([n for n in outs[0] if n.startswith("shard-")]) > 2  # tiny shards: several of them
    assert outs[0] == outs[1] == outs[2]


def test_duplicates_keep_the_first_in_input_order(tmp_path, write, prepare_pretrain_cli):
    a = write(tmp_path / "in" / "a.jsonl", '{"text": "same"}\n{"text": "x"}\n')
    b = write(tmp_path / "in" / "b.jsonl", '{"text": "y"}\n{"text": "same "}\n{"text": "x"}\n')
    docs, report = prepare_pretrain_cli([b, a], tmp_path / "out")
    assert docs == ["y", "same", "x"] and report["dropped"]["duplicate"] == 2


def test_json_array_is_streamed_across_chunk_boundaries():
    values = [{"text": "a,b]" * 3}, "str\"ing", 12345678, [1, [2]], {"t": "é" * 20}]
    text = " [\n" + ",\n ".join(json.dumps(v, ensure_ascii=False) for v in values) + "\n] \n"
    for chunk in (1, 3, 7, 1000):
        got = list(_iter_json_array("x.json", io.StringIO(text), chunk_chars=chunk))
        assert [v for _, v in got] == values
        assert [line for line, _ in got] == [2, 3, 4, 5, 6]
    got = list(_iter_json_array("x.json", io.StringIO('[{"text": "ok"},\n{"text": nope}]'), chunk_chars=4))
    assert got[0][1] == {"text": "ok"} and isinstance(got[1][1], BadLine) and got[1][0] == 2


# --- bad input: each one gets a clear message, bad lines are counted with file:line ---

def test_malformed_json_and_missing_field_lines_are_skipped_and_reported(tmp_path, write, prepare_pretrain_cli):
    src = write(tmp_path / "d.jsonl", '{"text": "good"}\n{"text": "broken\n{"title": "no text"}\n[1, 2]\n{"text": 7}\n')
    docs, report = prepare_pretrain_cli([src], tmp_path / "out")
    assert docs == ["good"] and report["bad_lines"] == 4
    lines = [(b["file"], b["line"]) for b in report["bad_line_examples"]]
    assert lines == [(src, 2), (src, 3), (src, 4), (src, 5)]
    reasons = [b["reason"] for b in report["bad_line_examples"]]
    assert reasons[0].startswith("malformed JSON")
    assert "missing field 'text' (fields present: title)" in reasons[1]
    assert "got a list" in reasons[2] and "is a int, not a string" in reasons[3]


def test_non_utf8_lines_are_skipped_with_file_and_line(tmp_path, write, prepare_pretrain_cli):
    src = write(tmp_path / "d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    txt = write(tmp_path / "t.txt", b"line one\nbad \xff line\nline three\n")
    docs, report = prepare_pretrain_cli([src, txt], tmp_path / "out")
    assert docs == ["ok", "line one\nline three"]
    bad = report["bad_line_examples"]
    assert [(b["file"], b["line"]) for b in bad] == [(src, 2), (txt, 2)]
    assert "not valid UTF-8 (byte 0xe9" in bad[0]["reason"] and "iconv" in bad[0]["reason"]


def test_empty_and_binary_files_are_skipped_or_fatal_when_alone(tmp_path, write, fails, no_output,
                                                                prepare_pretrain_cli):
    empty = write(tmp_path / "empty.txt", "")
    binary = write(tmp_path / "blob.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    good = write(tmp_path / "good.txt", "fine")
    docs, report = prepare_pretrain_cli([empty, binary, good], tmp_path / "out")
    assert docs == ["fine"]
    assert [(s["file"], s["reason"]) for s in report["files_skipped"]] == [
        (empty, "is empty"),
        (binary, "looks binary (NUL bytes in its first 8 KiB); if it is UTF-16 text, convert it to UTF-8")]
    msg = fails(prepare_data_pretrain, ["--input", empty, "--output", str(tmp_path / "o2")])
    assert f"no documents left to write ({empty}: is empty)" in msg and no_output(tmp_path / "o2")
    msg = fails(prepare_data_pretrain, ["--input", binary, "--output", str(tmp_path / "o3")])
    assert "looks binary" in msg and no_output(tmp_path / "o3")


def test_missing_path_empty_dir_and_wrong_type(tmp_path, write, fails, no_output):
    out = tmp_path / "out"
    msg = fails(prepare_data_pretrain, ["--input", str(tmp_path / "nope"), "--output", str(out)])
    assert msg.endswith(f"input {tmp_path / 'nope'} does not exist; check the path")
    (tmp_path / "emptydir").mkdir()
    write(tmp_path / "emptydir" / "notes.md", "# not data")
    msg = fails(prepare_data_pretrain, ["--input", str(tmp_path / "emptydir"), "--output", str(out)])
    assert f"input directory {tmp_path / 'emptydir'} holds no .json/.jsonl/.txt or wikiextractor wiki_NN files" in msg
    msg = fails(prepare_data_pretrain, ["--input", str(tmp_path / "emptydir" / "notes.md"), "--output", str(out)])
    assert "is not a .json/.jsonl/.txt or wikiextractor wiki_NN file" in msg
    assert no_output(out)


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, write, fails, prepare_pretrain_cli):
    out = tmp_path / "out"
    prepare_pretrain_cli([write(tmp_path / "old.txt", "old text")], out)
    src = write(tmp_path / "a.txt", "text")
    msg = fails(prepare_data_pretrain, ["--input", src, "--output", str(out)])
    assert msg.endswith(f"output directory {out} already exists; pass --overwrite to replace it or choose another path")
    docs, _ = prepare_pretrain_cli([src], out, "--overwrite")  # our own earlier output: replaced
    assert docs == ["text"]


def test_a_failure_halfway_leaves_nothing_under_the_output_name(tmp_path, monkeypatch, write, fails, no_output):
    src = write(tmp_path / "a.jsonl", "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    calls = []

    def flaky(text):
        calls.append(text)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return text
    monkeypatch.setattr(data_prepare_pretrain, "clean_text", flaky)
    out = tmp_path / "out"
    msg = fails(prepare_data_pretrain, ["--input", src, "--output", str(out), "--num_workers", "0"])
    assert msg.endswith("No space left on device") and no_output(out)


def test_help_for_every_data_script(capsys):
    for module in (prepare_data_pretrain, build_pretrain_datasets, prepare_data_finetune, build_finetune_datasets,
                   make_sample_corpora):
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
        assert "--output" in capsys.readouterr().out


def test_command_line_error_is_one_line_without_traceback(tmp_path, repo):
    r = subprocess.run([sys.executable, "prepare_data_pretrain.py", "--input", str(tmp_path / "missing"),
                        "--output", str(tmp_path / "o")],
                       cwd=repo, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == f"prepare_data_pretrain.py: error: input {tmp_path / 'missing'} does not exist; check the path\n"


def test_discovery_order_is_sorted_and_deduplicated(tmp_path, write):
    for name in ("b.txt", "a/z.jsonl", "a/y.json", ".hidden.txt", "c.bz2"):
        write(tmp_path / "d" / name, "x")
    write(tmp_path / "d" / "wiki_01.bz2", bz2.compress(b"x"))
    files = discover_files([str(tmp_path / "d"), str(tmp_path / "d" / "b.txt")], {"txt", "json", "jsonl", "wiki"})
    assert [os.path.relpath(f, tmp_path / "d") for f in files] == ["a/y.json", "a/z.jsonl", "b.txt", "wiki_01.bz2"]


def test_a_truncated_gzip_keeps_what_was_read(tmp_path, write, prepare_pretrain_cli):
    data = gzip.compress("".join(json.dumps({"text": f"doc {i} " + "x" * 2000}) + "\n" for i in range(200)).encode())
    src = write(tmp_path / "cut.jsonl.gz", data[: len(data) // 2])
    docs, report = prepare_pretrain_cli([src], tmp_path / "out")
    assert 0 < len(docs) < 200 and report["bad_lines"] == 1
    assert "truncated or corrupt" in report["bad_line_examples"][0]["reason"]


def test_an_existing_empty_output_dir_is_fine(tmp_path, write, prepare_pretrain_cli):
    src = write(tmp_path / "a.txt", "text")
    (tmp_path / "out").mkdir()
    assert prepare_pretrain_cli([src], tmp_path / "out")[0] == ["text"]
