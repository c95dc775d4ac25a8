"""The one training loop behind pretrain.py, finetune.py and finetune_lora.py.

A script describes its run as a TrainTask (the model, the data, what to save at the end); `train()`
does the rest: process group, FSDP2, AdamW, LR schedule, gradient accumulation, evaluation, logging,
checkpoints, resume, and stopping cleanly. The loop itself reads like nanoGPT's:

    every step: LR from the schedule -> train_step (one optimizer step over the accumulation window)
                -> log -> save a checkpoint when due -> evaluate when due

A checkpoint is saved before evaluating, so a failing evaluation never costs the step. Ctrl-C / SIGTERM
is checked before every micro-step: the unfinished window is dropped and the last completed step is
saved, so stopping costs at most one micro-step plus a save (torchrun allows 30 s before SIGKILL).
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

from custom_dataset import EmptySplitError
from models.loss import IGNORE_INDEX
from utils.checkpoints.training import TrainingCheckpointer, gather_model_state_dict, keep_global_batch
from utils.errors import UserError
from utils.evaluation.run import evaluate_in_loop, load_eval_tasks
from utils.hardware import choose_bf16, peak_flops
from utils.training.distributed import DistInfo, all_reduce_sum, distributed_run
from utils.training.metrics import RunLog, mfu, model_flops_per_token
from utils.training.optim import build_optimizer, lr_at
from utils.training.parallelize import gradient_bytes, local_bytes, materialize, offloads, parallelize


class TrainingError(UserError, RuntimeError):
    """A problem the user can fix (bad data path, config, existing run); printed as one line."""


@dataclass
class TrainTask:
    name: str                                    # for messages: "pretrain", "finetune", ...
    model_config: Callable[[], object]           # its GPT2Config, cheaply (a preset, a checkpoint's config.json)
    # (device) -> plain model, trainable params requires_grad: with its weights on "cpu"; on "meta", the same
    # modules without any (a checkpoint's header is still checked): see build_model below
    build_model: Callable[[str], torch.nn.Module]
    make_loader: Callable[[str, DistInfo], object]  # (split, info) -> loader with next_batch()/state_dict()/len()
    save_final: Callable[[dict, torch.nn.Module, str], None]  # (full state dict, model, dir), on rank 0
    check_data: Callable[[], int | None]         # raises if the data is missing; the longest sequence it was built for
    total_steps: Callable[[object], int] | None = None  # from the train loader (fine-tuning by epochs)
    padded: bool = False                         # batches are padded to their longest row: their length varies
    ignore_frozen_params: bool = False           # LoRA: checkpoints hold only the trainable parameters
    extra_state: dict = field(default_factory=dict)  # recorded in every checkpoint's trainer_state.json
    # A task with its own objective (DPO): (model, batch) -> (loss summed over the batch's units, {metric: sum});
    # `units(batch)` counts those units (the loss and metrics are divided by the window's total on all ranks).
    # None: the language-model loss summed over target tokens.
    loss: Callable | None = None
    units: Callable | None = None
    evaluate: Callable | None = None             # (model, loader, start_state, cfg, info) -> {metric: value}
    prepare: Callable | None = None              # (model, {"train"/"val": loader}, step, info), before step 1


class StopRequest:
    """Ctrl-C / SIGTERM: drop the unfinished step, save a checkpoint, exit 0. A second signal aborts."""

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


def fit_seq_length(requested, block_size, data_limit=None):
    """--max_seq_length: an explicit value must fit the model; 0 (the default) takes as much as the model
    allows and, for fine-tuning, no more than the data was built for."""
    if requested > block_size:
        raise TrainingError(f"--max_seq_length={requested} exceeds the model's block_size {block_size}; "
                            f"leave it unset to train at {block_size}")
    if requested:
        return requested
    return min(block_size, data_limit) if data_limit else block_size


def fit_warmup(cfg, max_steps, info):
    """(warmup, decay) steps of the LR schedule. A warmup that would not end within the run (or before the
    decay's end) would leave the LR climbing throughout: it is cut to a tenth of that, with a note."""
    decay = cfg.max_decay_steps or max_steps
    limit = min(max_steps, decay)
    warmup = cfg.warmup_steps
    if warmup >= limit:
        warmup = limit // 10
        _print(info, f"note: --warmup_steps={cfg.warmup_steps} would not end within the run's {limit} steps; "
                     f"warming up over {warmup} steps instead")
    return warmup, decay


def make_val_loader(task, info):
    """The validation loader, or None (with a note) when the split holds nothing to evaluate on."""
    try:
        return task.make_loader("val", info)
    except EmptySplitError as e:
        _print(info, f"note: evaluation is skipped: {e}")
        return None


def train(cfg, task: TrainTask, prog=None):
    """Run the task under torchrun (or as one process). Returns a summary dict in a single process; a
    torchrun worker exits once its process group is torn down (see distributed_run).

    Errors the user can fix end the process with a one-line message (exit code 2).
    """
    with distributed_run(cfg.device, prog=prog or task.name, cpu_threads=cfg.cpu_threads) as info:
        cfg.resolve_batch(info.world_size)
        data_limit = task.check_data()  # the data first: without it nothing else matters
        cfg.max_seq_length = fit_seq_length(cfg.max_seq_length, task.model_config().block_size, data_limit)
        # Before the model is built, so that a run that cannot start is refused at once: a ckpt_dir in use
        # or holding another run, an unreadable or foreign checkpoint, a log_dir with another run's logs.
        with TrainingCheckpointer(cfg, info, task.name, task.extra_state, task.ignore_frozen_params) as checkpointer:
            keep_global_batch(cfg, checkpointer.resume_state, info.world_size, lambda m: _print(info, m))
            with RunLog(cfg.log_dir, info, checkpointer.resume_step, resuming=checkpointer.resume_path is not None,
                        resume_asked=bool(cfg.resume)) as run_log:
                return _train(cfg, task, info, checkpointer, run_log)


def _train(cfg, task, info, checkpointer, run_log):
    # Both loaders before step 0: an unreadable validation split fails now, not at the first evaluation.
    train_loader, val_loader = task.make_loader("train", info), make_val_loader(task, info)
    val_start = val_loader.state_dict() if val_loader else None  # every evaluation reads the same sequences
    eval_sets = load_eval_tasks(cfg.eval_tasks)  # downstream tasks (eval_tasks), read before any step
    max_steps = task.total_steps(train_loader) if task.total_steps else cfg.max_train_iters
    if checkpointer.finished(max_steps):
        more = "--num_epochs (or --max_train_iters, if set)" if hasattr(cfg, "num_epochs") else "--max_train_iters"
        _print(info, f"{cfg.ckpt_dir} holds a finished run (step {checkpointer.resume_step} of {max_steps}; model in "
                     f"{checkpointer.final_dir}): nothing to do. To train on, raise {more}")
        return {"memory": None, "steps": checkpointer.resume_step, "max_steps": max_steps, "history": [], "eval": None,
                "checkpoint": checkpointer.resume_path, "stopped_early": False, "final": checkpointer.final_dir}
    warmup, decay = fit_warmup(cfg, max_steps, info)

    # A checkpoint that holds every weight (all but LoRA's) overwrites them: none need building.
    restoring = checkpointer.resume_path is not None and not task.ignore_frozen_params
    model, optimizer, bf16 = build_model(cfg, task, info, restoring)
    model_config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_tok = model_flops_per_token(model_config, cfg.max_seq_length)
    peak = peak_flops(info.device, torch.bfloat16 if bf16 else torch.float32)  # per rank

    # Resume last: nothing may draw from the RNG between restoring its state and the first step.
    step = checkpointer.load(model, optimizer, train_loader)  # 0 for a fresh run; else everything restored
    if task.prepare:  # draws nothing from the RNG
        task.prepare(model, {"train": train_loader, "val": val_loader}, step, info)
    if step == 0:
        torch.manual_seed(cfg.seed + info.rank)  # dropout differs between ranks
    start_step = saved_step = step
    global_batch = cfg.micro_batch_size * cfg.gradient_accum_steps * info.world_size
    _print(info, f"{task.name}: {n_params / 1e6:.1f}M parameters ({n_trainable / 1e6:.2f}M trainable), world size "
                 f"{info.world_size} ({info.device.type}/{info.backend}), global batch {global_batch} x "
                 f"{cfg.max_seq_length} "
                 f"tokens, steps {step} -> {max_steps}, TensorBoard: {cfg.log_dir}")
    # Redirected to a file, a bar redraws into the log: keep it to a line every 30 s there.
    bar = tqdm(total=max_steps, initial=step, disable=not info.is_main, desc=task.name, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    history, last_eval, saved, memory = [], None, checkpointer.resume_path, None
    model.train()
    with StopRequest() as stop:
        while step < max_steps:
            lr = lr_at(step, cfg.init_lr, cfg.max_lr, cfg.min_lr, warmup, decay)
            t0 = time.perf_counter()
            out = train_step(model, optimizer, train_loader, lr, step, cfg, info, stop, checkpointer,
                             measure=step == start_step, task=task)
            if out is None:  # stopped before the window was complete: it was dropped
                break
            step += 1
            record = step_record(step, lr, out, time.perf_counter() - t0, flops_tok, peak, info)
            if step == start_step + 1:
                memory = record["memory"] = sharded_bytes(model, optimizer, out["grad_bytes"], info)
                _print(info, "per-rank memory (MiB): " + "; ".join(
                    f"{k} " + ", ".join(f"{b / 2**20:.1f}" for b in v) for k, v in memory.items()))
            history.append(record)
            log_step(record, run_log, bar, step % cfg.log_interval == 0 or step == max_steps, max_steps, info)
            if _due(cfg.ckpt_interval, step, max_steps):
                saved, saved_step = checkpointer.save(step), step
            # A stop skips the evaluation (it would eat into the grace period); the ranks must agree on that.
            evaluate_now = (val_loader is not None or eval_sets) and _due(cfg.eval_interval, step, max_steps)
            if evaluate_now and not _any_rank(stop.requested, info):
                last_eval = (task.evaluate or evaluate)(model, val_loader, val_start, cfg, info) \
                    if val_loader is not None else {}
                last_eval.update(evaluate_in_loop(model, eval_sets, cfg.micro_batch_size, info.device))
                log_eval(step, last_eval, run_log, info)
        if step > saved_step:  # a stop that came between steps: the last completed one is still unsaved
            saved, saved_step = checkpointer.save(step), step
    bar.close()
    summary = {"memory": memory, "steps": step, "max_steps": max_steps, "history": history, "eval": last_eval,
               "checkpoint": saved, "stopped_early": step < max_steps}
    if step < max_steps:
        where = f"its checkpoint is {saved}; continue with --resume=auto" if saved else "nothing to save yet"
        _print(info, f"stopped by signal at step {step}; {where}")
        return summary
    summary["final"] = final_dir = save_final(model, task, cfg, info)
    _print(info, f"done: {step} steps" + (f", final train loss {history[-1]['loss']:.4f}" if history else "")
                 + (f", eval loss {last_eval['loss']:.4f}" if last_eval and "loss" in last_eval else "")
                 + (f" (perplexity {last_eval['perplexity']:.2f})" if last_eval and "perplexity" in last_eval else "")
                 + f"; model saved to {final_dir}")
    return summary


def build_model(cfg, task, info, restoring=False):
    """The task's model, sharded over the ranks, and its optimizer: (model, optimizer, bf16).

    Meta-device init: every rank builds the model on the meta device (no memory) and shards it; only
    rank 0 builds it with weights (initialised from the seed, or read from a checkpoint), on the CPU, and
    sends each rank its shards one tensor at a time. No other rank ever holds a full copy, no GPU ever
    holds the whole model, and the initial weights are the same at every world size. A single process
    has nothing to send: it shards the model it built, which frees each full tensor as its shard is made.
    restoring: a checkpoint will overwrite every weight (DCP refuses one that lacks any), so no rank
    builds them: the shards are only allocated.
    """
    bf16, why = decide_precision(cfg.mixed_precision, info)
    _print(info, f"precision: {'bf16 compute, fp32 master weights' if bf16 else 'fp32'} ({why})")
    if cfg.defer_grad_sync == "auto" and defers_grad_sync(cfg, info):
        _print(info, "note: cpu_offload with gradient accumulation: gradients are reduce-scattered at the last "
                     "micro-step only (--defer_grad_sync=auto); --defer_grad_sync=false holds less on the GPU")
    torch.manual_seed(cfg.seed)
    alone = info.world_size == 1 and not restoring
    with_weights = task.build_model("cpu") if info.is_main and not restoring else None
    model = with_weights if alone else task.build_model("meta")
    parallelize(model, info, mixed_precision=bf16, activation_checkpointing=cfg.activation_checkpointing,
                compile_model=cfg.compile_model, cpu_offload=cfg.cpu_offload, dynamic_shapes=task.padded)
    if not alone:
        full_state = None if restoring else with_weights.state_dict() if info.is_main else {}
        del with_weights
        materialize(model, info, cfg.cpu_offload, full_state)
    return model, build_optimizer(model, cfg, info.device), bf16


def decide_precision(setting, info):
    """(bf16?, why) chosen by rank 0 and sent to every rank: with "auto" each rank would time its own matmuls,
    and ranks that disagreed (cores that differ, a busy neighbour) would shard with different policies."""
    choice = [choose_bf16(setting, info.device, "--mixed_precision") if info.is_main else None]
    if info.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def save_final(model, task, cfg, info):
    """The final model, gathered to full tensors on rank 0 and written in the model-checkpoint format."""
    full = gather_model_state_dict(model, task.ignore_frozen_params)
    final_dir = os.path.join(cfg.ckpt_dir, "final")
    if info.is_main:
        task.save_final(full, model, final_dir)
    dist.barrier()
    return final_dir


def train_step(model, optimizer, loader, lr, step, cfg, info, stop, checkpointer, measure=False, task=None):
    """One optimizer step over `gradient_accum_steps` micro-batches per rank; None when a stop came first.

    The summed loss is divided by the target tokens of the whole window on all ranks, so 2 ranks x 1
    micro-batch and 1 rank x 2 give the same gradient. Gradients are reduce-scattered after every
    micro-step (each rank then holds only its shard); --defer_grad_sync=true keeps full unsharded
    gradients until the last micro-step instead (less communication, much more memory).
    A stop, agreed by all ranks before each micro-step, drops the window: data position, RNG and
    gradients go back to where the step began, so a resume replays it exactly.
    """
    defer = defers_grad_sync(cfg, info)
    data_state, rng_state = loader.state_dict(), _rng_state(info.device)
    batches = [loader.next_batch() for _ in range(cfg.gradient_accum_steps)]
    own_loss = task is not None and task.loss is not None
    # One collective (CPU/gloo: no device sync) for the window's token counts and any rank's stop request.
    n_units = sum(task.units(b) for b in batches) if own_loss else 0
    n_targets, n_tokens, n_positions, n_units, stopping = all_reduce_sum(
        [*_count_tokens(batches), n_units, stop.requested], info)
    n_units = n_units if own_loss else n_targets  # what the loss is averaged over
    batches = [_to_device(b, info.device) for b in batches]
    loss_sum = torch.zeros((), device=info.device)
    metric_sums = {}
    grad_bytes = None
    for i, batch in enumerate(batches):
        if i > 0:
            stopping = _any_rank(stop.requested, info)
        if stopping:
            optimizer.zero_grad(set_to_none=True)
            loader.load_state_dict(data_state)
            _set_rng_state(rng_state, info.device)
            return None
        model.set_requires_gradient_sync(i == len(batches) - 1 or not defer)
        if own_loss:
            loss, metrics = task.loss(model, batch)
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
        else:
            loss = _loss_sum(model, batch)
        # FSDP averages gradients over ranks: scale by world size to make that average a sum.
        (loss * (info.world_size / max(n_units, 1))).backward()
        loss_sum += loss.detach().float()
        if measure and i == 0:
            grad_bytes = gradient_bytes(model)  # while the window accumulates: what each rank holds
    names = sorted(metric_sums)
    if names:  # the task's metrics travel with the loss: one collective, one device->host read
        loss_sum = torch.stack([loss_sum, *(metric_sums[k] for k in names)])
    if info.world_size > 1:
        dist.all_reduce(loss_sum)
    loss_sum, metric_values = (loss_sum[0], loss_sum[1:]) if names else (loss_sum, None)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm, foreach=True)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # the loss on the device, the norm on the CPU if offloaded, the task's metrics with the loss
    loss_sum, grad_norm, *metric_values = to_host(loss_sum, grad_norm, *(metric_values.unbind(0) if names else ()))
    train_loss = loss_sum / max(n_units, 1)
    # A finite loss can still come with an inf/nan gradient: that step would poison the weights and every
    # checkpoint after it. Stop before the optimizer step, with the last good checkpoint untouched.
    for what, value in (("loss", train_loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            last = checkpointer.latest() or "none"
            raise TrainingError(f"{what} is {value} at step {step + 1}: training diverged. Nothing was saved "
                                f"for this step; the last good checkpoint is {last}. Lower --max_lr, raise "
                                "--warmup_steps or check the data, then --resume=auto")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": train_loss, "grad_norm": grad_norm, "tokens": n_tokens, "target_tokens": n_targets,
            "positions": n_positions, "grad_bytes": grad_bytes,
            "metrics": {k: v / max(n_units, 1) for k, v in zip(names, metric_values)}}


def to_host(*scalars):
    """The step's one device->host read, in one place: 0-d tensors wherever they live (a CUDA loss, the CPU norm
    of offloaded gradients) -> Python floats, with a single sync. They are gathered on the first one's device
    first, as torch's clip_grad_norm_ does with per-device norms: stacking tensors of two devices fails."""
    device = scalars[0].device
    return torch.stack([s.detach().to(device=device, dtype=torch.float64) for s in scalars]).tolist()


def defers_grad_sync(cfg, info):
    """--defer_grad_sync; auto = with offloaded gradients (cpu_offload on CUDA) and accumulation. There FSDP2 adds
    each micro-step's reduce-scattered gradient to the CPU copy inside backward: a blocking device-to-host copy
    and a CPU add per parameter, every micro-step after the first (_fsdp_collectives.foreach_reduce). Deferred,
    one non-blocking copy per step remains, at the cost of full gradients on the GPU while accumulating."""
    if cfg.defer_grad_sync == "auto":
        return offloads(cfg.cpu_offload, info) and cfg.gradient_accum_steps > 1
    return bool(cfg.defer_grad_sync)


@torch.no_grad()
def evaluate(model, loader, start_state, cfg, info):
    """Mean loss over the first eval_iters x micro_batch_size validation sequences (at most the split),
    the same sequences whatever the world size: ranks take interleaved micro-batches (custom_dataset's
    layout: rank r's micro-step m starts at global row (m * world_size + r) * micro_batch_size) and rows
    past that count carry no target. Every rank runs the same number of forwards (FSDP needs that)."""
    model.eval()
    loader.load_state_dict(start_state)
    B, W = cfg.micro_batch_size, info.world_size
    n = min(cfg.eval_iters * B, len(loader))
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # loss sum, target tokens
    for m in range(math.ceil(n / (W * B))):
        x, y, *doc_ids = loader.next_batch()
        rows = (m * W + info.rank) * B + torch.arange(y.size(0))
        y = y.masked_fill((rows >= n)[:, None], IGNORE_INDEX)
        batch = _to_device((x, y, *doc_ids), info.device)
        loss, y = _loss_sum(model, batch), batch[1]
        totals += torch.stack([loss.double(), (y != IGNORE_INDEX).sum().double()])
    if W > 1:
        dist.all_reduce(totals)
    total, tokens = totals.tolist()
    model.train()
    mean = total / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700)), "tokens": int(tokens), "sequences": n}


