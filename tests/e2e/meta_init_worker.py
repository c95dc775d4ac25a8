"""Run by test_meta_init.py, alone or under torchrun: build each task's model with the training loop's
build_model (meta-device init, FSDP2, weights broadcast from rank 0), then write, from rank 0, how it
compares with the same model built in one plain process.

    python tests/e2e/meta_init_worker.py CKPT_DIR OUT.json [cpu|cuda] [offload]
"""
import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from configs.finetune import FinetuneConfig
from configs.finetune_lora import FinetuneLoRAConfig
from configs.pretrain import PretrainConfig
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.lora import apply_lora, mark_only_lora_trainable
from utils.checkpoints.training import gather_model_state_dict
from utils.training.distributed import distributed_run
from utils.training.finetuning import load_pretrained
from utils.training.trainer import TrainTask, build_model


def user_config(kind, ckpt, cpu_offload):
    """The script's config with every default users run (mixed_precision=auto, fine-tuning's dropout 0.1,
    LoRA r 8 / alpha 32 on q, v), plus activation checkpointing (its wrapper renames the parameters)."""
    cfg = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "lora": FinetuneLoRAConfig}[kind]()
    cfg.pretrained_ckpt, cfg.activation_checkpointing, cfg.cpu_offload = ckpt, True, cpu_offload
    return cfg


def plain_model(kind, cfg, device):
    """What each script's build_model returns: a model initialised from the seed, a checkpoint, LoRA on it."""
    if kind == "pretrain":
        with torch.device(device):
            return GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", embed_dropout=cfg.embed_dropout,
                                                          attn_dropout=cfg.attn_dropout,
                                                          resid_dropout=cfg.resid_dropout))
    model = load_pretrained(cfg, device)
    if kind == "lora":
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        mark_only_lora_trainable(model, cfg.train_bias, cfg.train_embeddings)
    return model


def reference(kind, cfg):
    """The model a single plain process builds: the seed's init, or the checkpoint file's tensors."""
    torch.manual_seed(cfg.seed)
    model = plain_model(kind, cfg, "cpu")
    if kind != "pretrain":  # the weights straight from the file, not through our loader
        file = load_file(f"{cfg.pretrained_ckpt}/model.safetensors")
        model.load_state_dict({**model.state_dict(), **file, "lm_head.weight": file["transformer.wte.weight"]})
    return model.eval()


def check(kind, ckpt, info, cpu_offload):
    cfg = user_config(kind, ckpt, cpu_offload)
    built = []

    def recording_build(device):
        built.append(device)
        return plain_model(kind, cfg, device)

    task = TrainTask(kind, model_config=None, build_model=recording_build, make_loader=None, save_final=None,
                     check_data=None)
    torch.manual_seed(999 + info.rank)  # build_model must not depend on the RNG state it finds
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, _, bf16 = build_model(cfg, task, info)
    gpu_peak = torch.cuda.max_memory_allocated() if info.device.type == "cuda" else 0  # while building
    x = (torch.arange(32).view(2, 16) % 100).to(info.device)
    with torch.no_grad():
        logits, _ = model.eval()(x)  # every rank takes part: FSDP2 gathers each block's parameters
    full = gather_model_state_dict(model)
    local = {"rank": info.rank, "built": built, "tied": model.lm_head.weight is model.transformer.wte.weight,
             "local_numel": sum(p.to_local().numel() for p in model.parameters()), "gpu_peak_bytes": gpu_peak,
             "shard_devices": sorted({p.to_local().device.type for p in model.parameters()}),
             "trainable": sorted(n.replace("_checkpoint_wrapped_module.", "")
                                 for n, p in model.named_parameters() if p.requires_grad)}
    ranks = [None] * info.world_size
    dist.all_gather_object(ranks, local)
    if not info.is_main:
        return None
    ref = reference(kind, cfg)
    ref_sd = ref.state_dict()
    with torch.no_grad():
        ref_logits, _ = ref(x.cpu())
    return {"ranks": ranks, "bf16": bf16, "keys_equal": sorted(full) == sorted(ref_sd),
            "max_weight_diff": max((full[k].float() - ref_sd[k].float()).abs().max().item() for k in ref_sd),
            "max_logit_diff": (logits.float().cpu() - ref_logits).abs().max().item(),
            "numel": sum(p.numel() for p in ref.parameters()),
            "largest_tensor_bytes": max(p.numel() * p.element_size() for p in ref.parameters()),
            "trainable": sorted(n for n, p in ref.named_parameters() if p.requires_grad)}


def main(ckpt, out_path, device="cpu", offload=""):
    with distributed_run(device, prog="meta_init_worker.py") as info:
        results = {kind: check(kind, ckpt, info, offload == "offload") for kind in ("pretrain", "finetune", "lora")}
        if info.is_main:
            with open(out_path, "w") as f:
                json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
