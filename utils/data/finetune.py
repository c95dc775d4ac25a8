"""Fine-tuning data: raw Q&A files -> {"prompt", "completion"[, "context"][, "history"]} lines
(prepare), then -> {"prompt_ids", "completion_ids"} lines with the prompt template applied (build).

Record shapes understood by `prepare`:
  {"prompt", "completion"}                         plain
  {"instruction", "input", "output"}               Alpaca (input -> context); Dolly's "response" too
  {"question", "answer"[, "context"]}              flat SQuAD-like; "answers" as a list or {"text": [...]}
  {"data": [{"paragraphs": [{"context", "qas"}]}]}  SQuAD's own nested file
  dialogues: a list of turns (chatterbot-corpus YAML), {"messages": [{"role", "content"}]} (OpenAI),
             {"conversations": [{"from", "value"}]} (ShareGPT): one example per assistant turn, with
             the earlier turns as "history" (a system message becomes the context).
Preference pairs (for finetune_dpo.py), written as {"prompt", "chosen", "rejected"[, "context"][, "history"]}:
  {"prompt", "chosen", "rejected"[, "context"]}    plain
  {"chosen", "rejected"} full transcripts           Anthropic HH-RLHF ("\n\nHuman: ...\n\nAssistant: ..."): the
                                                   shared turns before the last Assistant turn are the prompt
  {["prompt",] "chosen": [...], "rejected": [...]}  message lists (UltraFeedback-binarized): the same, by roles
A file set holds one kind: records of the other kind are reported and skipped, as are pairs whose two
answers are equal (nothing to prefer).
"""
import json
import os
import re

from tqdm import tqdm

from utils.data.build_pretrain import val_mask
from utils.data.cleaning import clean_field
from utils.data.kinds import check_build_input, mark
from utils.data.readers import (
    BadLine,
    BadLines,
    DataError,
    discover_files,
    iter_file,
    jsonl_line,
    output_writer,
    probe,
    read_lines,
    write_json,
)
from utils.prompt_template import format_completion, format_prompt
from utils.tokenizer import get_tokenizer

