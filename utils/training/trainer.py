"""The one training loop behind pretrain.py, finetune.py and finetune_lora.py.

A script describes its run as a TrainTask (how to build the model, the data loaders, what to save
at the end); `train()` does the rest: process group, FSDP2, AdamW, LR schedule, gradient
accumulation, evaluation, logging, checkpoints, resume, and stopping cleanly.
"""
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from models.loss import IGNORE_INDEX
from utils.checkpoints.training import TrainingCheckpointer, gather_model_state_dict
from utils.errors import UserError
from utils.evaluation.run import evaluate_in_loop, load_eval_tasks
from utils.hardware import choose_bf16, peak_flops
from utils.training.distributed import DistInfo, all_reduce_sum, distributed_run
from utils.training.metrics import RunLog, mfu, model_flops_per_token
from utils.training.optim import build_optimizer, lr_at
from utils.training.parallelize import parallelize


class TrainingError(UserError, RuntimeError):
    """A problem the user can fix (bad data path, config, existing run); printed as one line."""


@dataclass
class TrainTask:
    name: str                                    # for messages: "pretrain", "finetune", ...
    build_model: Callable[[], torch.nn.Module]   # plain model with weights, trainable params requires_grad
    make_loader: Callable[[str, DistInfo], object]  # (split, info) -> loader with next_batch()/state_dict()
    save_final: Callable[[dict, torch.nn.Module, str], None]  # (full state dict, model, dir), on rank 0
    total_steps: Callable[[object], int] | None = None  # from the train loader (fine-tuning by epochs)
    ignore_frozen_params: bool = False           # LoRA: checkpoints hold only the trainable parameters
    extra_state: dict = field(default_factory=dict)  # recorded in every checkpoint's trainer_state.json


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit. A second signal aborts."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg, task: TrainTask, prog=None):
    """Run the task under torchrun (or as one process). Returns a summary dict on every rank.

    Errors the user can fix end the process with a one-line message (exit code 2).
    """
    with distributed_run(cfg.device, prog=prog or task.name, cpu_threads=cfg.cpu_threads) as info:
        # Before the model is built, so that a run that cannot start is refused at once: a ckpt_dir in use
        # or holding another run, an unreadable or foreign checkpoint, a log_dir with another run's logs.
        with TrainingCheckpointer(cfg, info, task.name, task.extra_state, task.ignore_frozen_params) as checkpointer, \
                RunLog(cfg.log_dir, info, checkpointer.resume_step, resuming=bool(cfg.resume)) as run_log:
            return _train(cfg, task, info, checkpointer, run_log)


