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


def add_decode_args(p: argparse.ArgumentParser):
    p.add_argument("--quantize", default="none", choices=("none", "int8"),
                   help="int8: int8 Linear layers and LM head, one scale per output channel; on x86 CPUs the "
                        "products run in int8 (each activation row quantised alone); docs/decoding.md")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder over a static KV cache (first call compiles: tens of seconds "
                        "on CPU, see docs/decoding.md); CUDA graphs on GPU")
    p.add_argument("--speculate", default="none", choices=("none", "lookup"),
                   help="lookup: draft tokens by prompt lookup (n-gram match in the prompt and answer so far) and "
                        "check them in one forward; greedy only (--temperature 0), same tokens as without it")


def check_decode_args(args):
    if args.speculate != "none" and (args.temperature != 0 or args.repetition_penalty != 1.0):
        raise UsageError(f"--speculate {args.speculate} gives exactly greedy decoding's tokens: it needs "
                         f"--temperature 0 and no --repetition_penalty (got --temperature {args.temperature:g}, "
                         f"--repetition_penalty {args.repetition_penalty:g})")


def prepare_decoder(model, args):
    """prepare_for_decode with the scripts' flags; says each choice on its own line (stderr)."""
    from utils.generation.loading import prepare_for_decode
    from utils.generation.quantize import KERNELS, default_kernel
    device = model.transformer.wte.weight.device
    if args.quantize == "int8":
        log(f"quantize: int8, per-output-channel scales ({KERNELS[default_kernel(device)]})")
    else:
        log(f"quantize: none ({args.dtype} weights)")
    log("compile: torch.compile over a static KV cache" + (" with CUDA graphs" if device.type == "cuda" else "")
        + " (the first generation compiles)" if args.compile else "compile: off (eager)")
    log("speculate: prompt lookup (n-gram drafts, up to 8 tokens per check)" if args.speculate == "lookup"
        else "speculate: none")
    if args.quantize == "none" and not args.compile and args.speculate == "none":
        return model  # the plain decoder (growing KV cache), as before these flags
    return prepare_for_decode(model, quantize=args.quantize, compile=args.compile, speculate=args.speculate)
