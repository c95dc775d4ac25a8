"""finetune_dpo.py trains exactly as TRL's DPOTrainer (trl 1.16) does: the same tiny GPT-2 (exported to
transformers), the same pairs in the same batches, fp32, for sigmoid, ipo and hinge, full and LoRA (TRL with a
PEFT model, whose reference is the adapter switched off): loss and every reward/logp metric within 1e-5 at
every step. Ours runs through the real script and loop (finetune_dpo.main, metrics.jsonl); TRL through
DPOTrainer.train() with its own collator, loss, optimizer and logging."""
import copy
import json
import math
import os

import peft
import pytest
import torch
import transformers
import trl  # test-only: .ci/run installs it (a missing trl fails here rather than skipping)

import finetune_dpo
from custom_dataset import PreferenceLoader
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.lora import apply_lora
from utils.checkpoints.hf import write_hf_tokenizer
from utils.checkpoints.hf_mapping import config_to_hf, ours_to_hf
from utils.checkpoints.model import load_model, save_model
from utils.training.dpo import preference_loss
from utils.training.metrics import read_metrics

STEPS, BATCH, SEED = 21, 4, 1337
TARGETS = ("attn.c_proj", "mlp.c_fc")  # whole layers: PEFT has no per-slice (q/k/v) adapters of c_attn
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, write_preference_data):
    root = tmp_path_factory.mktemp("dpo_trl")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=128)
    save_model(GPT2LMHeadModel(config), root / "base")
    data = write_preference_data(root / "data", n_train=STEPS * BATCH, n_val=8)
    os.makedirs(root / "tokenizer")
    write_hf_tokenizer(root / "tokenizer")
    # The pairs in the order our loader serves them (seeded shuffle): TRL is given them in that order.
    loader = PreferenceLoader(data / "train.jsonl", BATCH, seed=SEED)
    order = [i for _ in range(STEPS) for i in loader.next_batch().index.tolist()]
    rows = [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), (a.tolist() for a in loader.pair(i))))
            for i in order]
    val = PreferenceLoader(data / "val.jsonl", BATCH, shuffle=False)
    val_rows = [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), (a.tolist() for a in val.pair(i))))
                for i in range(len(val))]
    return root, config, rows, val_rows


def run_ours(root, loss_type, lora_r, lr, beta, sft_weight=0.0):
    name = f"{loss_type}_{lora_r}_{sft_weight}"
    finetune_dpo.main([f"--pretrained_ckpt={root / 'base'}", f"--data_dir={root / 'data'}",
                       f"--ckpt_dir={root / name / 'ck'}", f"--log_dir={root / name / 'runs'}",
                       f"--loss_type={loss_type}", f"--beta={beta}", f"--lora_r={lora_r}", "--lora_alpha=16",
                       f"--sft_weight={sft_weight}",
                       f"--lora_targets={','.join(TARGETS)}", f"--micro_batch_size={BATCH}",
                       "--gradient_accum_steps=1", f"--max_lr={lr}", f"--min_lr={lr}", "--warmup_steps=0",
                       "--weight_decay=0", "--adamw_betas=0.9,0.95", "--grad_clip=1.0", f"--seed={SEED}",
                       "--eval_interval=0", "--ckpt_interval=0", "--log_interval=1", "--mixed_precision=false",
                       "--device=cpu", "--cpu_threads=1"])
    steps, evals = read_metrics(root / name / "runs")
    return [steps[s] for s in sorted(steps)], evals[STEPS]  # evaluated once, at the end: all 8 val pairs