INPUT_KINDS = {"json", "jsonl", "yaml"}
PROMPT_KEYS = ("prompt", "question", "instruction")
COMPLETION_KEYS = ("completion", "answer", "output", "response", "answers")
CONTEXT_KEYS = ("context", "input")
USER_ROLES = {"user", "human", "prompter"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model"}
FORMAT = mark("finetune_built").value
ANSWER_FIELDS = {"plain": ("completion",), "preference": ("chosen", "rejected")}  # built: {field}_ids

_EXPECTED = ("expected prompt/completion, instruction/output, question/answer, "
             "a dialogue (a list of turns, \"messages\" or \"conversations\"), or a preference pair "
             "(prompt/chosen/rejected)")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")  # Anthropic HH-RLHF transcripts


class Skip(Exception):
    """A record that is readable but yields no example (counted under `reason`)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _first(rec, keys):
    for k in keys:
        if k in rec:
            return k, rec[k]
    return None, None


def _as_text(value, what):
    if isinstance(value, dict) and isinstance(value.get("text"), list):  # SQuAD v2 {"text": [...]}
        value = value["text"]
    if isinstance(value, list):  # SQuAD "answers": the first one
        if not value:
            raise Skip("no_answer")
        value = value[0]
        if isinstance(value, dict):
            value = value.get("text")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {what!r} is a {type(value).__name__}, not a string")
    return clean_field(value)


def _example(question, answer, context=None, history=()):
    if not question or not answer:
        raise Skip("empty")
    ex = {"prompt": question, "completion": answer}
    if context:
        ex["context"] = context
    if history:
        ex["history"] = [list(t) for t in history]
    return ex


def _dialogue(turns, context=None):
    """Examples from [(role, text)]: one per assistant turn, earlier turns as history."""
    examples, history, question, unanswered = [], [], None, 0
    for role, text in turns:
        if role == "system":
            context = "\n".join(filter(None, [context, text]))
        elif role == "user":
            question = text if question is None else f"{question}\n{text}"
        elif question is None:  # an assistant turn with nothing to answer
            unanswered += 1
        else:
            try:
                examples.append(_example(question, text, context, history))
            except Skip:
                unanswered += 1
            history.append((question, text))
            question = None
    return examples, unanswered + (question is not None)


def dialogue_prompt(turns) -> str:
    """The prompt text a fine-tuned model answers after `turns` ([(role, text)], roles user /
    assistant / system, ending with a non-empty user turn), grouped exactly as `_dialogue` groups a
    dialogue into training examples: system turns become the context, consecutive user turns one
    question, earlier question/answer pairs the history. Used by the server (utils/serving)."""
    if not turns or turns[-1][0] != "user" or not turns[-1][1]:
        raise ValueError("a dialogue to answer ends with a non-empty user turn")
    examples, _ = _dialogue([*turns, ("assistant", "?")])  # "?" stands for the answer to come
    ex = examples[-1]
    return format_prompt(ex["prompt"], ex.get("context"), [tuple(t) for t in ex.get("history", ())])


def _role_turns(items, role_key, text_key):
    turns = []
    for item in items:
        if not isinstance(item, dict) or role_key not in item or text_key not in item:
            raise ValueError(f"dialogue turns need {role_key!r} and {text_key!r} fields")
        role = str(item[role_key]).lower()
        role = "user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else role
        if role not in ("user", "assistant", "system"):
            raise ValueError(f"unknown dialogue role {item[role_key]!r}")
        turns.append((role, _as_text(item[text_key], text_key)))
    return turns


def _hh_turns(text, what):
    """[(role, text)] of an HH-RLHF transcript "\n\nHuman: ...\n\nAssistant: ..."."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"field {what!r} is not an HH-RLHF transcript (\"\\n\\nHuman: ...\\n\\nAssistant: ...\")")
    return [("user" if role == "Human" else "assistant", clean_field(body))
            for role, body in zip(parts[1::2], parts[2::2])]


def _answer_turns(value, what):
    """A preference answer as turns: a transcript string (HH-RLHF), a message list, or a plain string."""
    if isinstance(value, list):
        return _role_turns(value, "role", "content")
    if isinstance(value, str) and HH_TURN.match(value):
        return _hh_turns(value, what)
    return [("assistant", _as_text(value, what))]


def preference_from_record(rec):
    """{"prompt", "chosen", "rejected"[, "context"][, "history"]} of a preference record; Skip/ValueError."""
    chosen, rejected = _answer_turns(rec["chosen"], "chosen"), _answer_turns(rec["rejected"], "rejected")
    prompt = rec.get("prompt")
    if prompt is not None:  # the prompt apart: a string or the messages before the answers
        prefix = _role_turns(prompt, "role", "content") if isinstance(prompt, list) else \
            [("user", _as_text(prompt, "prompt"))]
        chosen, rejected = prefix + chosen, prefix + rejected
    if chosen[-1][0] != "assistant" or rejected[-1][0] != "assistant":
        raise ValueError("a preference pair's chosen and rejected must each end with an assistant answer")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected differ before their last assistant answer: no shared prompt")
    xk, xv = _first(rec, CONTEXT_KEYS)
    context = _as_text(xv, xk) if xv not in (None, "") else None
    examples, _ = _dialogue(chosen, context)
    if not examples or examples[-1]["completion"] != chosen[-1][1] or not rejected[-1][1]:
        raise Skip("empty")
    if chosen[-1][1] == rejected[-1][1]:
        raise Skip("equal_answers")
    ex = examples[-1]
    out = {"prompt": ex["prompt"], "chosen": chosen[-1][1], "rejected": rejected[-1][1]}
    out.update({k: ex[k] for k in ("context", "history") if k in ex})
    return out


def is_preference(rec) -> bool:
    return isinstance(rec, dict) and "chosen" in rec and "rejected" in rec


def examples_from_record(rec):
    """(examples, unanswered turns) of one record; ValueError says why a record is unusable."""
    if is_preference(rec):
        return [preference_from_record(rec)], 0
    if isinstance(rec, list):  # chatterbot: alternating user / assistant strings
        return _dialogue([("user" if i % 2 == 0 else "assistant", _as_text(t, f"turn {i + 1}"))
                          for i, t in enumerate(rec)])
    if not isinstance(rec, dict):
        raise ValueError(f"{_EXPECTED}; got a {type(rec).__name__}")
    if isinstance(rec.get("messages"), list):
        return _dialogue(_role_turns(rec["messages"], "role", "content"))
    convs = rec.get("conversations")
    if isinstance(convs, list) and convs and all(isinstance(c, list) for c in convs):  # chatterbot as JSON
        out, unanswered = [], 0
        for conv in convs:
            ex, u = examples_from_record(conv)
            out += ex
            unanswered += u
        return out, unanswered
    if isinstance(convs, list):
        return _dialogue(_role_turns(convs, "from", "value"))
    if isinstance(rec.get("data"), list):  # SQuAD
        out, unanswered = [], 0
        for article in rec["data"]:
            for para in (article.get("paragraphs") or []) if isinstance(article, dict) else []:
                context = _as_text(para.get("context", ""), "context")
                for qa in para.get("qas") or []:
                    answers = qa.get("answers") or qa.get("plausible_answers") or []
                    if qa.get("is_impossible") or not answers:
                        unanswered += 1
                        continue
                    try:
                        out.append(_example(_as_text(qa.get("question"), "question"), _as_text(answers, "answers"),
                                            context))
                    except Skip:
                        unanswered += 1
        return out, unanswered
    pk, pv = _first(rec, PROMPT_KEYS)
    ck, cv = _first(rec, COMPLETION_KEYS)
    if pk is None or ck is None:
        missing = "a prompt field (prompt/question/instruction)" if pk is None else \
            "a completion field (completion/answer/output/response)"
        keys = ", ".join(list(rec)[:8]) or "none"
        raise ValueError(f"missing {missing}; fields present: {keys}; {_EXPECTED}")
    xk, xv = _first(rec, CONTEXT_KEYS)
    context = _as_text(xv, xk) if xv not in (None, "") else None
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 for t in history):
        raise ValueError("field 'history' must be a list of [question, answer] pairs")
    history = [(_as_text(q, "history"), _as_text(a, "history")) for q, a in history]
    return [_example(_as_text(pv, pk), _as_text(cv, ck), context, history)], 0


