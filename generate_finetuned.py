"""Answer questions with a fine-tuned model, streaming the answer to stdout as it is generated.

    python generate_finetuned.py --checkpoint out/finetune/final --question "Who wrote Hamlet?"
    python generate_finetuned.py --checkpoint out/finetune/final --context "..." --question "..."
    python generate_finetuned.py --checkpoint checkpoints/gpt2 --lora out/lora/final --question "..."
    python generate_finetuned.py --checkpoint out/finetune/final          # questions from stdin, one a line

The question is wrapped with the prompt template the fine-tuning data was built with
(utils/prompt_template.py); the answer ends at the template's end marker (" END"), a new turn, or
<|endoftext|>, and only the answer is printed. With no --question, every stdin line is a question
and earlier questions and answers stay in the prompt (multi-turn); the oldest turns are dropped
when the prompt would leave no room for --max_new_tokens, and a single turn that is still too long
is left-truncated, as build_finetune_datasets.py does. --single_turn answers every line alone: a small
model fine-tuned mostly on single-turn data (the quickstart's) answers a question only at the start
of the prompt, where it learned it, and after unrelated earlier turns says nothing or something else.
A summary line per answer goes to stderr.
"""
import argparse
import sys

from utils.cli import UsageError, log, run
from utils.generation.args import (
    add_decode_args,
    add_model_args,
    add_sampling_args,
    check_args,
    check_decode_args,
    check_model_dirs,
    prepare_decoder,
    resolve_dtype,
)
from utils.generation.loading import load_for_generation
from utils.generation.streaming import (
    AnswerStream,
    Streamer,
    Totals,
    emit,
    prompt_budget,
    setup_stdout,
    summary,
    truncate_left,
)
from utils.hardware import resolve_device
from utils.prompt_template import format_prompt
from utils.tokenizer import get_tokenizer

PROG = "generate_finetuned.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--lora", metavar="DIR", help="a LoRA adapter (finetune_lora.py) to apply to --checkpoint in memory")
    p.add_argument("--question", metavar="TEXT", help="the question; without it, questions are read from stdin")
    p.add_argument("--context", metavar="TEXT", help="optional context the question is about")
    p.add_argument("--single_turn", action="store_true",
                   help="stdin loop: answer every line alone, without the earlier turns in the prompt (for a model "
                        "fine-tuned on single-turn data: it answers a question where it learned it, at the start)")
    add_sampling_args(p, max_new_tokens=128)
    add_decode_args(p)
    return p.parse_args(argv)


def fit_prompt(enc, question, context, history, budget):
    """Prompt ids within `budget`: drop the oldest turns of `history` (in place) first, then left-truncate."""
    for start in range(len(history) + 1):
        ids = enc.encode_ordinary(format_prompt(question, context, history[start:]))
        if len(ids) <= budget:
            if start:
                log(f"dropped the {start} oldest turn(s) to fit the context")
            del history[:start]
            return ids
    del history[:]
    return truncate_left(ids, budget, what="the prompt (question and context)")


def answer(streamer, enc, question, context, history, budget, totals):
    ids = fit_prompt(enc, question, context, history, budget)
    stream = AnswerStream()

    def on_text(piece):
        out, done = stream.push(piece)
        emit(out)
        return done

    result = streamer.run(ids, on_text)
    emit(stream.finish() + "\n")
    summary(result)
    totals.add(result)
    return stream.answer


def main(argv=None):
    setup_stdout()
    args = parse_args(argv)
    check_args(args)
    check_decode_args(args)
    if args.question is not None and not args.question.strip():
        raise UsageError("--question is empty")
    device = resolve_device(args.device)
    check_model_dirs(args)  # every input checked before the first line is printed
    args.dtype = resolve_dtype(args.dtype, device)
    model = load_for_generation(args.checkpoint, lora=args.lora, device=device, dtype=args.dtype)
    model = prepare_decoder(model, args)
    enc = get_tokenizer()
    streamer = Streamer(model, args, device)
    budget = prompt_budget(model.config.block_size, args.max_new_tokens)
    totals = Totals()
    if args.question is not None:
        answer(streamer, enc, args.question, args.context, [], budget, totals)
        totals.report(model)
        return
    history, interactive = [], sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if question:
            reply = answer(streamer, enc, question, args.context, history, budget, totals)
            if not args.single_turn:
                history.append((question, reply))
    totals.report(model)


if __name__ == "__main__":
    run(PROG, main)