def _train(cfg, task, info, checkpointer, run_log):
    cfg.resolve_batch(info.world_size)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = task.build_model()
    if cfg.max_seq_length > model.config.block_size:
        raise TrainingError(f"--max_seq_length={cfg.max_seq_length} exceeds the model's block_size {model.config.block_size}")
    train_loader = task.make_loader("train", info)
    eval_sets = load_eval_tasks(cfg.eval_tasks)  # downstream tasks (eval_tasks), read now
    max_steps = task.total_steps(train_loader) if task.total_steps else cfg.max_train_iters
    if checkpointer.finished(max_steps):
        _print(info, f"{cfg.ckpt_dir} holds a finished run (step {checkpointer.resume_step} of {max_steps}; model in "
                     f"{checkpointer.final_dir}): nothing to do. To train on, raise --max_train_iters or --num_epochs")
        return {"memory": None, "steps": checkpointer.resume_step, "max_steps": max_steps, "history": [], "eval": None,
                "checkpoint": checkpointer.resume_path, "stopped_early": False, "final": checkpointer.final_dir}
    decay_steps = cfg.max_decay_steps or max_steps
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_config = model.config

    bf16, why = choose_bf16(cfg.mixed_precision, info.device, "--mixed_precision")
    _print(info, f"precision: {'bf16 compute, fp32 master weights' if bf16 else 'fp32'} ({why})")
    model.to(info.device)
    parallelize(model, info, mixed_precision=bf16, activation_checkpointing=cfg.activation_checkpointing,
                compile_model=cfg.compile_model, cpu_offload=cfg.cpu_offload)
    torch.manual_seed(cfg.seed + info.rank)  # dropout differs between ranks
    optimizer = build_optimizer(model, cfg, info.device)

    step = checkpointer.load(model, optimizer, train_loader)  # 0 for a fresh run; else everything restored
    start_step, memory = step, None
    global_batch = cfg.micro_batch_size * cfg.gradient_accum_steps * info.world_size
    _print(info, f"{task.name}: {n_params / 1e6:.1f}M parameters ({n_trainable / 1e6:.2f}M trainable), world size "
                 f"{info.world_size} ({info.device.type}/{info.backend}), global batch {global_batch} x {cfg.max_seq_length} "
                 f"tokens, steps {step} -> {max_steps}, TensorBoard: {cfg.log_dir}")

    flops_tok = model_flops_per_token(model_config, cfg.max_seq_length)
    peak = peak_flops(info.device, torch.bfloat16 if bf16 else torch.float32)  # measured, per rank
    history, last_eval, saved = [], None, None
    # Redirected to a file, a bar redraws into the log: keep it to a line every 30 s there.
    bar = tqdm(total=max_steps, initial=step, disable=not info.is_main, desc=task.name, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    model.train()
    with StopRequest() as stop:
        while step < max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.init_lr, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, decay_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [train_loader.next_batch() for _ in range(cfg.gradient_accum_steps)]
            local_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
            # One collective gives the window's target-token count and whether any rank was signalled.
            n_tokens, n_stop = all_reduce_sum([local_tokens, float(stop.requested)], info)
            loss_sum = torch.zeros((), device=info.device)
            for i, (x, y) in enumerate(batches):
                model.set_requires_gradient_sync(i == len(batches) - 1)  # reduce-scatter once per step
                x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
                _, loss = model(x, targets=y, reduction="sum", return_logits=False)
                # Normalise by the target tokens of the whole window on all ranks; FSDP averages
                # gradients over ranks, so scale by world size to make that average a sum.
                (loss * (info.world_size / max(n_tokens, 1))).backward()
                loss_sum += loss.detach().float()
            if info.world_size > 1:
                dist.all_reduce(loss_sum)
            train_loss = loss_sum.item() / max(n_tokens, 1)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm, foreach=True)
            grad_norm = grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else grad_norm.item()
            # A finite loss can still come with an inf/nan gradient: that step would poison the weights and every
            # checkpoint after it. Stop before the optimizer step, with the last good checkpoint untouched.
            for what, value in (("loss", train_loss), ("gradient norm", grad_norm)):
                if not math.isfinite(value):
                    last = checkpointer.latest() or "none"
                    raise TrainingError(f"{what} is {value} at step {step + 1}: training diverged. Nothing was saved "
                                        f"for this step; the last good checkpoint is {last}. Lower --max_lr, raise "
                                        "--warmup_steps or check the data, then --resume=auto")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            tokens_per_sec = n_tokens / dt
            record = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                      "mfu": mfu(tokens_per_sec / info.world_size, flops_tok, peak)}
            history.append(record)
            if step == start_step + 1:
                memory = record["memory"] = sharded_bytes(model, optimizer, info)
                _print(info, "per-rank memory: parameters " + ", ".join(f"{b / 2**20:.1f}" for b in memory["params"])
                       + " MiB; optimizer state " + ", ".join(f"{b / 2**20:.1f}" for b in memory["optimizer"]) + " MiB")
            run_log.train(record)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
            if info.is_main and (step % cfg.log_interval == 0 or step == max_steps):
                bar.write(f"step {step}/{max_steps} | loss {train_loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                          f"{tokens_per_sec:,.0f} tok/s | MFU {record['mfu']:.1%}")
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == max_steps:
                last_eval = evaluate(model, task, cfg, info)
                downstream = evaluate_in_loop(model, eval_sets, cfg.micro_batch_size, info.device)
                last_eval.update(downstream)  # eval/<task>_<metric> beside eval/loss
                run_log.eval(step, last_eval)
                if info.is_main:
                    bar.write(f"step {step} | eval loss {last_eval['loss']:.4f} | "
                              f"perplexity {last_eval['perplexity']:.2f}" + "".join(f" | {k} {v:.4f}" for k, v in downstream.items()))
            stopping = n_stop > 0
            if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == max_steps or stopping:
                saved = checkpointer.save(step)
            if stopping:
                break
    bar.close()
    summary = {"memory": memory, "steps": step, "max_steps": max_steps, "history": history, "eval": last_eval, "checkpoint": saved,
               "stopped_early": step < max_steps}
    if step < max_steps:
        _print(info, f"stopped by signal at step {step}; checkpoint saved in {saved}; continue with --resume=auto")
        return summary
    # The final model: gathered to full tensors on rank 0 and written in the model-checkpoint format.
    full = gather_model_state_dict(model, task.ignore_frozen_params)
    final_dir = os.path.join(cfg.ckpt_dir, "final")
    if info.is_main:
        task.save_final(full, model, final_dir)
    dist.barrier()
    summary["final"] = final_dir
    _print(info, f"done: {step} steps" + (f", final train loss {history[-1]['loss']:.4f}" if history else "")
                 + (f", eval loss {last_eval['loss']:.4f} (perplexity {last_eval['perplexity']:.2f})" if last_eval else "")
                 + f"; model saved to {final_dir}")
    return summary


@torch.no_grad()
def evaluate(model, task, cfg, info):
    """Mean loss over every target token of `eval_iters` validation micro-batches per rank."""
    model.eval()
    loader = task.make_loader("val", info)  # a fresh loader: every evaluation sees the same batches
    loss_sum = torch.zeros((), device=info.device, dtype=torch.float64)
    tokens = 0
    for _ in range(cfg.eval_iters):
        x, y = loader.next_batch()
        _, loss = model(x.to(info.device), targets=y.to(info.device), reduction="sum", return_logits=False)
        loss_sum += loss.double()
        tokens += int((y != IGNORE_INDEX).sum())
    total, n = all_reduce_sum([loss_sum.item(), tokens], info)
    model.train()
    mean = total / max(n, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700)), "tokens": int(n)}


def sharded_bytes(model, optimizer, info):
    """Bytes of parameters and optimizer state held by each rank (local shards only), gathered."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    params = sum(local(p) for p in model.parameters())
    optim = sum(local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, (params, optim))
    return {"params": [g[0] for g in gathered], "optimizer": [g[1] for g in gathered]}


def _print(info, msg):
    if info.is_main:
        tqdm.write(msg)

