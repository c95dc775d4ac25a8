"""What generate_pretrained.py and generate_finetuned.py share to print a continuation: prompt budget,
streaming, the summary.

Streaming: `model.generate` calls back with every new token; bytes are decoded incrementally, so
a character split across tokens (GPT-2's byte-level BPE does that to most non-ASCII text) is
printed once it is complete, never as garbage. What is printed equals `decode(new tokens)`.

Prompts longer than the context: the model sees at most `block_size` tokens. A prompt longer than
`prompt_budget(block_size, max_new_tokens)` — room for the new tokens, but never less than half
the context — is left-truncated to its last tokens (a note goes to stderr); past the context the
window slides, as `model.generate` documents.
"""
import codecs
import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch

from utils.cli import log
from utils.prompt_template import extract_answer
from utils.tokenizer import EOT_TOKEN, get_tokenizer

# --------------------------------------------------------------------------------------- prompts

def prompt_budget(block_size: int, max_new_tokens: int) -> int:
    """Prompt tokens kept: room for the new tokens, but never less than half the context."""
    return max(block_size - max_new_tokens, (block_size + 1) // 2)


def truncate_left(ids, budget, what="prompt"):
    """The last `budget` ids, with a note on stderr when something was cut."""
    if len(ids) <= budget:
        return ids
    log(f"{what} has {len(ids)} tokens; keeping its last {budget} (the context holds the prompt and the new tokens)")
    return ids[len(ids) - budget:]


# ------------------------------------------------------------------------------------- streaming

class Utf8Stream:
    """Token ids in, text out as soon as it decodes; incomplete UTF-8 sequences wait for their bytes."""

    def __init__(self, enc=None):
        self.enc = enc or get_tokenizer()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # what tiktoken's decode does

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.enc.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class AnswerStream:
    """Generated text in, the answer out as it grows: what `extract_answer` will return, never more.

    The end marker (" END") or a new turn ("\n\n### User:") may arrive split across tokens, so
    the last HOLD characters and trailing whitespace wait until the next piece shows what they are.
    `push` returns (text to print, done); done once a marker has appeared.
    """
    HOLD = 16  # longer than every marker extract_answer cuts at (the longest, "\n\n### Context:", has 14)

    def __init__(self):
        self.text, self.printed = "", 0

    def push(self, piece: str):
        self.text += piece
        answer = extract_answer(self.text)
        done = answer != self.text.strip()  # extract_answer cut something: a marker is complete
        safe = answer if done else answer[: max(0, len(answer) - self.HOLD)].rstrip()
        return self._advance(safe), done

    def finish(self) -> str:
        """The rest of the answer, once generation has ended."""
        return self._advance(extract_answer(self.text))

    @property
    def answer(self) -> str:
        return extract_answer(self.text)

    def _advance(self, safe):
        out = safe[self.printed:]
        self.printed = max(self.printed, len(safe))
        return out


@dataclass
class Result:
    prompt_ids: list
    new_ids: list   # stop token not included
    text: str       # decode(new_ids)
    seconds: float
    seed: int


class Streamer:
    """Sampling settings + device + dtype; `run(prompt_ids, on_text)` streams one continuation."""

    def __init__(self, model, args, device, stop_tokens=(EOT_TOKEN,)):
        self.model, self.device = model, device
        self.sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                             repetition_penalty=args.repetition_penalty)
        if getattr(args, "speculate", None) is not None:  # per request (the server); else the decoder's default
            self.sampling["speculate"] = args.speculate
        self.max_new_tokens = args.max_new_tokens
        self.seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.bf16 = args.dtype == "bfloat16"
        self.stop_tokens = tuple(stop_tokens)

    def tokens(self, prompt_ids):
        """The new token ids after `prompt_ids`, one at a time, as they are generated (stop token not included)."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        yield from stream_tokens(self.model, prompt_ids, self.max_new_tokens, stop_tokens=self.stop_tokens,
                                 generator=generator, bf16=self.bf16, **self.sampling)

    def run(self, prompt_ids, on_text=None) -> Result:
        """Generate after `prompt_ids`; `on_text(piece)` gets each decoded piece and may return True to stop."""
        stream, new_ids, text = Utf8Stream(), [], []
        t0 = time.perf_counter()
        tokens = self.tokens(prompt_ids)
        for token in tokens:
            new_ids.append(token)
            piece = stream.push(token)
            text.append(piece)
            if piece and on_text is not None and on_text(piece):
                tokens.close()
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tail = stream.flush()
        if tail:
            text.append(tail)
            if on_text is not None:
                on_text(tail)
        return Result(list(prompt_ids), new_ids, "".join(text), seconds, self.seed)


def stream_tokens(model, prompt_ids, max_new_tokens, stop_tokens=(EOT_TOKEN,), generator=None, bf16=False,
                  **sampling):
    """Token ids generated after `prompt_ids` (a list), yielded one by one as each is decided.

    The token-by-token form of `model.generate` (same sampling keywords: temperature, top_k, top_p,
    repetition_penalty, speculate), on whatever decoder the model has: plain, or prepared by
    utils.generation.loading.prepare_for_decode (int8, compiled, speculative). Ends at a stop token
    (not yielded) or after `max_new_tokens`. `bf16`: run under bf16 autocast (bf16 weights); the
    autocast is entered around each step only, never while the caller holds control.
    """
    device = model.transformer.wte.weight.device
    idx = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    steps = model.generate_tokens(idx, None, max_new_tokens, stop_tokens=tuple(stop_tokens), generator=generator,
                                  **sampling)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    try:
        while True:
            with autocast():
                try:
                    token = int(next(steps)[0])
                except StopIteration:
                    return
            if token in stop_tokens:
                return
            yield token
    finally:
        steps.close()


def emit(text):
    """Print generated text as it comes (stdout, flushed)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def summary(result: Result, label=""):
    """The stderr line after each generation: prompt tokens, new tokens, speed, seed."""
    n = len(result.new_ids)
    rate = n / result.seconds if result.seconds > 0 else float("inf")
    log(f"[{label}prompt {len(result.prompt_ids)} tokens, {n} new tokens in {result.seconds:.2f} s: "
         f"{rate:.1f} tokens/s, seed {result.seed}]")


class Totals:
    """New tokens and seconds over a run's generations: the scripts' last line."""

    def __init__(self):
        self.tokens, self.seconds = 0, 0.0

    def add(self, result: Result):
        self.tokens += len(result.new_ids)
        self.seconds += result.seconds

    def report(self, model):
        stats = (getattr(model, "decode_plan", None) or {}).get("stats")
        if stats and stats["forwards"]:
            rate = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
            log(f"speculation: {stats['accepted']} of {stats['drafted']} drafted tokens accepted ({rate:.0%}), "
                f"{self.tokens / stats['forwards']:.2f} new tokens per forward")
        rate = self.tokens / self.seconds if self.seconds > 0 else float("inf")
        log(f"total: {self.tokens} new tokens in {self.seconds:.2f} s: {rate:.1f} tokens/s")


def setup_stdout():
    """Never die on a console that cannot show a character: print a replacement instead."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")