def prepare_finetune(inputs, output, overwrite=False, log=print):
    """Raw Q&A files -> output/examples.jsonl + report.json; returns the report."""
    files = discover_files(inputs, INPUT_KINDS)
    writer = output_writer(output, overwrite, mark("finetune_prepared"), inputs)
    seen = set()
    report = {"inputs": [os.path.abspath(p) for p in inputs], "files_read": 0, "files_skipped": [],
              "records": 0, "examples_out": 0, "kind": None,
              "dropped": {"empty": 0, "duplicate": 0, "unanswered_turns": 0, "equal_answers": 0},
              "bad_lines": 0, "bad_line_examples": [], "per_file": []}

    bad_lines = BadLines()

    def bad(b, counts):
        bad_lines.add(b)
        counts["bad_lines"] += 1
        counts.setdefault("first_bad", b)

    with writer as tmp, \
            open(os.path.join(tmp, "examples.jsonl"), "w", encoding="utf-8") as out:
        for path in tqdm(files, desc="reading", unit="file", disable=None):
            problem = probe(path)
            if problem is not None:
                report["files_skipped"].append({"file": path, "reason": problem.reason})
                log(f"warning: skipped {path}: it {problem.reason}")
                continue
            report["files_read"] += 1
            counts = {"file": path, "records": 0, "examples": 0, "bad_lines": 0}
            for lineno, rec in iter_file(path):
                if isinstance(rec, BadLine):
                    bad(rec, counts)
                    continue
                counts["records"] += 1
                try:
                    examples, unanswered = examples_from_record(rec)
                except Skip as e:
                    report["dropped"][e.reason if e.reason in report["dropped"] else "empty"] += 1
                    continue
                except ValueError as e:
                    bad(BadLine(path, lineno, str(e)), counts)
                    continue
                report["dropped"]["unanswered_turns"] += unanswered
                kind = "preference" if examples and "chosen" in examples[0] else "plain"
                report["kind"] = report["kind"] or (kind if examples else None)
                if examples and kind != report["kind"]:  # one kind per dataset: the first record's
                    bad(BadLine(path, lineno, f"a {kind} record among {report['kind']} ones (the first record "
                                              "decides; prepare the two kinds into separate directories)"), counts)
                    continue
                for ex in examples:
                    line = jsonl_line(ex)
                    if line in seen:
                        report["dropped"]["duplicate"] += 1
                        continue
                    seen.add(line)
                    out.write(line)
                    counts["examples"] += 1
            first = counts.pop("first_bad", None)
            if first is not None:
                log(f"warning: {path}: {counts['bad_lines']} bad record(s) skipped "
                    f"(first at line {first.line}: {first.reason})")
            report["records"] += counts["records"]
            report["examples_out"] += counts["examples"]
            report["per_file"].append(counts)
        report["bad_lines"], report["bad_line_examples"] = bad_lines.count, bad_lines.examples
        if report["examples_out"] == 0:
            why = "; ".join(f"{s['file']}: {s['reason']}" for s in report["files_skipped"][:3]) or \
                f"{report['records']} record(s) read, {report['bad_lines']} bad"
            raise DataError(f"no fine-tuning examples found ({why}); {_EXPECTED}; nothing was written")
        write_json(os.path.join(tmp, "report.json"), report)
    return report


