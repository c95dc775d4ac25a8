"""DPO training throughput: ours (utils/training/dpo.py, as finetune_dpo.py runs it) against TRL's DPOTrainer,
the same model, the same pairs in the same batches, the same CPU, one run.

    python bench/dpo_throughput.py                      # 4 layers, 4 heads, 256 wide; 8 pairs a step; fp32
    python bench/dpo_throughput.py --lora_r 8           # LoRA (TRL: a PEFT model, reference = adapter off)
    python bench/dpo_throughput.py --pack               # ours padded against ours packed (--pack=true), no TRL

--pack: one pass over the same pairs per side per round, with long-tailed prompts (0-16 context sentences):
padded micro-batches of --pairs pairs, against packed rows of 2 x 256 tokens (custom_dataset.plan_rows and
packed_preference_collate, as finetune_dpo.py --pack=true), --pairs rows a micro-batch (what a user gets by
adding --pack=true); full DPO, each micro-batch a step. Reports tokens/s and the padding of each side.

One step = the policy forward of chosen and rejected rows, the reference forward, the loss, backward, gradient
clipping and an AdamW step. Ours: DPO.loss (one concatenated forward through models/loss.py's chunked
log-probabilities; reference = a frozen copy, or the adapter switched off) on a plain model (the loop also
wraps it in FSDP2, which at one rank adds little). TRL: DPOTrainer.training_step (its collator's batch, its
fused LM head, its reference forward) plus the trainer's own optimizer. Tokens/s counts the real (non-padding)
tokens of the chosen and rejected rows. The two sides alternate, round after round (the order flips), so load
from other processes hits both alike; the ratio is taken within each round and its median reported.
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.finetune_dpo import FinetuneDPOConfig  # noqa: E402
from custom_dataset import preference_collate  # noqa: E402
from models.gpt2 import GPT2Config, GPT2LMHeadModel  # noqa: E402
from models.lora import apply_lora, mark_only_lora_trainable  # noqa: E402
from utils.checkpoints.hf import write_hf_tokenizer  # noqa: E402
from utils.checkpoints.hf_mapping import config_to_hf, ours_to_hf  # noqa: E402
from utils.prompt_template import format_completion, format_prompt  # noqa: E402
from utils.tokenizer import get_tokenizer  # noqa: E402
from utils.training.dpo import DPO  # noqa: E402

TARGETS = ("attn.c_proj", "mlp.c_fc")


def make_pairs(n, seed=0, contexts=(6, 10)):
    """Colour questions with a context paragraph of `contexts` sentences (6-10: prompts ~60-90 tokens),
    answers 5-25 tokens."""
    import random
    rng = random.Random(seed)
    enc = get_tokenizer()
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    things = ["apple", "car", "house", "bird", "boat", "flower", "book", "door", "lamp", "coat"]
    pairs = []
    for _ in range(n):
        c, wrong, t = *rng.sample(colours, 2), rng.choice(things)
        context = " ".join(f"The {rng.choice(things)} next to it is {rng.choice(colours)}."
                           for _ in range(rng.randint(*contexts)))
        prompt = format_prompt(f"What colour is the {t}?", context=f"{context} The {t} is {c}.")
        chosen = f"The {t} is {c}." + " It says so above." * rng.randint(0, 3)
        rejected = f"I think it is {wrong}." + " Maybe." * rng.randint(0, 4)
        pairs.append([enc.encode_ordinary(x) for x in (prompt, format_completion(chosen), format_completion(rejected))])
    return pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step (the forward holds twice as many rows)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--lora_r", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--pack", action="store_true", help="ours padded vs ours packed (see above)")
    ap.add_argument("--pass_pairs", type=int, default=48, help="--pack: pairs in one pass")
    ap.add_argument("--doc_attention", default=None, help="--pack: the attention path (models/attention.py "
                    "BACKENDS; default: the device's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pack:
        return bench_packing(args)
    import datasets
    import peft
    import trl

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, block_size=256)
    base = GPT2LMHeadModel(config)
    batches_pairs = make_pairs(args.pairs * (args.rounds * args.steps + 2))
    # --- ours ---
    cfg = FinetuneDPOConfig(lora_r=args.lora_r, lora_alpha=16, lora_targets=TARGETS, micro_batch_size=args.pairs)
    ours = copy.deepcopy(base).train()
    if args.lora_r:
        apply_lora(ours, args.lora_r, 16.0, 0.0, TARGETS)
        mark_only_lora_trainable(ours)
    dpo = DPO(cfg, None)
    if not args.lora_r:
        dpo.reference = copy.deepcopy(base).eval().requires_grad_(False)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-6, foreach=True)
    # --- TRL ---
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config)))
    hf.load_state_dict(ours_to_hf(base.state_dict(), config), strict=False)
    ref = None
    model = hf
    if args.lora_r:
        model = peft.get_peft_model(hf, peft.LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.0,
                                                        target_modules=list(TARGETS), fan_in_fan_out=True))
    else:
        ref = copy.deepcopy(hf)
    tmp = tempfile.mkdtemp()
    write_hf_tokenizer(tmp)
    rows = [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), p)) for p in batches_pairs]

    class PreTokenized(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

    targs = trl.DPOConfig(output_dir=tmp, per_device_train_batch_size=args.pairs, learning_rate=1e-6,
                          report_to=[], use_cpu=True, max_length=None, bf16=False, optim="adamw_torch",
                          logging_steps=10**9, save_strategy="no")
    trainer = PreTokenized(model=model, ref_model=ref, args=targs, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=transformers.GPT2TokenizerFast.from_pretrained(tmp))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before its first step
    trainer.model.train()

    def batch_of(k):
        chunk = batches_pairs[k * args.pairs:(k + 1) * args.pairs]
        b = preference_collate([tuple(torch.tensor(a) for a in p) for p in chunk], list(range(len(chunk))))
        tokens = sum(len(p) + len(c) + len(p) + len(r) for p, c, r in chunk)
        return b, trainer.data_collator(rows[k * args.pairs:(k + 1) * args.pairs]), tokens

    def ours_step(b):
        loss, _ = dpo.loss(ours, b)
        (loss / args.pairs).backward()
        torch.nn.utils.clip_grad_norm_([p for p in ours.parameters() if p.requires_grad], 1.0)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def trl_step(inputs):
        trainer.training_step(trainer.model, inputs)
        torch.nn.utils.clip_grad_norm_([p for p in trainer.model.parameters() if p.requires_grad], 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    batches = [batch_of(k) for k in range(args.rounds * args.steps + 2)]
    ours_step(batches[0][0])  # warm-up (allocator, first-call costs) on both sides
    trl_step(batches[0][1])
    rates = {"ours": [], "trl": []}
    for r in range(args.rounds):
        sides = [("ours", ours_step, 0), ("trl", trl_step, 1)]
        for name, fn, i in (sides if r % 2 == 0 else sides[::-1]):
            chunk = batches[1 + r * args.steps: 1 + (r + 1) * args.steps]
            t0 = time.perf_counter()
            for b in chunk:
                fn(b[i])
            rates[name].append(sum(b[2] for b in chunk) / (time.perf_counter() - t0))
    ratios = [a / b for a, b in zip(rates["ours"], rates["trl"])]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, fp32")
    print(f"model: {args.n_layer} layers, {args.n_embd} wide ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M "
          f"parameters); {f'LoRA r={args.lora_r}' if args.lora_r else 'full DPO (frozen reference copy)'}; "
          f"{args.pairs} pairs a step; {args.rounds} rounds x {args.steps} steps per side")
    print(f"ours: {statistics.median(rates['ours']):,.0f} tokens/s (median; best {max(rates['ours']):,.0f})")
    print(f"TRL DPOTrainer: {statistics.median(rates['trl']):,.0f} tokens/s (median; best {max(rates['trl']):,.0f})")
    print(f"ours / TRL: {statistics.median(ratios):.2f}x (median of per-round ratios; min {min(ratios):.2f}, "
          f"max {max(ratios):.2f})")


def bench_packing(args):
    from custom_dataset import packed_preference_collate, plan_rows
    torch.manual_seed(0)
    T = 256
    config = GPT2Config(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, block_size=T)
    base = GPT2LMHeadModel(config)
    model, reference = copy.deepcopy(base).train(), copy.deepcopy(base).eval().requires_grad_(False)
    model.doc_attention = reference.doc_attention = args.doc_attention
    dpo = DPO(FinetuneDPOConfig(micro_batch_size=args.pairs), None)
    dpo.reference = reference
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    pairs = [tuple(torch.tensor(a) for a in p) for p in make_pairs(args.pass_pairs, contexts=(0, 16))]
    padded = [preference_collate(pairs[i:i + args.pairs], list(range(i, min(i + args.pairs, len(pairs)))),
                                 max_seq_length=T) for i in range(0, len(pairs), args.pairs)]
    lengths = [len(p) + len(c) - 1 + len(p) + len(r) - 1 for p, c, r in pairs]
    rows = [[(i, pairs[i]) for i in row] for row in plan_rows(lengths, 2 * T, seed=0, epoch=0)]
    packed = [packed_preference_collate(rows[i:i + args.pairs], 2 * T, max_seq_length=T)
              for i in range(0, len(rows), args.pairs)]
    tokens = sum(lengths)

    def padding(batches):
        return 1 - tokens / sum(b.input_ids.numel() for b in batches)

    def step(b):
        loss, _ = dpo.loss(model, b)
        (loss / b.index.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(padded[0])  # warm-up
    step(packed[0])
    rates = {"padded": [], "packed": []}
    for r in range(args.rounds):
        sides = [("padded", padded), ("packed", packed)]
        for name, batches in (sides if r % 2 == 0 else sides[::-1]):
            t0 = time.perf_counter()
            for b in batches:
                step(b)
            rates[name].append(tokens / (time.perf_counter() - t0))
    ratios = [a / b for a, b in zip(rates["packed"], rates["padded"])]
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} "
          f"cores, {torch.get_num_threads()} threads, fp32; model {args.n_layer} layers, {args.n_embd} wide; "
          f"{len(pairs)} pairs a pass (pair tokens {min(lengths)}-{max(lengths)}), {args.rounds} rounds; packed "
          f"attention: {args.doc_attention or 'the default'}")
    for name, batches in (("padded", padded), ("packed", packed)):
        print(f"{name}: {len(batches)} micro-batches, {sum(b.input_ids.size(0) for b in batches)} rows, padding "
              f"{padding(batches):.1%}, {statistics.median(rates[name]):,.0f} tokens/s (median; best "
              f"{max(rates[name]):,.0f})")
    print(f"packed / padded: {statistics.median(ratios):.2f}x (median of per-round ratios; min {min(ratios):.2f}, "
          f"max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