def step_record(step, lr, out, dt, flops_tok, peak, info):
    """What one step logs. Tokens are the ones processed (fine-tuning: padding excluded, prompts
    included); target tokens (those with a loss) are reported separately; padding_fraction is the share
    of the batches' positions (rows x length) that held no token to process."""
    tokens_per_sec = out["tokens"] / dt
    return {"step": step, "loss": out["loss"], **out.get("metrics", {}), "lr": lr, "grad_norm": out["grad_norm"],
            "tokens_per_sec": tokens_per_sec, "target_tokens_per_sec": out["target_tokens"] / dt,
            "padding_fraction": 1 - out["tokens"] / max(out["positions"], 1),
            "mfu": mfu(tokens_per_sec / info.world_size, flops_tok, peak)}


def log_step(record, run_log, bar, print_line, max_steps, info):
    run_log.train(record)
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)  # redrawn at mininterval
    if print_line:
        _print(info, f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                     f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_sec']:,.0f} tok/s | "
                     f"MFU {record['mfu']:.1%}")


def log_eval(step, result, run_log, info):
    """One evaluation: val loss/perplexity (when there is a val split) and the eval_tasks' metrics."""
    run_log.eval(step, result)
    _print(info, f"step {step} | eval " + " | ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "tokens"))


def sharded_bytes(model, optimizer, grad_bytes, info):
    """Bytes of parameters, optimizer state and (mid-window) gradients held by each rank, gathered."""
    params = sum(local_bytes(p) for p in model.parameters())
    optim = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, (params, optim, grad_bytes or 0))
    return {name: [g[i] for g in gathered] for i, name in enumerate(("params", "optimizer", "grads"))}


