"""Clean raw text for pretraining: .txt/.json/.jsonl files (wikiextractor output too) -> cleaned
JSON Lines shards (`{"text": ...}` a line) + report.json. Next step: build_pretrain_datasets.py."""
import time

from utils.cli import add_output_flags, dir_size, human_bytes, log, non_negative_int, parser, run
from utils.hardware import available_cpus

PROG = "prepare_data_pretrain.py"


def main(argv=None):
    p = parser(PROG, __doc__)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files or directories (searched recursively) of .txt, .json, .jsonl, "
                        "wikiextractor wiki_NN; .gz/.bz2 too")
    add_output_flags(p)
    p.add_argument("--num_workers", type=non_negative_int, default=available_cpus(),
                   help="parallel processes, one input file each (default: all CPUs; 0 or 1: this process)")
    p.add_argument("--split_paragraphs", action="store_true",
                   help=".txt files: every block between blank lines is a document (default: a file is a document)")
    p.add_argument("--min_chars", type=non_negative_int, default=0,
                   help="drop documents shorter than this after cleaning")
    p.add_argument("--text_field", default="text", help="JSON field holding the document text (default: text)")
    p.add_argument("--shard_mb", type=float, default=256.0, help="size of each output shard in MB (default: 256)")
    args = p.parse_args(argv)

    from utils.data.prepare_pretrain import PrepareOptions, prepare_pretrain
    t0 = time.time()
    opts = PrepareOptions(split_paragraphs=args.split_paragraphs, min_chars=args.min_chars,
                          text_field=args.text_field, shard_mb=args.shard_mb)
    r = prepare_pretrain(args.input, args.output, opts, num_workers=args.num_workers,
                         overwrite=args.overwrite, log=log)
    d = r["dropped"]
    log(f"{PROG}: {r['files_read']} file(s) read, {len(r['files_skipped'])} skipped; "
        f"{r['documents_in']:,} documents in -> {r['documents_out']:,} out "
        f"(dropped {d['empty']:,} empty, {d['too_short']:,} too short, {d['duplicate']:,} duplicates; "
        f"{r['bad_lines']:,} bad lines skipped; {r['changed_by_cleaning']:,} changed by cleaning)")
    log(f"{PROG}: wrote {len(r['outputs'])} shard(s), {human_bytes(dir_size(args.output))}, and report.json "
        f"to {args.output} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run(PROG, main)
