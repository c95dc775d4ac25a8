"""Direct Preference Optimization (Rafailov et al., 2023) as a task of the one training loop, computed the way
TRL's DPOTrainer computes it, so that its numbers (and its metric names) carry over:

    logp(y|x)  = sum of log p(answer token | everything before it), over exactly the answer's tokens
    chosen_lr  = logp_policy(chosen) - logp_reference(chosen);  rejected_lr likewise;  d = chosen_lr - rejected_lr
    sigmoid:  -(1 - e) log s(beta d) - e log s(-beta d)   (e = label_smoothing: conservative DPO; e = 0 is DPO)
    hinge:    max(0, 1 - beta d)                           (SLiC)
    ipo:      (chosen_lr / |chosen| - rejected_lr / |rejected| - 1 / (2 beta))^2   (per-token averages, as TRL)
    rewards/chosen = beta chosen_lr, rewards/rejected = beta rejected_lr, accuracies = [chosen > rejected],
    margins = their difference, logps/* = the policy's summed log-probabilities; the loss is the mean over pairs.
    sft_weight w > 0 adds w x the chosen answers' negative log-likelihood per token of each micro-batch (RPO,
    Pang et al., 2024; TRL: loss_type=[<loss>, "sft"], loss_weights=[1, w]): it keeps the chosen answers likely.

Chosen and rejected rows go through the model in one forward (custom_dataset.PreferenceBatch). The reference
is the model the run starts from: with LoRA the same model with its adapter switched off (no second copy),
for full DPO a frozen copy sharded like the policy, or, with precompute_ref, log-probabilities computed once
before step 1 and kept with the run (ckpt_dir/reference_logps.safetensors), which a resumed run reads back.
"""
import math
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from custom_dataset import PreferenceLoader
from models.lora import adapter_disabled
from models.loss import IGNORE_INDEX
from utils.errors import UserError
from utils.hardware import choose_bf16
from utils.training.parallelize import materialize, parallelize

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
REFERENCE_FILE = "reference_logps.safetensors"


def per_sequence(batch, values):
    """(2B,) sums of (rows, T) per-token `values` over each chosen/rejected sequence, [chosen..., rejected...]:
    a row's sum (PreferenceBatch), or, packed (custom_dataset.PackedPreferenceBatch), the segment sums over the
    tokens of each sequence, wherever in which row it lies."""
    if not hasattr(batch, "sequence"):
        return values.sum(dim=1)
    n = 2 * batch.index.numel()  # the padding is sequence n: summed apart, then dropped
    sums = torch.zeros(n + 1, dtype=values.dtype, device=values.device)
    return sums.index_add_(0, batch.sequence.flatten(), values.flatten())[:n]


def answer_logps(model, batch):
    """(2B,) summed log-probabilities of each sequence's answer tokens (the labels that are not -100). Packed rows
    go through the model with their doc_ids: each sequence attends only to itself, positions from 0."""
    doc_ids = getattr(batch, "doc_ids", None)
    _, nll = model(batch.input_ids, targets=batch.labels, reduction="none", return_logits=False,
                   doc_ids=doc_ids)  # (rows, T), 0 where the label is -100
    return per_sequence(batch, -nll)


