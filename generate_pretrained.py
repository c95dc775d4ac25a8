"""Continue text with a (pre)trained model checkpoint, streaming tokens to stdout as they come.

    python generate_pretrained.py --checkpoint checkpoints/gpt2 --prompt "The meaning of life is"
    python generate_pretrained.py --checkpoint out/final --prompt "ROMEO:" --prompt "JULIET:" --seed 1
    # unconditional, greedy
    python generate_pretrained.py --checkpoint out/final --prompt "<|endoftext|>" --temperature 0

Each prompt is echoed, then its continuation; generation stops at <|endoftext|> (unless
--ignore_eot) or after --max_new_tokens. A summary line per prompt (prompt tokens, new tokens,
tokens/s, seed) goes to stderr. A prompt that leaves no room for --max_new_tokens in the context is
left-truncated (kept: its last block_size - max_new_tokens tokens, at least half the context).
"""
import argparse

from utils.cli import UsageError, run
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
from utils.generation.streaming import Streamer, Totals, emit, prompt_budget, setup_stdout, summary, truncate_left
from utils.hardware import resolve_device
from utils.tokenizer import EOT_TOKEN, get_tokenizer

PROG = "generate_pretrained.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="text to continue (repeatable); '<|endoftext|>' is the end-of-text token")
    p.add_argument("--prompt_file", action="append", default=[], metavar="PATH",
                   help="a file whose whole text is one prompt (repeatable; '-' = stdin)")
    add_sampling_args(p, max_new_tokens=200)
    add_decode_args(p)
    p.add_argument("--ignore_eot", action="store_true", help="keep going past <|endoftext|> instead of stopping there")
    return p.parse_args(argv)


def read_prompts(args):
    prompts = list(args.prompt)
    for path in args.prompt_file:
        if path == "-":
            import sys
            prompts.append(sys.stdin.read())
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                prompts.append(f.read())
    if not prompts:
        raise UsageError("no prompt: give --prompt TEXT or --prompt_file PATH "
                         "('<|endoftext|>' for unconditional samples)")
    for i, text in enumerate(prompts):
        if text == "":
            raise UsageError(f"prompt {i + 1} is empty; give some text (or '<|endoftext|>' for unconditional samples)")
    return prompts


def main(argv=None):
    setup_stdout()
    args = parse_args(argv)
    check_args(args)
    check_decode_args(args)
    prompts = read_prompts(args)
    device = resolve_device(args.device)
    check_model_dirs(args)  # every input checked before the first line is printed
    args.dtype = resolve_dtype(args.dtype, device)
    model = load_for_generation(args.checkpoint, device=device, dtype=args.dtype)
    model = prepare_decoder(model, args)
    enc = get_tokenizer()
    streamer = Streamer(model, args, device, stop_tokens=() if args.ignore_eot else (EOT_TOKEN,))
    budget = prompt_budget(model.config.block_size, args.max_new_tokens)
    totals = Totals()
    for i, text in enumerate(prompts):
        if i:
            emit("\n" + "-" * 40 + "\n")
        label = f"prompt {i + 1}/{len(prompts)}: " if len(prompts) > 1 else ""
        ids = truncate_left(enc.encode(text, allowed_special={"<|endoftext|>"}), budget, what=label or "the prompt")
        emit(enc.decode(ids))
        result = streamer.run(ids, on_text=emit)
        emit("\n")
        summary(result, label)
        totals.add(result)
    totals.report(model)


if __name__ == "__main__":
    run(PROG, main)
