"""Tokenise cleaned pretraining text (the JSON Lines written by prepare_data_pretrain.py) with
GPT-2's tokenizer into train.bin / val.bin (flat uint16, <|endoftext|> after every document) and
meta.json. The validation split takes whole documents, drawn with --seed."""
import time

from utils.cli import add_output_flags, fraction, human_bytes, log, non_negative_int, parser, run
from utils.hardware import available_cpus

PROG = "build_pretrain_datasets.py"


def main(argv=None):
    p = parser(PROG, __doc__)
    p.add_argument("--input", required=True, metavar="DIR",
                   help="directory of cleaned *.jsonl shards (prepare_data_pretrain.py output)")
    add_output_flags(p)
    p.add_argument("--val_fraction", type=fraction, default=0.0005,
                   help="fraction of documents for val.bin (default: 0.0005)")
    p.add_argument("--num_workers", type=non_negative_int, default=available_cpus(),
                   help="tokenizer processes (default: all CPUs; 0 or 1: this process); "
                        "output is the same for any value")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split (default: 1337)")
    p.add_argument("--text_field", default="text", help="JSON field holding the text (default: text)")
    args = p.parse_args(argv)

    from utils.data.build_pretrain import build_pretrain
    t0 = time.time()
    meta = build_pretrain(args.input, args.output, val_fraction=args.val_fraction, seed=args.seed,
                          num_workers=args.num_workers, overwrite=args.overwrite, text_field=args.text_field, log=log)
    seconds = time.time() - t0
    s = meta["splits"]
    total = s["train"]["tokens"] + s["val"]["tokens"]
    log(f"{PROG}: train.bin {s['train']['tokens']:,} tokens / {s['train']['documents']:,} documents, "
        f"val.bin {s['val']['tokens']:,} tokens / {s['val']['documents']:,} documents "
        f"({meta['bad_lines']:,} bad lines skipped)")
    log(f"{PROG}: wrote {human_bytes(2 * total)} to {args.output} in {seconds:.1f} s "
        f"({total / max(seconds, 1e-9):,.0f} tokens/s)")


if __name__ == "__main__":
    run(PROG, main)