def tokenize_example(ex, max_seq_len, enc=None):
    """(prompt_ids, completion_ids, truncated) with the template applied; None if the completion
    alone does not fit (it needs max_seq_len - 1 tokens at most: one prompt token must precede it)."""
    enc = enc or get_tokenizer()
    history = [tuple(t) for t in ex.get("history") or ()]
    p = enc.encode_ordinary(format_prompt(ex["prompt"], ex.get("context"), history))
    c = enc.encode_ordinary(format_completion(ex["completion"]))
    if max_seq_len is None or len(p) + len(c) <= max_seq_len:
        return p, c, False
    if len(c) > max_seq_len - 1:
        return None
    return p[len(p) + len(c) - max_seq_len:], c, True  # keep the end of the prompt, next to the answer


def tokenize_pair(ex, max_seq_len, enc=None):
    """(prompt_ids, chosen_ids, rejected_ids, truncated) of a preference pair, as TRL fits one: the prompt
    loses its start until prompt + the longer answer fit; None if that answer alone does not fit."""
    enc = enc or get_tokenizer()
    history = [tuple(t) for t in ex.get("history") or ()]
    p = enc.encode_ordinary(format_prompt(ex["prompt"], ex.get("context"), history))
    c, r = (enc.encode_ordinary(format_completion(ex[k])) for k in ("chosen", "rejected"))
    longest = max(len(c), len(r))
    if max_seq_len is None or len(p) + longest <= max_seq_len:
        return p, c, r, False
    if longest > max_seq_len - 1:
        return None
    return p[len(p) + longest - max_seq_len:], c, r, True


def _read_examples(files):
    """(global line index, example or BadLine or None, (path, line number)) for every line of every file."""
    index = 0
    for path in files:
        for lineno, line in read_lines(path):
            index += 1
            if isinstance(line, BadLine):
                yield index - 1, line, (path, lineno)
                continue
            if not line.strip():
                yield index - 1, None, (path, lineno)
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                yield index - 1, BadLine(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})"), (path, lineno)
                continue
            answers = ("chosen", "rejected") if is_preference(ex) else ("completion",)
            if (not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str)
                    or not all(isinstance(ex.get(k), str) for k in answers)):
                yield index - 1, BadLine(path, lineno, "expected {\"prompt\": str, \"completion\": str"
                                                       "[, \"context\", \"history\"]} or {\"prompt\", "
                                                       "\"chosen\", \"rejected\"} "
                                                       "(prepare_data_finetune.py writes that)"), (path, lineno)
                continue
            yield index - 1, ex, (path, lineno)