def preference_loss(policy, reference, n_answer, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses (B,) and metrics {name: (B,)} from (2B,) policy / reference log-probabilities and
    answer lengths, rows [chosen..., rejected...]."""
    policy_chosen, policy_rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    chosen_lr, rejected_lr = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        n_chosen, n_rejected = n_answer.chunk(2)
        losses = (chosen_lr / n_chosen.clamp(min=1) - rejected_lr / n_rejected.clamp(min=1) - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    chosen_rewards, rejected_rewards = beta * chosen_lr.detach(), beta * rejected_lr.detach()
    metrics = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
               "rewards/margins": chosen_rewards - rejected_rewards,
               "logps/chosen": policy_chosen.detach(), "logps/rejected": policy_rejected.detach()}
    return losses, metrics


class DPO:
    """The hooks a TrainTask needs (loss, units, evaluate, prepare) for DPO with `cfg`'s settings
    (configs/finetune_dpo.py: beta, loss_type, label_smoothing, lora_r, precompute_ref, ...)."""

    def __init__(self, cfg, build_reference_model):
        self.cfg = cfg
        self.build_reference_model = build_reference_model  # (device) -> the starting model, for full DPO's copy
        self.reference = None  # full DPO without precompute_ref: the frozen, sharded copy
        self.tables = {}       # precompute_ref: split -> (N, 2) reference log-probabilities (chosen, rejected)

    # --- the reference ---

    def _reference_logps(self, model, batch, split):
        if self.cfg.precompute_ref:
            table = self.tables[split][batch.index]  # (B, 2)
            return torch.cat([table[:, 0], table[:, 1]]).to(batch.input_ids.device)
        with torch.no_grad():
            if self.reference is not None:
                return answer_logps(self.reference, batch)
            with adapter_disabled(model):
                return answer_logps(model, batch)

    def prepare(self, model, loaders, step, info):
        """Before step 1: the frozen copy (full DPO), or the precomputed log-probabilities (computed at step 0,
        read back by a resumed run)."""
        if self.cfg.precompute_ref:
            self._precompute(model, loaders, step, info)
        elif not self.cfg.lora_r:
            self.reference = build_reference(self.cfg, self.build_reference_model, info)

    def _precompute(self, model, loaders, step, info):
        path = os.path.join(self.cfg.ckpt_dir, REFERENCE_FILE)
        sizes = {split: loader.num_examples for split, loader in loaders.items() if loader is not None}
        if step > 0:  # the policy has moved on: only the saved values are the reference
            if not os.path.isfile(path):
                raise UserError(f"{path} is missing: this run precomputed its reference log-probabilities before "
                                f"step 1 and keeps them there; restore it, or start a fresh run")
            tables = load_file(path)
            for split, n in sizes.items():
                if split not in tables or tables[split].shape != (n, 2):
                    raise UserError(f"{path} does not match --data_dir ({split}: {n} pairs); start a fresh run")
            self.tables = tables
            return
        was_training = model.training
        model.eval()
        # Full DPO: at step 0 the policy is the reference. LoRA: the adapter switched off.
        with torch.no_grad(), adapter_disabled(model) if self.cfg.lora_r else nullcontext():
            self.tables = {split: reference_table(model, loader, self.cfg.micro_batch_size, info)
                           for split, loader in loaders.items() if loader is not None}
        model.train(was_training)
        if info.is_main:
            tmp = path + ".tmp"
            save_file({k: v.contiguous() for k, v in self.tables.items()}, tmp)
            os.replace(tmp, path)
        if info.world_size > 1:
            dist.barrier()

    # --- the loop's hooks ---

    def _pair_terms(self, model, batch, split):
        policy = answer_logps(model, batch)
        reference = self._reference_logps(model, batch, split)
        n_answer = per_sequence(batch, (batch.labels != IGNORE_INDEX).long())
        losses, metrics = preference_loss(policy, reference, n_answer, self.cfg.beta, self.cfg.loss_type,
                                          self.cfg.label_smoothing)
        if self.cfg.sft_weight:
            # The batch's chosen-answer NLL per token, added to every pair's loss (so once to their mean), as TRL.
            nll = -policy.chunk(2)[0].sum() / n_answer.chunk(2)[0].sum().clamp(min=1)
            losses = losses + self.cfg.sft_weight * nll
        return losses, metrics

    def loss(self, model, batch):
        """(loss summed over the batch's pairs, {metric: sum over its pairs})."""
        losses, metrics = self._pair_terms(model, batch, "train")
        return losses.sum(), {k: v.sum() for k, v in metrics.items()}

    @staticmethod
    def units(batch) -> int:
        return batch.index.numel()  # pairs: the loss and metrics are means over pairs

    @torch.no_grad()
    def evaluate(self, model, loader, start_state, cfg, info):
        """The loss and metrics over the first eval_iters x micro_batch_size validation pairs (at most the split),
        the same pairs at any world size (the layout of trainer.evaluate: rows past that count weigh 0)."""
        model.eval()
        loader.load_state_dict(start_state)
        B, W = cfg.micro_batch_size, info.world_size
        n = min(cfg.eval_iters * B, len(loader))
        sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=info.device)
        for m in range(math.ceil(n / (W * B))):
            batch = loader.next_batch()
            rows = (m * W + info.rank) * B + torch.arange(batch.index.numel())
            weight = (rows < n).double().to(info.device)  # (B,)
            batch = type(batch)(*(t.to(info.device) for t in batch))
            losses, metrics = self._pair_terms(model, batch, "val")
            sums += torch.stack([(losses.double() * weight).sum(),
                                 *((metrics[k].double() * weight).sum() for k in METRICS)])
        if W > 1:
            dist.all_reduce(sums)
        model.train()
        values = (sums / max(n, 1)).tolist()
        return {"loss": values[0], **dict(zip(METRICS, values[1:])), "pairs": n}


def reference_table(model, loader: PreferenceLoader, micro_batch_size, info):
    """(N, 2) summed answer log-probabilities (chosen, rejected) of every pair of the loader's file under `model`:
    the ranks share the pairs (all run the same number of forwards, as FSDP needs), then gather them."""
    n, W = loader.num_examples, info.world_size  # pairs (a packed loader's len() counts rows)
    chunks = [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]
    mine = []
    rounds = math.ceil(len(chunks) / W)
    for k in tqdm(range(rounds), desc=f"reference log-probs ({os.path.basename(loader.path)})",
                  disable=not info.is_main or None):
        j = k * W + info.rank
        picked = chunks[j] if j < len(chunks) else chunks[0]  # a spare forward keeps the ranks in step
        batch = loader.collate(picked)
        batch = type(batch)(*(t.to(info.device) for t in batch))
        logps = answer_logps(model, batch).float().cpu()
        if j < len(chunks):
            mine.append((picked, logps))
    gathered = [None] * W
    if W > 1:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    table = torch.zeros(n, 2, dtype=torch.float32)
    for part in gathered:
        for picked, logps in part:
            chosen, rejected = logps.chunk(2)
            table[picked, 0], table[picked, 1] = chosen, rejected
    return table


def build_reference(cfg, build, info):
    """Full DPO's reference: the starting model, frozen, in eval mode, sharded like the policy (meta-device
    init as in trainer.build_model: rank 0 alone reads the weights and sends each rank its shards)."""
    bf16, _ = choose_bf16(cfg.mixed_precision, info.device, "--mixed_precision")
    alone = info.world_size == 1
    full = build("cpu") if info.is_main else None
    reference = full if alone else build("meta")
    reference.requires_grad_(False)
    parallelize(reference, info, mixed_precision=bf16, compile_model=cfg.compile_model, cpu_offload=cfg.cpu_offload,
                dynamic_shapes=True)
    if not alone:
        materialize(reference, info, cfg.cpu_offload, full.state_dict() if info.is_main else {})
    return reference.eval()