class PreTokenized(trl.DPOTrainer):
    """Our pairs are token ids already (the template applied by build_finetune_datasets.py): TRL's text
    tokenisation is skipped; its collator, forward, loss, optimizer and logging all run."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset


def run_trl(root, config, rows, val_rows, loss_type, lora_r, lr, beta, sft_weight=0.0):
    import datasets
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config)))
    base = load_model(root / "base")
    hf.load_state_dict(ours_to_hf(base.state_dict(), config), strict=False)  # strict=False: HF's mask buffers
    model, ref_model = hf, copy.deepcopy(hf)  # full DPO: a frozen copy of the starting model
    if lora_r:
        ref_model = None  # PEFT: the adapter switched off
        # Our adapter's initial A, as finetune_dpo.py draws it (trainer.build_model seeds, then builds).
        torch.manual_seed(SEED)
        ours = apply_lora(load_model(root / "base"), lora_r, 16.0, 0.0, TARGETS)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                        target_modules=list(TARGETS), fan_in_fan_out=True))
        theirs = model.state_dict()
        for n, p in ours.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                module, ab, _ = n.rsplit(".", 2)
                theirs[f"base_model.model.{module}.{ab}.default.weight"].copy_(p.detach())
    args = trl.DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=BATCH,
                         gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=lr,
                         lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                         adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
                         logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], beta=beta,
                         loss_type=[loss_type, "sft"] if sft_weight else [loss_type],
                         loss_weights=[1.0, sft_weight] if sft_weight else None, use_cpu=True,
                         train_sampling_strategy="sequential",
                         max_length=None, bf16=False, seed=SEED, disable_dropout=True, dataloader_num_workers=0,
                         per_device_eval_batch_size=BATCH)
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(root / "tokenizer")
    trainer = PreTokenized(model=model, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    return logs, trainer.evaluate(eval_dataset=datasets.Dataset.from_list(val_rows))


# (loss, LoRA rank, lr, sft_weight): the last adds TRL's "sft" term (RPO) with weight 0.5
CASES = [("sigmoid", 0, 1e-3, 0.0), ("ipo", 0, 1e-3, 0.0), ("hinge", 0, 1e-3, 0.0),
         ("sigmoid", 4, 1e-2, 0.0), ("ipo", 4, 1e-2, 0.0), ("hinge", 4, 1e-2, 0.0), ("sigmoid", 0, 1e-3, 0.5)]


@pytest.mark.parametrize("loss_type,lora_r,lr,sft_weight", CASES,
                         ids=[f"{t}-{'lora' if r else 'full'}{'-sft' if w else ''}" for t, r, _, w in CASES])
def test_dpo_equals_trl_step_for_step(setup, loss_type, lora_r, lr, sft_weight):
    # IPO's loss sits near (1 / (2 beta))^2: at beta 0.1 that is 25, where fp32 resolves only ~2e-6; at 0.5, 1.
    beta = 0.5 if loss_type == "ipo" else 0.1
    root, config, rows, val_rows = setup
    torch.set_num_threads(1)
    ours, ours_eval = run_ours(root, loss_type, lora_r, lr, beta, sft_weight)
    theirs, theirs_eval = run_trl(root, config, rows, val_rows, loss_type, lora_r, lr, beta, sft_weight)
    assert len(ours) == len(theirs) == STEPS
    if loss_type == "sigmoid" and not sft_weight:
        assert abs(ours[0]["loss"] - math.log(2)) < 1e-6  # dropout off: policy = reference at step 1
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        for k in METRICS:
            # logps/* are sums of ~10 per-token log-probs of ~-10 each: at |60| one fp32 ulp is 4e-6, so 1e-5
            # there is relative (1e-5 x |value| / 10); the loss and the rewards (differences, ~1) are absolute.
            tol = 1e-6 * max(abs(b[k]), 10) if k.startswith("logps/") else 1e-5
            assert abs(a[k] - b[k]) <= tol, f"step {step} {k}: ours {a[k]:.7f} vs TRL {b[k]:.7f}"
    for k in METRICS:  # the validation pairs after the last step, under TRL's eval_ names
        k = f"eval_{k}"
        tol = 1e-6 * max(abs(theirs_eval[k]), 10) if "logps/" in k else 1e-5
        assert abs(ours_eval[k] - theirs_eval[k]) <= tol, f"{k}: ours {ours_eval[k]:.7f} vs TRL {theirs_eval[k]:.7f}"
    # It learned: the comparison is between two models that moved, not two frozen ones.
    assert ours[-1]["rewards/margins"] > ours[0]["rewards/margins"] + 0.05
    if sft_weight:  # the loss is DPO's ln 2 plus 0.5 x the chosen tokens' NLL (~10.4 for a random 50k-vocab model)
        assert ours[0]["loss"] > math.log(2) + 0.5 * 5
    with open(root / f"{loss_type}_{lora_r}_{sft_weight}" / "runs" / "metrics.jsonl") as f:
        assert "rewards/accuracies" in json.loads(f.readline())


def test_label_smoothing_is_conservative_dpo():
    """TRL 1.16 dropped label smoothing from its sigmoid loss; ours is the cDPO loss of the DPO paper's
    appendix (and earlier TRL): -(1 - e) log s(beta d) - e log s(-beta d), checked by hand."""
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.5])  # chosen 1, chosen 2, rejected 1, rejected 2
    reference = torch.tensor([-3.5, -5.0, -3.0, -5.0])
    n = torch.tensor([2, 3, 4, 5])
    losses, metrics = preference_loss(policy, reference, n, beta=0.5, loss_type="sigmoid", label_smoothing=0.2)
    for d, got in zip([(0.5 - (-1.0)), (0.0 - 0.5)], losses.tolist()):
        want = -0.8 * math.log(1 / (1 + math.exp(-0.5 * d))) - 0.2 * math.log(1 / (1 + math.exp(0.5 * d)))
        assert abs(got - want) < 1e-6
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert metrics["rewards/margins"].tolist() == pytest.approx([0.75, -0.25])