def build_finetune(input_dir, output, max_seq_len=1024, val_fraction=0.05, seed=1337, overwrite=False, log=print):
    """Prepared examples -> output/train.jsonl, val.jsonl, meta.json; returns meta."""
    if max_seq_len is not None and max_seq_len < 2:
        raise DataError(f"--max_seq_len must be >= 2, got {max_seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    check_build_input(input_dir, "finetune_prepared")
    files = discover_files([input_dir], {"jsonl"})
    writer = output_writer(output, overwrite, mark("finetune_built"), [input_dir])
    enc = get_tokenizer()
    n_lines = sum(1 for path in files for _ in read_lines(path))
    is_val = val_mask(n_lines, val_fraction, seed)
    kind, truncated, too_long, bad = None, 0, 0, BadLines()
    splits = {}
    with writer as tmp:
        with open(os.path.join(tmp, "train.jsonl"), "w") as ftrain, open(os.path.join(tmp, "val.jsonl"), "w") as fval:
            for i, ex, where in tqdm(_read_examples(files), total=n_lines, desc="tokenizing", unit="ex", disable=None):
                if ex is None:
                    continue
                if isinstance(ex, BadLine):
                    bad.add(ex)
                    continue
                this = "preference" if is_preference(ex) else "plain"
                if kind is None:  # the first example decides: one kind per dataset
                    kind = this
                    fields = ANSWER_FIELDS[kind]
                    splits = {s: {"file": f"{s}.jsonl", "examples": 0, "prompt_tokens": 0,
                                  **{f"{f}_tokens": 0 for f in fields}, "longest": 0} for s in ("train", "val")}
                if this != kind:
                    bad.add(BadLine(*where, f"a {this} example among {kind} ones"))
                    continue
                result = tokenize_example(ex, max_seq_len, enc) if kind == "plain" else \
                    tokenize_pair(ex, max_seq_len, enc)
                if result is None:
                    too_long += 1
                    continue
                *ids, cut = result
                truncated += cut
                name = "val" if is_val[i] else "train"
                line = {"prompt_ids": ids[0], **{f"{f}_ids": a for f, a in zip(fields, ids[1:])}}
                (fval if is_val[i] else ftrain).write(json.dumps(line, separators=(",", ":")) + "\n")
                s = splits[name]
                s["examples"] += 1
                s["prompt_tokens"] += len(ids[0])
                for f, a in zip(fields, ids[1:]):
                    s[f"{f}_tokens"] += len(a)
                s["longest"] = max(s["longest"], len(ids[0]) + max(len(a) for a in ids[1:]))
        if not splits or splits["train"]["examples"] == 0:
            raise DataError(f"no training examples left from {input_dir} ({bad.count} bad line(s), {too_long} with "
                            f"an answer longer than --max_seq_len {max_seq_len}); nothing was written")
        bad.warn(log, "meta.json")
        meta = {
            "format": FORMAT,
            "kind": kind,  # "plain" (finetune.py, finetune_lora.py) or "preference" (finetune_dpo.py)
            "tokenizer": "gpt2 (tiktoken r50k_base)",
            "eot_token": enc.eot_token,
            "template": {"prompt": format_prompt("{question}", "{context}"),
                         "completion": format_completion("{answer}")},
            "max_seq_len": max_seq_len,
            "val_fraction": val_fraction,
            "seed": seed,
            "splits": splits,
            "truncated": truncated,
            "dropped": {"completion_too_long" if kind == "plain" else "answer_too_long": too_long},
            "bad_lines": bad.count,
            "bad_line_examples": bad.examples,
            "sources": [{"file": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files],
        }
        write_json(os.path.join(tmp, "meta.json"), meta)
    return meta

