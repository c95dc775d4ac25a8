import json
import os

import pytest

import build_finetune_datasets
import prepare_data_finetune
from utils.prompt_template import format_completion, format_prompt
from utils.tokenizer import get_tokenizer

CHATTERBOT_YAML = """categories:
- test
conversations:
- - Hello
  - Hi there
- - How are you?
  - Fine.
  - And you?
  - Yes
  - Unanswered question
- - '1984'
  - 42
"""


def test_every_common_shape(tmp_path, write, prepare_finetune_cli):
    d = tmp_path / "raw"
    write(d / "a_plain.jsonl", '{"prompt": "P1", "completion": "C1"}\n')
    write(d / "b_alpaca.json", json.dumps([{"instruction": "Add", "input": "2+2", "output": "4"},
                                           {"instruction": "Greet", "input": "", "output": "Hello"}]))
    write(d / "c_dolly.jsonl", json.dumps({"instruction": "I", "context": "Ctx", "response": "R"}) + "\n")
    write(d / "d_qa.jsonl", json.dumps({"question": "Q?", "answer": "A.", "context": "Some context"}) + "\n")
    write(d / "e_squad.json", json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": [
        {"context": "Paris is in France.", "qas": [
            {"question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
            {"question": "Impossible?", "answers": [], "is_impossible": True}]}]}]}))
    write(d / "f_messages.jsonl", json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"}]}) + "\n")
    write(d / "g_sharegpt.json", json.dumps([{"conversations": [{"from": "human", "value": "H"},
                                                                {"from": "gpt", "value": "G"}]}]))
    write(d / "h_chatterbot.yml", CHATTERBOT_YAML)
    examples, report = prepare_finetune_cli([d], tmp_path / "out")
    assert examples == [
        {"prompt": "P1", "completion": "C1"},
        {"prompt": "Add", "completion": "4", "context": "2+2"},
        {"prompt": "Greet", "completion": "Hello"},
        {"prompt": "I", "completion": "R", "context": "Ctx"},
        {"prompt": "Q?", "completion": "A.", "context": "Some context"},
        {"prompt": "Where is Paris?", "completion": "France", "context": "Paris is in France."},
        {"prompt": "U1", "completion": "A1", "context": "Be brief."},
        {"prompt": "U2", "completion": "A2", "context": "Be brief.", "history": [["U1", "A1"]]},
        {"prompt": "H", "completion": "G"},
        {"prompt": "Hello", "completion": "Hi there"},
        {"prompt": "How are you?", "completion": "Fine."},
        {"prompt": "And you?", "completion": "Yes", "history": [["How are you?", "Fine."]]},
        {"prompt": "1984", "completion": "42"},  # YAML scalars stay strings
    ]
    assert report["dropped"] == {"empty": 0, "duplicate": 0, "unanswered_turns": 2, "equal_answers": 0}
    assert report["bad_lines"] == 0 and report["files_read"] == 8


def test_bad_records_and_files_are_reported(tmp_path, write, prepare_finetune_cli):
    d = tmp_path / "raw"
    bad = write(d / "a.jsonl", b'{"prompt": "ok", "completion": "fine"}\n{"prompt": "broken"\n{"text": "no prompt"}\n'
                               b'{"prompt": "caf\xe9", "completion": "x"}\n{"prompt": "ok", "completion": "fine"}\n'
                               b'{"prompt": "  ", "completion": "empty prompt"}\n')
    empty = write(d / "b.json", "")
    binary = write(d / "c.jsonl", b"\x00\x01\x02")
    yml = write(d / "d.yml", "conversations:\n- - a\n  - [b\n")
    examples, report = prepare_finetune_cli([d], tmp_path / "out")
    assert examples == [{"prompt": "ok", "completion": "fine"}]
    assert report["dropped"]["duplicate"] == 1 and report["dropped"]["empty"] == 1
    assert [(b["file"], b["line"]) for b in report["bad_line_examples"]] == [(bad, 2), (bad, 3), (bad, 4), (yml, 4)]
    reasons = [b["reason"] for b in report["bad_line_examples"]]
    assert reasons[0].startswith("malformed JSON")
    assert reasons[1].startswith("missing a prompt field (prompt/question/instruction); fields present: text")
    assert reasons[2].startswith("not valid UTF-8 (byte 0xe9") and reasons[3].startswith("malformed YAML")
    assert [s["file"] for s in report["files_skipped"]] == [empty, binary]


def test_prepare_errors(tmp_path, write, fails, no_output):
    out = str(tmp_path / "out")
    assert fails(prepare_data_finetune,
                 ["--input", str(tmp_path / "x.json"), "--output", out]).endswith("does not exist; check the path")
    (tmp_path / "e").mkdir()
    assert "holds no .json/.jsonl/.yaml/.yml files" in fails(prepare_data_finetune,
                                                             ["--input", str(tmp_path / "e"), "--output", out])
    only_bad = write(tmp_path / "bad.jsonl", '{"text": "no prompt"}\n')
    msg = fails(prepare_data_finetune, ["--input", only_bad, "--output", out])
    assert "no fine-tuning examples found (1 record(s) read, 1 bad)" in msg
    assert no_output(out)
    good = write(tmp_path / "good.jsonl", '{"prompt": "p", "completion": "c"}\n')
    write(os.path.join(out, "examples.jsonl"), "old")
    msg = fails(prepare_data_finetune, ["--input", good, "--output", out])
    assert "already exists and was not written by this script" in msg  # --overwrite would be refused too
    assert open(os.path.join(out, "examples.jsonl")).read() == "old"
    msg = fails(build_finetune_datasets, ["--input", str(tmp_path / "nowhere"), "--output", out])
    assert msg.endswith("does not exist; check the path")


@pytest.fixture
def prepared(tmp_path, write):
    d = tmp_path / "prepared"
    lines = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(40)]
    lines[3]["context"] = "A context. " * 50
    lines[5]["history"] = [["Earlier?", "Yes."]]
    lines[7]["completion"] = "long " * 200
    write(d / "examples.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    return d, lines


def test_build_applies_the_template_truncates_and_drops(prepared, tmp_path, build_finetune_cli):
    src, lines = prepared
    data, meta = build_finetune_cli(src, tmp_path / "out", "--max_seq_len", "64", "--val_fraction", "0.25")
    enc = get_tokenizer()
    got = data["train"] + data["val"]
    assert len(data["val"]) == 10 and len(got) == 39  # one completion too long for 64 tokens
    assert meta["dropped"] == {"completion_too_long": 1} and meta["truncated"] == 1
    by_completion = {tuple(x["completion_ids"]): x["prompt_ids"] for x in got}
    for i, ex in enumerate(lines):
        c = enc.encode(format_completion(ex["completion"]))
        if i == 7:
            assert tuple(c) not in by_completion
            continue
        history = [tuple(t) for t in ex.get("history", [])]
        p = enc.encode(format_prompt(ex["prompt"], ex.get("context"), history))
        if i == 3:  # too long: the prompt loses its start, the completion survives
            assert len(p) + len(c) > 64 and by_completion[tuple(c)] == p[-(64 - len(c)):]
        else:
            assert by_completion[tuple(c)] == p
    assert enc.decode(by_completion[tuple(enc.encode(format_completion("Answer 5.")))]).startswith(
        "\n\n### User: Earlier?")
    assert max(len(x["prompt_ids"]) + len(x["completion_ids"]) for x in got) <= 64


def test_build_is_deterministic_by_seed(prepared, tmp_path, build_finetune_cli):
    src, _ = prepared
    outs = []
    for i, seed in enumerate(["1", "1", "2"]):
        build_finetune_cli(src, tmp_path / f"o{i}", "--seed", seed, "--val_fraction", "0.2")
        outs.append({n: (tmp_path / f"o{i}" / n).read_bytes() for n in ("train.jsonl", "val.jsonl", "meta.json")})
    assert outs[0] == outs[1] and outs[0]["val.jsonl"] != outs[2]["val.jsonl"]


def test_build_errors(prepared, tmp_path, write, fails, no_output):
    src, _ = prepared
    out = str(tmp_path / "out")
    msg = fails(build_finetune_datasets, ["--input", str(src), "--output", out, "--max_seq_len", "3"])
    assert "no training examples left" in msg and "longer than --max_seq_len 3" in msg and no_output(out)
    write(tmp_path / "bad" / "x.jsonl", '{"question": "not prepared"}\n')
    msg = fails(build_finetune_datasets, ["--input", str(tmp_path / "bad"), "--output", out, "--val_fraction", "0"])
    assert "1 bad line(s)" in msg and no_output(out)
