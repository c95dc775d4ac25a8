"""Per-rank memory of FSDP2 sharding: bytes of parameters, gradients and optimizer state held by
each rank at world size 1 and 2 (torchrun, gloo on CPU / nccl on GPU), for the 124M `gpt2` config.

    python bench/fsdp_memory.py                 # runs both world sizes and prints the table
    python bench/fsdp_memory.py --model_type gpt2-medium --world_sizes 1 2 4

Counts the local shards (DTensor.to_local()) after one real training step (forward, backward,
AdamW step), with the same FSDP wrapping and optimizer as the training loop (utils/). The step
accumulates 2 micro-batches, as training with gradient_accum_steps > 1 does; gradient bytes are
taken between them, where they peak: with the loop's default (reduce-scatter every micro-step)
each rank holds its shard; with --defer_grad_sync (reduce-scatter on the last micro-step only)
every rank holds full unsharded fp32 gradients.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def worker(args):
    """One rank: build, shard, take one step, report this rank's bytes (rank 0 prints all ranks)."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from models.gpt2 import GPT2Config, GPT2LMHeadModel
    from utils.training.distributed import cleanup_distributed, init_distributed
    from utils.training.optim import build_optimizer
    from utils.training.parallelize import gradient_bytes, local_bytes, parallelize

    info = init_distributed("auto")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset(args.model_type, pad_vocab_multiple=64)).to(info.device)
    parallelize(model, info, mixed_precision=args.mixed_precision)
    cfg = SimpleNamespace(weight_decay=0.1, max_lr=1e-4, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    optimizer = build_optimizer(model, cfg, info.device)
    x = torch.randint(0, 50257, (1, args.seq_len), device=info.device)
    grads = None
    for i in range(2):  # one step of 2 accumulated micro-batches
        model.set_requires_gradient_sync(i == 1 or not args.defer_grad_sync)
        _, loss = model(x, targets=x, reduction="sum", return_logits=False)
        loss.backward()
        grads = grads if grads is not None else gradient_bytes(model)  # between the micro-batches
    optimizer.step()
    row = {
        "params": sum(local_bytes(p) for p in model.parameters()),
        "grads": grads,
        "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    rows = [None] * info.world_size
    dist.all_gather_object(rows, row)
    if info.is_main:
        print("RESULT " + json.dumps({"world_size": info.world_size, "ranks": rows}))
    cleanup_distributed()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", default="gpt2")
    p.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--mixed_precision", action="store_true",
                   help="bf16 compute (memory of the fp32 masters is the same)")
    p.add_argument("--defer_grad_sync", action="store_true", help="reduce-scatter on the last micro-batch only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = {}
    for n in args.world_sizes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--model_type", args.model_type, "--seq_len", str(args.seq_len)]
        cmd += ["--mixed_precision"] if args.mixed_precision else []
        cmd += ["--defer_grad_sync"] if args.defer_grad_sync else []
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = next((out_line for out_line in out.stdout.splitlines() if out_line.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"world size {n} failed:\n{out.stderr[-3000:]}")
        results[n] = json.loads(line[len("RESULT "):])["ranks"]
    base = results[args.world_sizes[0]][0]
    mib = 2 ** 20
    sync = "on the last micro-batch only (--defer_grad_sync)" if args.defer_grad_sync else "every micro-batch"
    print(f"FSDP2 per-rank memory, {args.model_type}, 2 accumulated micro-batches, reduce-scatter {sync} "
          f"(MiB; gradients between the micro-batches; ratio = largest rank / world size {args.world_sizes[0]})")
    print("| world size | parameters | gradients | optimizer state | params + optimizer | ratio |")
    print("|---|---|---|---|---|---|")
    for n, ranks in results.items():
        worst = max(ranks, key=lambda r: r["params"] + r["optimizer"])
        ratio = (worst["params"] + worst["optimizer"]) / (base["params"] + base["optimizer"])
        print(f"| {n} | {worst['params'] / mib:.1f} | {worst['grads'] / mib:.1f} | {worst['optimizer'] / mib:.1f} | "
              f"{(worst['params'] + worst['optimizer']) / mib:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