def _any_rank(flag, info):
    """True on every rank if `flag` is set on any (a CPU collective: no device sync)."""
    return bool(all_reduce_sum([flag], info)[0]) if info.world_size > 1 else bool(flag)


def _due(interval, step, max_steps):
    return bool(interval and step % interval == 0) or step == max_steps


def _loss_sum(model, batch):
    """The summed loss of a device batch: (input_ids, labels), or packed (input_ids, labels, doc_ids)."""
    x, y, *doc_ids = batch
    _, loss = model(x, targets=y, doc_ids=doc_ids[0] if doc_ids else None, reduction="sum", return_logits=False)
    return loss


def _count_tokens(batches):
    """(target tokens, processed tokens, positions) of CPU batches. A row's processed tokens end at its last
    target: padding after it is not work the model needed (pretraining rows are all targets). Positions
    are all of the batches' rows x length, padding included."""
    targets = processed = positions = 0
    for batch in batches:
        y = batch[1]
        has_target = y != IGNORE_INDEX
        targets += int(has_target.sum())
        ends = torch.where(has_target, torch.arange(1, y.size(1) + 1), 0).amax(dim=1)  # (B,)
        processed += int(ends.sum())
        positions += y.numel()
    return targets, processed, positions


def _to_device(batch, device):
    """CPU tensors -> device. On CUDA through pinned memory and non_blocking: the copy does not stall the host."""
    if device.type != "cuda":
        return batch
    moved = [t.pin_memory().to(device, non_blocking=True) if torch.is_tensor(t) else t for t in batch]
    return type(batch)(*moved) if hasattr(batch, "_fields") else tuple(moved)  # a NamedTuple keeps its fields


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _print(info, msg):
    """A line on stdout from rank 0; through tqdm only when its bar is live on a terminal (a redirected
    bar would be redrawn into the log with every line)."""
    if info.is_main:
        if sys.stderr.isatty():
            tqdm.write(msg)
        else:
            print(msg, flush=True)

