"""Serve a model over the OpenAI API, with a chat page: talk to it in a browser, or point any OpenAI client at it.

    python serve.py --checkpoint out/finetune/final                       # then open http://127.0.0.1:8000
    python serve.py --checkpoint checkpoints/gpt2 --lora out/lora/final --port 8080
    MINIGPT_API_KEY=secret python serve.py --checkpoint out/finetune/final --host 0.0.0.0

    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"messages": [{"role": "user", "content": "Who wrote Hamlet?"}]}'

Endpoints: POST /v1/chat/completions (messages -> the fine-tuning prompt template, multi-turn as the
dataset builder builds it; a system message is the context), POST /v1/completions (plain
continuation, for pretrained models), both streaming with "stream": true; GET /v1/models, /health;
the chat page at /. The sampling flags below are the defaults of a request that does not set its own
(temperature, top_p, top_k, repetition_penalty, max_tokens, seed). One request is generated at a
time; up to --max_queue more wait, and one more gets a 503. See docs/serving.md.
"""
import argparse
import os
import socket

from utils.cli import UsageError, log, run
from utils.generation.args import (
    add_decode_args,
    add_model_args,
    add_sampling_args,
    check_args,
    check_decode_args,
    check_model_dirs,
    prepare_decoder,
    resolve_dtype,
)
from utils.generation.loading import load_for_generation
from utils.hardware import resolve_device

PROG = "serve.py"
API_KEY_ENV = "MINIGPT_API_KEY"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--lora", metavar="DIR", help="a LoRA adapter (finetune_lora.py) to apply to --checkpoint in memory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="(default 8000; 0 = any free port)")
    p.add_argument("--api_key", metavar="KEY", default=os.environ.get(API_KEY_ENV),
                   help=f"require `Authorization: Bearer KEY` on every /v1 request (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--served_model_name", metavar="NAME",
                   help="the model's name in the API (default: the checkpoint directory's name)")
    p.add_argument("--max_queue", type=int, default=16, metavar="N",
                   help="requests that may wait while one is generated; one more gets a 503 (default 16)")
    add_sampling_args(p, max_new_tokens=256)
    add_decode_args(p)
    return p.parse_args(argv)


def check_serve_args(args):
    check_args(args)
    check_decode_args(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 0:
        raise UsageError(f"--max_queue must be >= 0, got {args.max_queue}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError(f"--api_key (or ${API_KEY_ENV}) is empty; give a key or leave it unset")


def load_model(args):
    """The model to serve, ready to decode, and its device (the one place the server loads it)."""
    device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device)
    model = load_for_generation(args.checkpoint, lora=args.lora, device=device, dtype=args.dtype)
    return prepare_decoder(model, args), device


def listen(host, port) -> socket.socket:
    """Bind before loading anything slow, so that a port in use is a one-line error at once."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}; "
                         "choose another --port or --host") from None
    sock.listen(128)
    return sock


def server_config(args, model):
    from utils.serving.app import ServerConfig
    from utils.serving.queue import Sampling
    defaults = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, dtype=args.dtype, speculate=args.speculate)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    return ServerConfig(model_name=name, block_size=model.config.block_size, defaults=defaults,
                        api_key=args.api_key, max_queue=args.max_queue)


def main(argv=None):
    args = parse_args(argv)
    check_serve_args(args)
    check_model_dirs(args)  # every input checked before the first line is printed
    sock = listen(args.host, args.port)
    model, device = load_model(args)
    import uvicorn

    from utils.serving.app import serving
    config = server_config(args, model)
    host, port = sock.getsockname()[:2]
    with serving(model, device, config) as app:
        log(f"serving {config.model_name!r} on http://{host}:{port} (chat page at /, OpenAI API at /v1"
            f"{', key required' if args.api_key else ''}); Ctrl+C stops")
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=2)).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down on Ctrl+C, then raises it again: a normal end here
            pass
    log(f"{PROG}: stopped")


if __name__ == "__main__":
    run(PROG, main)
