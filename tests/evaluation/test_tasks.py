"""Task construction: hand-worked cases of lm-eval's templates, data files in their original formats,
and the metrics' arithmetic (acc, acc_norm per character, acc_norm_tokens per token, perplexity)."""
import json
import math

import pytest

from utils.errors import UserError
from utils.evaluation.data import load_docs
from utils.evaluation.scoring import Score
from utils.evaluation.tasks import (
    arc_easy,
    build_examples,
    hellaswag,
    hellaswag_preprocess,
    lambada,
    lambada_metrics,
    multiple_choice_metrics,
    parse_tasks,
    piqa,
    winogrande,
)

HELLASWAG_ROW = {"ind": 4, "activity_label": "Personal Care and Style", "ctx_a": "How to dye your hair.",
                 "ctx_b": "then", "label": "1",
                 "endings": ["[header] Rinse it. [title] Dry it.", "Wash  it [step] twice.", "a", "b"]}


def test_hellaswag_preprocessing_by_hand():
    ex = hellaswag(HELLASWAG_ROW)
    assert ex.requests[0][0] == "Personal Care and Style: How to dye your hair. Then"
    # lm-eval's quirks kept on purpose: " [title]" -> ". " gives "..", a leading [tag] leaves a space
    assert ex.requests[0][1] == "  Rinse it.. Dry it."
    assert ex.requests[1][1] == " Wash it twice."
    assert ex.gold == 1 and ex.choice_chars == [len(" Rinse it.. Dry it."), len("Wash it twice."), 1, 1]
    assert hellaswag_preprocess("  a [b] c  ") == "a c"


def test_other_templates_by_hand():
    ex = piqa({"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Hit it.", "label": 0})
    q = "Question: Open a jar\nAnswer:"
    assert ex.requests == [(q, " Twist the lid."), (q, " Hit it.")]
    ex = winogrande({"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"})
    assert ex.requests == [("Sarah beat Maria so Sarah", " won."), ("Sarah beat Maria so Maria", " won.")]
    assert ex.gold == 0
    ex = arc_easy({"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["1", "2"]},
                   "answerKey": "2"})
    assert ex.requests[1] == ("Question: Which is a gas?\nAnswer:", " steam") and ex.gold == 1
    ex = lambada({"text": "He said  hello to  Anna"})  # split on single spaces, as lm-eval's template does
    assert ex.requests == [("He said  hello to ", " Anna")]


def test_metrics_by_hand():
    examples = build_examples("piqa", [{"goal": "g", "sol1": "aaaa", "sol2": "b", "label": 0}] * 2)
    scores = [[Score(-4.0, False, 4), Score(-2.0, False, 1)],   # acc: 1 (wrong); per char: -1 vs -2 -> 0 (right)
              [Score(-1.0, False, 1), Score(-3.0, False, 1)]]   # right by every rule
    m = multiple_choice_metrics("piqa", examples, scores)
    assert m == {"acc": 0.5, "acc_norm": 1.0, "acc_norm_tokens": 1.0, "n": 2}
    m = lambada_metrics([[Score(-1.0, True, 1)], [Score(-3.0, False, 2)]])
    assert m["acc"] == 0.5 and m["perplexity"] == pytest.approx(math.exp(2.0))


def test_original_file_formats(tmp_path):
    hs = dict(HELLASWAG_ROW, label=1)  # build-nanogpt's hellaswag_val.jsonl: same fields, integer label
    (tmp_path / "hellaswag_val.jsonl").write_text(json.dumps(hs) + "\n")
    assert build_examples("hellaswag", load_docs("hellaswag", str(tmp_path)))[0].gold == 1
    (tmp_path / "ARC-Easy-Test.jsonl").write_text(json.dumps(
        {"id": "x", "answerKey": "B", "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"},
                                                                               {"text": "b", "label": "B"}]}}) + "\n")
    ex = build_examples("arc_easy", load_docs("arc_easy", str(tmp_path)))[0]
    assert ex.requests[1] == ("Question: Q?\nAnswer:", " b") and ex.gold == 1
    (tmp_path / "valid.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    with pytest.raises(UserError, match="valid-labels.lst"):
        load_docs("piqa", str(tmp_path))
    (tmp_path / "valid-labels.lst").write_text("1\n")
    assert build_examples("piqa", load_docs("piqa", str(tmp_path)))[0].gold == 1
    (tmp_path / "lambada_test.jsonl").write_text('{"text": "a b c"}\n{"txt": 1}\n')
    with pytest.raises(UserError, match="lambada row lacks"):
        build_examples("lambada", load_docs("lambada", str(tmp_path)), source="lambada_test.jsonl")


def test_parse_tasks():
    assert parse_tasks("hellaswag:500, piqa") == [("hellaswag", 500), ("piqa", None)]
    for bad, msg in (("hellaswag:x", "whole number"), ("mmlu", "unknown task"), ("", "no task"), ("piqa:0", ">= 1")):
        with pytest.raises(UserError, match=msg):
            parse_tasks(bad)


def test_training_config_checks_eval_tasks_up_front():
    from configs.parser import ConfigError
    from configs.pretrain import PretrainConfig
    PretrainConfig(eval_tasks="hellaswag:500,piqa").validate()
    with pytest.raises(ConfigError, match="unknown task 'val_loss'"):  # the trainer has its own val loss
        PretrainConfig(eval_tasks="val_loss").validate()
