"""generate_pretrained.py / generate_finetuned.py: streaming, seeds, the prompt template, bad input."""
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import generate_finetuned
import generate_pretrained
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.lora import adapter_state_dict, apply_lora, lora_modules, merged_state_dict
from utils.checkpoints.adapter import save_adapter
from utils.checkpoints.model import load_model, save_model
from utils.cli import run
from utils.generation.loading import load_for_generation
from utils.generation.streaming import AnswerStream, Streamer, Utf8Stream, prompt_budget
from utils.prompt_template import END_MARKER, extract_answer, format_prompt
from utils.tokenizer import EOT_TOKEN, get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
END_TOKEN = 23578  # " END" is one GPT-2 token
enc = get_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gen") / "tiny"
    save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64)), path)
    return path


@pytest.fixture(scope="module")
def end_ckpt(tmp_path_factory):
    """A model that says " END" from position 40 on: blocks add nothing, and from there the position
    embedding points at wte[" END"]. Before that it repeats its last token (an embedding is most
    similar to itself). Enough to see the template's end marker stop and get stripped."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64))
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        d = torch.randn(128)
        d = (d - d.mean()) / (d - d.mean()).norm()
        model.transformer.wpe.weight.zero_()
        model.transformer.wpe.weight[40:] = 50 * d
        model.transformer.wte.weight[END_TOKEN] = d
    path = tmp_path_factory.mktemp("gen") / "end"
    save_model(model, path)
    return path


def exact(args):
    """fp32 unless a test asks for a dtype: the references below are computed in fp32."""
    return [*map(str, args)] + ([] if "--dtype" in args else ["--dtype", "float32"])


def script(name, *args, stdin=None):
    proc = subprocess.run([sys.executable, name, *exact(args)], cwd=REPO, capture_output=True, text=True,
                          input=stdin, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def in_process(module, capfd, *args, stdin=None, monkeypatch=None):
    """The script's own entry point (`run(PROG, main)`), in this process."""
    if stdin is not None:
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        run(module.PROG, module.main, exact(args))
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def expected_new_ids(ckpt, prompt_ids, n, stop=(EOT_TOKEN,), **sampling):
    model = load_model(ckpt).eval()
    out = model.generate([prompt_ids], n, stop_tokens=stop, **sampling)[0][len(prompt_ids):]
    return out[:-1] if out and out[-1] in stop else out


# --------------------------------------------------------------------------------- the scripts

def test_pretrained_streams_the_greedy_continuation(ckpt):
    prompt = "Hello world, ünïcödé 日本"
    rc, out, err = script("generate_pretrained.py", "--checkpoint", ckpt, "--prompt", prompt, "--temperature", "0",
                          "--max_new_tokens", 40, "--device", "cpu")
    assert rc == 0, err
    new = expected_new_ids(ckpt, enc.encode(prompt), 40, temperature=0)
    assert out == prompt + enc.decode(new) + "\n"
    prompt_tokens = len(enc.encode(prompt))
    assert f"prompt {prompt_tokens} tokens, {len(new)} new tokens in " in err and "tokens/s" in err


def test_pretrained_seeded_sampling_is_reproducible(ckpt, capfd):
    args = ["--checkpoint", ckpt, "--prompt", "Once upon a time", "--prompt", "The", "--top_k", 40, "--top_p", 0.9,
            "--temperature", 1.0, "--max_new_tokens", 24]
    rc1, out1, err1 = script("generate_pretrained.py", *args, "--seed", 7)
    rc2, out2, _ = script("generate_pretrained.py", *args, "--seed", 7)
    rc3, out3, _ = in_process(generate_pretrained, capfd, *args, "--seed", 8)
    assert rc1 == rc2 == rc3 == 0, err1
    assert out1 == out2 and out1 != out3
    # Each prompt gives what it gives alone with that seed: the script is model.generate + a seeded generator.
    first = out1.split("\n" + "-" * 40 + "\n")[0]
    new = expected_new_ids(ckpt, enc.encode("Once upon a time"), 24, temperature=1.0, top_k=40, top_p=0.9,
                           generator=torch.Generator().manual_seed(7))
    assert first == "Once upon a time" + enc.decode(new) + "\n"
    assert err1.count("seed 7]") == 2


