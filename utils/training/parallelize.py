"""Parallelism applied to a plain GPT2LMHeadModel from the outside (torchtitan's order):
activation checkpointing -> torch.compile -> FSDP2 sharding, each per transformer block.
"""
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_activation_checkpointing(model):
    """Recompute each block's activations in backward instead of storing them."""
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        # The wrapper strips its own prefix from state-dict keys, so checkpoints are unaffected.
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(model):
    """torch.compile each block in place (same parameter names; one graph reused by all blocks)."""
    for block in model.transformer.h:
        block.compile(dynamic=False)


def apply_fsdp(model, info, mixed_precision: bool = False, cpu_offload: bool = False):
    """Shard every block, then the root (embeddings, final LayerNorm, tied lm_head), over all ranks.

    mixed_precision: bf16 parameters for compute, fp32 gradient reduction, fp32 master weights.
    """
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload and info.device.type == "cuda" else OffloadPolicy()
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def parallelize(model, info, mixed_precision=False, activation_checkpointing=False, compile_model=False, cpu_offload=False):
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_model:
        apply_compile(model)
    return apply_fsdp(model, info, mixed_precision=mixed_precision, cpu_offload=cpu_offload)
