"""Collect fine-tuning examples from .json/.jsonl/.yml files in the common shapes (prompt/completion,
Alpaca instruction/input/output, question/answer[/context] and SQuAD, multi-turn dialogues incl.
chatterbot-corpus YAML) into examples.jsonl of {"prompt", "completion"[, "context"][, "history"]}
+ report.json. Preference pairs (prompt/chosen/rejected, Anthropic HH-RLHF transcripts, UltraFeedback message
lists) become {"prompt", "chosen", "rejected"[, "context"][, "history"]} lines, for finetune_dpo.py.
Next step: build_finetune_datasets.py."""
from utils.cli import add_output_flags, log, parser, run

PROG = "prepare_data_finetune.py"


def main(argv=None):
    p = parser(PROG, __doc__)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files or directories (searched recursively) of .json, .jsonl, .yml/.yaml; .gz/.bz2 too")
    add_output_flags(p)
    args = p.parse_args(argv)

    from utils.data.finetune import prepare_finetune
    r = prepare_finetune(args.input, args.output, overwrite=args.overwrite, log=log)
    d = r["dropped"]
    what = "preference pairs" if r["kind"] == "preference" else "examples"
    equal = f", {d['equal_answers']:,} pairs with equal answers" if d["equal_answers"] else ""
    log(f"{PROG}: {r['files_read']} file(s) read, {len(r['files_skipped'])} skipped; {r['records']:,} records -> "
        f"{r['examples_out']:,} {what} (dropped {d['empty']:,} empty, {d['duplicate']:,} duplicates, "
        f"{d['unanswered_turns']:,} unanswered turns{equal}; {r['bad_lines']:,} bad records skipped)")
    log(f"{PROG}: wrote examples.jsonl and report.json to {args.output}")


if __name__ == "__main__":
    run(PROG, main)
