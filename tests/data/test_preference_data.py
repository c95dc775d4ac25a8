"""Preference pairs through prepare_data_finetune.py and build_finetune_datasets.py: the three input shapes,
the prompt template, TRL's truncation (prompt cut from the left, pairs whose answer cannot fit dropped)."""
import json

from utils.prompt_template import format_completion, format_prompt
from utils.tokenizer import get_tokenizer

HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 5"}


def test_three_shapes_become_one_format(tmp_path, write, prepare_finetune_cli):
    d = tmp_path / "raw"
    write(d / "a_plain.jsonl", json.dumps({"prompt": "P", "chosen": "good", "rejected": "bad", "context": "C"}) + "\n"
          + json.dumps({"prompt": "Same", "chosen": "x", "rejected": "x"}) + "\n")  # equal answers: dropped
    write(d / "b_hh.jsonl", json.dumps(HH) + "\n")
    write(d / "c_messages.jsonl", "\n".join(json.dumps(r) for r in [
        {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "no"}]},
        {"prompt": "Q", "chosen": [{"role": "assistant", "content": "A1"}],
         "rejected": [{"role": "assistant", "content": "A2"}]},
        {"prompt": "plain", "completion": "mixed in"},  # another kind: reported, skipped
    ]) + "\n")
    examples, report = prepare_finetune_cli([d], tmp_path / "out")
    assert examples == [
        {"prompt": "P", "chosen": "good", "rejected": "bad", "context": "C"},
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "history": [["Hi", "Hello!"]]},
        {"prompt": "U", "chosen": "yes", "rejected": "no", "context": "Be brief."},
        {"prompt": "Q", "chosen": "A1", "rejected": "A2"},
    ]
    assert report["kind"] == "preference"
    assert report["dropped"]["equal_answers"] == 1
    assert report["bad_lines"] == 1 and "plain record among preference" in report["bad_line_examples"][0]["reason"]


def test_a_pair_without_a_shared_prompt_is_a_bad_record(tmp_path, write, prepare_finetune_cli):
    d = tmp_path / "raw"
    write(d / "hh.jsonl", json.dumps(HH) + "\n" + json.dumps(
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}) + "\n")
    examples, report = prepare_finetune_cli([d], tmp_path / "out")
    assert len(examples) == 1 and report["bad_lines"] == 1
    assert "no shared prompt" in report["bad_line_examples"][0]["reason"]


def test_build_templates_truncates_and_drops_like_trl(tmp_path, write, build_finetune_cli):
    enc = get_tokenizer()
    long_prompt = " ".join(f"w{i}" for i in range(60))
    rows = [{"prompt": "Q1", "chosen": "short", "rejected": "a much longer rejected answer here", "context": "C"},
            {"prompt": long_prompt, "chosen": "ok", "rejected": "fine"},          # prompt cut from the left
            {"prompt": "Q3", "chosen": " ".join(["long"] * 40), "rejected": "x"}]  # answer alone too long: dropped
    src = tmp_path / "prep"
    write(src / "examples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(src / "report.json", json.dumps({"examples_out": 3}))
    split, meta = build_finetune_cli(src, tmp_path / "built", "--max_seq_len", "32", "--val_fraction", "0")
    assert meta["kind"] == "preference" and meta["dropped"] == {"answer_too_long": 1} and meta["truncated"] == 1
    first, second = split["train"]
    assert first == {"prompt_ids": enc.encode_ordinary(format_prompt("Q1", "C")),
                     "chosen_ids": enc.encode_ordinary(format_completion("short")),
                     "rejected_ids": enc.encode_ordinary(format_completion("a much longer rejected answer here"))}
    full = enc.encode_ordinary(format_prompt(long_prompt))
    longest = max(len(second["chosen_ids"]), len(second["rejected_ids"]))
    assert second["prompt_ids"] == full[len(full) + longest - 32:]  # the end of the prompt, next to the answers
    assert len(second["prompt_ids"]) + longest == 32
