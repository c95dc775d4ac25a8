"""Host memory each rank needs to start training: the peak resident memory a rank gains while its
model is built, sharded and given its weights, for the training loop's meta-device init
(utils/training/trainer.py::build_model: only rank 0 materialises the model, on the CPU, and sends each
rank its shards; a single process shards the model it built) against the way before it (every rank
builds the whole fp32 model, then shards it).

    python bench/startup_memory.py                          # gpt2 (124M) at world size 2
    python bench/startup_memory.py --model_type gpt2-medium --world_size 4

Each mode runs in its own torchrun launch (gloo on CPU / nccl on GPU), so their peaks cannot mix.
On a GPU the figures are still host memory: the CPU copy is what an 8-GPU node multiplies by 8.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def worker(args):
    """One rank: build the model one way, report resident memory before and the peak after (rank 0 prints)."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from models.gpt2 import GPT2Config, GPT2LMHeadModel
    from utils.training.distributed import cleanup_distributed, init_distributed
    from utils.training.parallelize import local_bytes, parallelize
    from utils.training.trainer import TrainTask, build_model

    info = init_distributed("auto")
    config = GPT2Config.from_preset(args.model_type, pad_vocab_multiple=64)
    dist.barrier()
    before = rss_bytes()
    if args.mode == "meta":
        def model_on(device):
            with torch.device(device):
                return GPT2LMHeadModel(config)
        task = TrainTask("bench", model_config=lambda: config, build_model=model_on, make_loader=None,
                         save_final=None, check_data=None)
        cfg = SimpleNamespace(mixed_precision=False, seed=0, activation_checkpointing=False, compile_model=False,
                              cpu_offload=False, weight_decay=0.1, max_lr=1e-4, adamw_betas=(0.9, 0.95),
                              adamw_eps=1e-8)
        model, _, _ = build_model(cfg, task, info)
    else:  # every rank: the whole model with its init, then sharded
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        parallelize(model, info)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shard = sum(local_bytes(p) for p in model.parameters())
    rows = [None] * info.world_size
    dist.all_gather_object(rows, {"rank": info.rank, "before": before, "peak": peak, "shard": shard,
                                  "full": sum(p.numel() * 4 for p in model.parameters())})
    if info.is_main:
        print("RESULT " + json.dumps(rows))
    cleanup_distributed()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", default="gpt2")
    p.add_argument("--world_size", type=int, default=2)
    p.add_argument("--mode", choices=["meta", "full_copy"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return worker(args)
    results = {}
    for mode in ("meta", "full_copy"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world_size}",
               __file__, "--mode", mode, "--model_type", args.model_type]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(line[len("RESULT "):])
    mib = 2 ** 20
    full = results["meta"][0]["full"]
    print(f"Start-up host memory, {args.model_type} ({full / mib:.1f} MiB of fp32 weights), world size "
          f"{args.world_size}: peak resident memory gained while building the model (MiB)")
    print("| init | " + " | ".join(f"rank {r}" for r in range(args.world_size)) + " | shard held after |")
    print("|---|" + "---|" * args.world_size + "---|")
    names = {"meta": "the loop's: meta device, rank 0 broadcasts (1 rank: shards its model)",
             "full_copy": "every rank builds the whole model"}
    for mode, rows in results.items():
        print(f"| {names[mode]} | " + " | ".join(f"{(r['peak'] - r['before']) / mib:.0f}" for r in rows)
              + f" | {rows[0]['shard'] / mib:.1f} |")


if __name__ == "__main__":
    main()
