"""The generation scripts' shared flags: checkpoint, device, dtype and sampling, checked before loading."""
import argparse

import torch

from models.sampling import check_sampling_args
from utils.cli import UsageError, log
from utils.hardware import choose_bf16


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="model checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="bfloat16: weights in bf16 (half the memory) under bf16 autocast; float32: exact; "
                        "auto (default): bfloat16 where bf16 matmuls are fast (CUDA, CPUs with bf16 units), "
                        "else float32")


def check_model_dirs(args):
    """--checkpoint holds a model and --lora (if any) an adapter, checked before anything is printed or loaded."""
    from utils.checkpoints.model import check_model_dir
    check_model_dir(args.checkpoint)
    if getattr(args, "lora", None) is not None:
        from utils.checkpoints.adapter import load_adapter_config
        load_adapter_config(args.lora)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """--dtype auto -> float32 or bfloat16 by what this device does fast; says which on stderr."""
    if dtype != "auto":
        return dtype
    bf16, why = choose_bf16("auto", device, "--dtype")
    log(f"{'bfloat16' if bf16 else 'float32'} ({why})")
    return "bfloat16" if bf16 else "float32"


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int):
    p.add_argument("--max_new_tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"(default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default 0.8)")
    p.add_argument("--top_k", type=int, default=200, metavar="K",
                   help="sample from the K most likely tokens; 0 = no limit (default 200)")
    p.add_argument("--top_p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling, in (0, 1]; 1 = off (default)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, metavar="R",
                   help="> 1 discourages repeats; 1 = off (default)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="makes sampling reproducible (each prompt gives what it gives alone with this seed); "
                        "without it a random seed is drawn and reported")


def check_args(args):
    """Validate the sampling flags before anything is loaded; UsageError (one line) otherwise."""
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (0 = no limit), got {args.top_k}")
    top_k = args.top_k or None
    try:
        check_sampling_args(args.temperature, top_k, args.top_p, args.repetition_penalty)
    except ValueError as e:
        raise UsageError(str(e).replace("temperature ", "--temperature ").replace("top_k ", "--top_k ")
                         .replace("top_p ", "--top_p ")
                         .replace("repetition_penalty ", "--repetition_penalty ")) from None
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