def test_pretrained_prompt_file_and_left_truncation(ckpt, tmp_path, capfd):
    long_text = " ".join(f"w{i}" for i in range(200))  # ~400 tokens; gpt2-tiny's context is 128
    (tmp_path / "p.txt").write_text(long_text)
    rc, out, err = in_process(generate_pretrained, capfd, "--checkpoint", ckpt, "--prompt_file", tmp_path / "p.txt",
                              "--temperature", 0, "--max_new_tokens", 30)
    assert rc == 0, err
    budget = prompt_budget(128, 30)
    assert budget == 98 and f"keeping its last {budget}" in err
    kept = enc.encode(long_text)[-budget:]
    assert out == enc.decode(kept) + enc.decode(expected_new_ids(ckpt, kept, 30, temperature=0)) + "\n"


def test_finetuned_wraps_the_question_and_strips_the_end_marker(end_ckpt):
    question, context = "Who wrote Hamlet?", "Plays of the 1600s."
    rc, out, err = script("generate_finetuned.py", "--checkpoint", end_ckpt, "--question", question,
                          "--context", context, "--temperature", 0, "--max_new_tokens", 50)
    assert rc == 0, err
    prompt_ids = enc.encode_ordinary(format_prompt(question, context))
    assert len(prompt_ids) < 40
    new = expected_new_ids(end_ckpt, prompt_ids, 50, stop=(EOT_TOKEN, END_TOKEN), temperature=0) + [END_TOKEN]
    assert len(new) == (40 - len(prompt_ids) + 1) + 1  # new tokens at positions len(prompt)..40, then " END"
    assert out == extract_answer(enc.decode(new)) + "\n"
    assert "END" not in out and f"prompt {len(prompt_ids)} tokens, {len(new)} new tokens" in err


