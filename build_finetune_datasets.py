"""Apply the prompt template (utils/prompt_template.py) to prepared fine-tuning examples, tokenise
them with GPT-2's tokenizer and split them into train.jsonl / val.jsonl of
{"prompt_ids", "completion_ids"} + meta.json. Over-long examples lose the start of their prompt;
those whose completion alone is too long are dropped and counted. Preference pairs become
{"prompt_ids", "chosen_ids", "rejected_ids"} (meta.json "kind": "preference"), fitted the same way to the
longer answer."""
from utils.cli import add_output_flags, fraction, log, parser, run

PROG = "build_finetune_datasets.py"


def main(argv=None):
    p = parser(PROG, __doc__)
    p.add_argument("--input", required=True, metavar="DIR", help="directory of *.jsonl from prepare_data_finetune.py")
    add_output_flags(p)
    p.add_argument("--max_seq_len", type=int, default=1024,
                   help="most tokens of prompt + completion (the model's block_size; default: 1024)")
    p.add_argument("--val_fraction", type=fraction, default=0.05,
                   help="fraction of examples for val.jsonl (default: 0.05)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split (default: 1337)")
    args = p.parse_args(argv)

    from utils.data.finetune import build_finetune
    meta = build_finetune(args.input, args.output, max_seq_len=args.max_seq_len, val_fraction=args.val_fraction,
                          seed=args.seed, overwrite=args.overwrite, log=log)
    s = meta["splits"]
    what, answer = ("pairs", "an answer") if meta["kind"] == "preference" else ("examples", "completion")
    log(f"{PROG}: train {s['train']['examples']:,} {what}, val {s['val']['examples']:,} "
        f"(longest {max(s['train']['longest'], s['val']['longest'])} tokens); {meta['truncated']:,} truncated, "
        f"{sum(meta['dropped'].values()):,} dropped ({answer} longer than --max_seq_len), "
        f"{meta['bad_lines']:,} bad lines skipped")
    log(f"{PROG}: wrote train.jsonl, val.jsonl and meta.json to {args.output}")


if __name__ == "__main__":
    run(PROG, main)
