"""Convert between HF transformers GPT-2 and miniGPT model checkpoints.

Import (OpenAI's GPT-2, or any transformers GPT-2 saved with save_pretrained):
    python convert_hf_checkpoint.py --hf_model gpt2-xl --output checkpoints/gpt2-xl   # needs internet or the HF cache
    python convert_hf_checkpoint.py --hf_dir path/to/save_pretrained_dir --output checkpoints/mine
Export (a dir that transformers.from_pretrained / AutoTokenizer / pipeline load offline):
    python convert_hf_checkpoint.py --to_hf --checkpoint checkpoints/mine --output hf/mine
"""
import argparse
import sys

from utils.checkpoints.hf import HUB_MODELS, export_to_hf, import_hf_dir, import_hf_model
from utils.cli import run

PROG = "convert_hf_checkpoint.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf_model", metavar="NAME", help=f"import by hub name: {', '.join(HUB_MODELS)}")
    src.add_argument("--hf_dir", metavar="DIR", help="import a local transformers save_pretrained directory")
    src.add_argument("--to_hf", action="store_true", help="export --checkpoint to a transformers directory")
    p.add_argument("--checkpoint", metavar="DIR", help="miniGPT model checkpoint to export (with --to_hf)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write (atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it is an earlier output of this kind (never another directory)")
    p.add_argument("--pad_vocab_multiple", type=int, default=64, metavar="N",
                   help="import: round the embedding rows up to a multiple of N (default 64: 50304 rows, faster "
                        "matmuls; the padding is never sampled and is dropped again on export; 1 = none)")
    args = p.parse_args(argv)
    if args.to_hf and not args.checkpoint:
        p.error("--to_hf needs --checkpoint DIR")
    if args.checkpoint and not args.to_hf:
        p.error("--checkpoint is the export source; add --to_hf (imports take --hf_model or --hf_dir)")
    if args.pad_vocab_multiple < 1:
        p.error(f"--pad_vocab_multiple must be >= 1, got {args.pad_vocab_multiple}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.to_hf:
        export_to_hf(args.checkpoint, args.output, overwrite=args.overwrite)
        print(f"exported {args.checkpoint} -> {args.output} (transformers GPT-2, with tokenizer)", file=sys.stderr)
    elif args.hf_dir:
        import_hf_dir(args.hf_dir, args.output, args.pad_vocab_multiple, overwrite=args.overwrite)
        print(f"imported {args.hf_dir} -> {args.output}", file=sys.stderr)
    else:
        import_hf_model(args.hf_model, args.output, args.pad_vocab_multiple, overwrite=args.overwrite)
        print(f"imported {args.hf_model} -> {args.output}", file=sys.stderr)


if __name__ == "__main__":
    run(PROG, main)