def test_finetuned_stdin_loop_keeps_history(ckpt, monkeypatch, capfd):
    questions = ["What is the capital of France?", "", "And of Spain?", "Thanks!"]
    rc, out, err = in_process(generate_finetuned, capfd, "--checkpoint", ckpt, "--temperature", 0,
                              "--max_new_tokens", 12, stdin="\n".join(questions) + "\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    answers = out.split("\n")[:-1]
    assert len(answers) == 3  # the blank line is skipped
    history = []
    for q, a, line in zip([q for q in questions if q], answers,
                          [e for e in err.splitlines() if e.startswith("[prompt")]):
        prompt_ids = enc.encode_ordinary(format_prompt(q, None, history))
        assert f"[prompt {len(prompt_ids)} tokens" in line  # earlier turns are in the prompt
        assert a == extract_answer(enc.decode(expected_new_ids(ckpt, prompt_ids, 12, temperature=0)))
        history.append((q, a))


class ScriptedModel:
    """Stands in for a model in generate_finetuned.py: answers each turn with the next scripted answer
    (its tokens, then " END"), and records the prompt it was given."""

    def __init__(self, answers, block_size=1024):
        self.answers, self.prompts = list(answers), []
        self.config = GPT2Config(block_size=block_size)
        self.transformer = SimpleNamespace(wte=SimpleNamespace(weight=torch.zeros(1)))  # where it "lives": the CPU

    def generate_tokens(self, idx, _, max_new_tokens, **__):
        """The decoder's token-by-token form, as utils.generation.streaming drives it."""
        self.prompts.append(idx[0].tolist())
        for token in enc.encode_ordinary(" " + self.answers.pop(0)) + [END_TOKEN]:
            yield torch.tensor([token])


def test_finetuned_stdin_prompts_equal_the_builders(tmp_path, monkeypatch, capfd):
    """Issue 20 item 5: the prompt of turn N is the one build_finetune_datasets.py builds for turn N of
    the same dialogue (prepared from a chatterbot file, as the quickstart does), token for token."""
    import json

    import build_finetune_datasets
    import prepare_data_finetune
    turns = ["What are you?", "I am but a man in a mask.", "Are you a programmer?", "Of course I am a programmer.",
             "What annoys you?", "A lot of things, like all the other digits other than 0 and 1."]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "chat.yml").write_text("categories:\n- test\nconversations:\n- - "
                                               + "\n  - ".join(turns) + "\n", encoding="utf-8")
    for module, args in ((prepare_data_finetune, ["--input", tmp_path / "raw", "--output", tmp_path / "prepared"]),
                         (build_finetune_datasets, ["--input", tmp_path / "prepared", "--output", tmp_path / "built",
                                                    "--val_fraction", "0"])):
        module.main([str(a) for a in args])
    built = [json.loads(line) for line in (tmp_path / "built" / "train.jsonl").read_text().splitlines()]
    built = sorted(built, key=lambda ex: len(ex["prompt_ids"]))  # turn 1, 2, 3
    questions, answers = turns[0::2], turns[1::2]
    assert [ex["completion_ids"] for ex in built] == [enc.encode_ordinary(f" {a} END") for a in answers]

    model = ScriptedModel(answers)
    monkeypatch.setattr(generate_finetuned, "load_for_generation", lambda *a, **k: model)
    monkeypatch.setattr(generate_finetuned, "check_model_dirs", lambda args: None)
    rc, out, err = in_process(generate_finetuned, capfd, "--checkpoint", tmp_path, "--temperature", 0,
                              stdin="\n".join(questions) + "\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    assert out.splitlines() == answers
    assert model.prompts == [ex["prompt_ids"] for ex in built]


def test_finetuned_single_turn_asks_every_line_alone(tmp_path, monkeypatch, capfd):
    questions, answers = ["What are you?", "Are you a programmer?"], ["A man in a mask.", "Of course."]
    model = ScriptedModel(answers)
    monkeypatch.setattr(generate_finetuned, "load_for_generation", lambda *a, **k: model)
    monkeypatch.setattr(generate_finetuned, "check_model_dirs", lambda args: None)
    rc, out, err = in_process(generate_finetuned, capfd, "--checkpoint", tmp_path, "--temperature", 0, "--single_turn",
                              stdin="\n".join(questions) + "\n", monkeypatch=monkeypatch)
    assert rc == 0 and out.splitlines() == answers, err
    assert model.prompts == [enc.encode_ordinary(format_prompt(q)) for q in questions]  # what --question gives


def test_finetuned_drops_oldest_turns_to_fit(ckpt, monkeypatch, capfd):
    long_q = "Tell me about " + "the history of the world " * 6  # ~40 tokens a turn; budget is 64
    rc, out, err = in_process(generate_finetuned, capfd, "--checkpoint", ckpt, "--temperature", 0,
                              "--max_new_tokens", 100, stdin=f"{long_q}\n{long_q}\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    assert "dropped the 1 oldest turn(s)" in err and len(out.split("\n")) == 3


def test_finetuned_lora_attached_in_memory_equals_merged(ckpt, tmp_path, capfd):
    base = load_model(ckpt)
    apply_lora(base, 4, 8.0, 0.0, ("q", "v"))
    for m in lora_modules(base).values():
        for b in m.lora_B.values():
            torch.nn.init.normal_(b, std=0.5)
    save_adapter(tmp_path / "adapter", adapter_state_dict(base), r=4, alpha=8.0, dropout=0.0, targets=("q", "v"),
                 train_bias=False, base_config=base.config, base_checkpoint=ckpt)
    merged = GPT2LMHeadModel(base.config)
    merged.load_state_dict(merged_state_dict(base))
    save_model(merged, tmp_path / "merged")
    attached = load_for_generation(ckpt, lora=tmp_path / "adapter")
    idx = torch.randint(0, 50257, (1, 9))
    with torch.no_grad():
        assert (attached(idx)[0] - merged.eval()(idx)[0]).abs().max().item() < 1e-5
    outs = []
    for args in (["--checkpoint", ckpt, "--lora", tmp_path / "adapter"], ["--checkpoint", tmp_path / "merged"],
                 ["--checkpoint", ckpt]):
        rc, out, err = in_process(generate_finetuned, capfd, *args, "--question", "Hi?", "--temperature", 0,
                                  "--max_new_tokens", 30)
        assert rc == 0, err
        outs.append(out)
    assert outs[0] == outs[1] != outs[2]


def test_help():
    for name in ("generate_pretrained.py", "generate_finetuned.py"):
        rc, out, _ = script(name, "--help")
        assert rc == 0
        for flag in ("--checkpoint", "--max_new_tokens", "--temperature", "--top_k", "--top_p", "--seed",
                     "--device", "--dtype"):
            assert flag in out, (name, flag)


# ------------------------------------------------------------------------------------ bad input

def assert_one_line_error(rc, err, prog, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


BAD = [
    (["--prompt", ""], "prompt 1 is empty"),
    ([], "no prompt"),
    (["--prompt", "x", "--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--prompt", "x", "--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
    (["--prompt", "x", "--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--prompt", "x", "--top_k", "-3"], "--top_k must be >= 0"),
    (["--prompt", "x", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--prompt", "x", "--repetition_penalty", "0"], "--repetition_penalty must be > 0"),
    (["--prompt_file", "/nonexistent/prompt.txt"], "No such file or directory: /nonexistent/prompt.txt"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_pretrained_bad_input(ckpt, capfd, args, message):
    rc, out, err = in_process(generate_pretrained, capfd, "--checkpoint", ckpt, *args)
    assert_one_line_error(rc, err, "generate_pretrained.py", message)
    assert out == ""


@pytest.mark.parametrize("args, message", [
    (["--question", ""], "--question is empty"),
    (["--question", "  "], "--question is empty"),
    (["--question", "q", "--top_p", "2"], "--top_p must be in (0, 1]"),
    (["--question", "q", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--question", "q", "--lora", "/nonexistent"], "no adapter_config.json"),
])
def test_finetuned_bad_input(ckpt, capfd, args, message):
    rc, out, err = in_process(generate_finetuned, capfd, "--checkpoint", ckpt, *args)
    assert_one_line_error(rc, err, "generate_finetuned.py", message)


def test_bad_checkpoint_and_device(ckpt, tmp_path, capfd):
    rc, _, err = in_process(generate_pretrained, capfd, "--checkpoint", tmp_path / "nope", "--prompt", "x")
    assert_one_line_error(rc, err, "generate_pretrained.py", "not a directory")
    if not torch.cuda.is_available():
        rc, _, err = in_process(generate_pretrained, capfd, "--checkpoint", ckpt, "--prompt", "x", "--device", "cuda")
        assert_one_line_error(rc, err, "generate_pretrained.py", "CUDA is not available")


def test_inputs_are_checked_before_the_first_line(ckpt, tmp_path, capfd):
    """--dtype auto says what it chose: only once --checkpoint and --lora are known to be usable."""
    base = load_model(ckpt)
    apply_lora(base, 4, 8.0, 0.0, ("q", "v"))
    save_adapter(tmp_path / "adapter", adapter_state_dict(base), r=4, alpha=8.0, dropout=0.0, targets=("q", "v"),
                 train_bias=False, base_config=base.config, base_checkpoint=ckpt)
    cases = [
        (generate_pretrained, ["--checkpoint", tmp_path / "nope", "--prompt", "x"], ["not a directory"]),
        (generate_finetuned, ["--checkpoint", tmp_path / "nope", "--question", "x"], ["not a directory"]),
        (generate_finetuned, ["--checkpoint", tmp_path / "nope"], ["not a directory"]),  # the stdin loop
        (generate_finetuned, ["--checkpoint", ckpt, "--lora", tmp_path / "nope", "--question", "x"],
         ["no adapter_config.json"]),
        # the hints point the right way: an adapter is given with --lora, a model as --checkpoint
        (generate_finetuned, ["--checkpoint", tmp_path / "adapter", "--question", "x"],
         ["is a LoRA adapter, not a model", "--lora", f"convert_lora_checkpoint.py --base {ckpt} --lora"]),
        (generate_finetuned, ["--checkpoint", ckpt, "--lora", ckpt, "--question", "x"],
         ["holds a model, not an adapter"]),
    ]
    for module, args, fragments in cases:
        rc, out, err = in_process(module, capfd, *args, "--dtype", "auto")
        assert_one_line_error(rc, err, module.PROG, *fragments)
        assert "Convert an HF model" not in err
        assert out == ""


def test_bad_input_as_subprocesses(ckpt):
    """End to end, as a user runs it: one line on stderr, exit code 2, no traceback."""
    rc, out, err = script("generate_pretrained.py", "--checkpoint", ckpt, "--prompt", "x", "--top_p", "1.01")
    assert_one_line_error(rc, err, "generate_pretrained.py", "--top_p must be in (0, 1], got 1.01")
    rc, out, err = script("generate_finetuned.py", "--checkpoint", ckpt, "--question", "q", "--temperature", "-2")
    assert_one_line_error(rc, err, "generate_finetuned.py", "--temperature must be >= 0")


# ------------------------------------------------------------------------------------ streaming

def test_utf8_stream_prints_only_whole_characters():
    text = "naïve café — 日本語のテキスト 🤖🚀 ok"
    ids = enc.encode(text)
    stream, pieces = Utf8Stream(), []
    for t in ids:
        pieces.append(stream.push(t))
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some characters really were split across tokens


def test_utf8_stream_equals_decode_on_any_tokens():
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(50256) for _ in range(rng.randrange(1, 12))]
        stream = Utf8Stream()
        assert "".join(stream.push(t) for t in ids) + stream.flush() == enc.decode(ids)


@pytest.mark.parametrize("generated", [
    " Paris is the capital. END more text",
    " Paris END",
    "  Paris\n\n### User: next question",
    " no marker at all, just text that runs to the token limit   ",
    " x ENDING",
    "END at the start",
    " unicode 日本 and spaces      \n\n### Context: c",
    "   ",
])
def test_answer_stream_prints_exactly_the_answer(generated):
    rng = random.Random(len(generated))
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(generated)), k=min(len(generated) - 1, rng.randrange(0, 8))))
        pieces = [generated[i:j] for i, j in zip([0] + cuts, cuts + [len(generated)])]
        stream, printed, stopped_at = AnswerStream(), "", None
        for k, piece in enumerate(pieces):
            out, done = stream.push(piece)
            printed += out
            assert extract_answer(generated).startswith(printed)  # never prints what it must take back
            if done:
                stopped_at = k
                break
        printed += stream.finish()
        assert printed == stream.answer == \
            extract_answer("".join(pieces[: len(pieces) if stopped_at is None else stopped_at + 1]))
        assert printed == extract_answer(generated)
        if any(m in generated for m in (END_MARKER, "\n\n### User:", "\n\n### Context:")):
            assert stopped_at is not None


def test_streamer_streams_and_stops_on_request(ckpt):
    from types import SimpleNamespace
    model = load_for_generation(ckpt)
    args = SimpleNamespace(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=30, seed=1,
                           dtype="float32")
    streamer = Streamer(model, args, torch.device("cpu"))
    seen = []
    result = streamer.run(enc.encode("Hello"), on_text=lambda piece: seen.append(piece) or len(seen) == 5)
    assert len(seen) == 5 and len(result.new_ids) <= 5 + 3  # stopped right after the 5th printed piece
    assert "".join(seen) == result.text == enc.decode(result.new_ids)
    full = streamer.run(enc.encode("Hello"))
    assert full.new_ids[: len(result.new_ids)] == result.new_ids and len(full.new_ids) == 30


def test_bf16_runs(ckpt, capfd):
    model = load_for_generation(ckpt, dtype="bfloat16")
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    rc, out, err = in_process(generate_pretrained, capfd, "--checkpoint", ckpt, "--prompt", "Hi", "--dtype", "bfloat16",
                              "--max_new_tokens", 5, "--seed", 0)
    assert rc == 0, err
    assert out.startswith("Hi") and "5 new tokens" in err


def test_decode_layout_changes_memory_not_values(ckpt):
    from utils.generation.loading import decode_layout
    plain = load_model(ckpt).eval()
    fast = decode_layout(load_model(ckpt).eval())
    assert fast.lm_head.weight is fast.transformer.wte.weight and not fast.lm_head.weight.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values()))
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert (plain(idx)[0] - fast(idx)[0]).abs().max().item() < 1e-5
    assert torch.equal(plain.generate(idx, 40, temperature=0), fast.generate(idx, 40, temperature=0))


def test_dtype_auto_says_what_it_chose_and_uses_it(ckpt, capfd, monkeypatch):
    # Simulate both kinds of CPU: the choice follows the measured bf16/fp32 speed ratio.
    import utils.hardware as hardware
    for speedup, chosen in ((3.9, "bfloat16"), (0.02, "float32")):
        monkeypatch.setattr(hardware, "bf16_speedup", lambda device="cpu", s=speedup: s)
        rc, out, err = in_process(generate_pretrained, capfd, "--checkpoint", ckpt, "--prompt", "Hi", "--dtype", "auto",
                                  "--max_new_tokens", 2, "--temperature", 0)
        assert rc == 0, err
        assert f"{chosen} (--dtype=auto: bf16 matmuls run" in err
