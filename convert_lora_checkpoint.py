r"""Merge a LoRA adapter into its base model, or export it for HF PEFT.

    python convert_lora_checkpoint.py --base checkpoints/gpt2 --lora checkpoints/finetune_lora/final \
        --output checkpoints/merged
    python convert_lora_checkpoint.py --lora checkpoints/finetune_lora/final --to_peft --output exports/peft_adapter

r, alpha and the targets come from the adapter's own adapter_config.json; a base model other than
the one the adapter was trained on (other shapes or other weights) is refused.
"""
import argparse

from utils.checkpoints.adapter import PEFT_MARK, export_peft, merge_adapter
from utils.checkpoints.model import MARK as MODEL_MARK
from utils.checkpoints.model import save_model
from utils.cli import run
from utils.files import check_output

PROG = "convert_lora_checkpoint.py"


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base model checkpoint dir (the adapter's pretrained_ckpt); needed to merge")
    p.add_argument("--lora", required=True, help="adapter dir written by finetune_lora.py")
    p.add_argument("--output", required=True, help="merged model checkpoint dir (or PEFT adapter dir with --to_peft)")
    p.add_argument("--to_peft", action="store_true", help="export the adapter in HF PEFT's layout instead of merging")
    p.add_argument("--skip_fingerprint", action="store_true",
                   help="merge even if the base weights differ from the adapter's recorded base "
                        "(shapes are still checked)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it is an earlier output of this kind (never another directory)")
    args = p.parse_args(argv)
    check_output(args.output, args.overwrite, PEFT_MARK if args.to_peft else MODEL_MARK, [args.base, args.lora])
    if args.to_peft:
        export_peft(args.lora, args.output, overwrite=args.overwrite)
        print(f"PEFT adapter written to {args.output}")
        return
    if not args.base:
        p.error("--base is required to merge (or pass --to_peft)")
    merged, config = merge_adapter(args.base, args.lora, check_fingerprint=not args.skip_fingerprint)
    save_model(merged, args.output, overwrite=args.overwrite)
    print(f"merged adapter (r={config['r']}, alpha={config['alpha']}, targets={','.join(config['targets'])}) "
          f"into {args.base} -> {args.output}")


if __name__ == "__main__":
    run(PROG, main)
