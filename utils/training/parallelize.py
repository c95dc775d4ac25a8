"""Parallelism applied to a plain GPT2LMHeadModel from the outside (torchtitan's order):
activation checkpointing -> torch.compile -> FSDP2 sharding, each per transformer block.
"""
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_activation_checkpointing(model):
    """Recompute each block's activations in backward instead of storing them."""
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        # The wrapper strips its own prefix from state-dict keys, so checkpoints are unaffected.
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(model, dynamic=False):
    """torch.compile each block in place (same parameter names; one graph reused by all blocks).

    dynamic=True for batches padded to their longest row (fine-tuning): one graph with a symbolic length,
    instead of a recompile for every new length and, after 8 of them, a silent fall back to eager.
    """
    for block in model.transformer.h:
        block.compile(dynamic=dynamic)


def offloads(cpu_offload, info) -> bool:
    """cpu_offload keeps the shards in host memory on CUDA; on a CPU run they are there already."""
    return cpu_offload and info.device.type == "cuda"


def apply_fsdp(model, info, mixed_precision: bool = False, cpu_offload: bool = False):
    """Shard every block, then the root (embeddings, final LayerNorm, tied lm_head), over all ranks.

    mixed_precision: bf16 parameters for compute, fp32 gradient reduction, fp32 master weights.
    """
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if offloads(cpu_offload, info) else OffloadPolicy()
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def parallelize(model, info, mixed_precision=False, activation_checkpointing=False, compile_model=False,
                cpu_offload=False, dynamic_shapes=False):
    """Apply all of it to a model on the meta device (then materialize it) or on the
    CPU: fully_shard moves each unit's shards to the device as it shards it (with cpu_offload keeps them on
    the CPU), so the whole model never sits on one GPU."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_model:
        apply_compile(model, dynamic=dynamic_shapes)
    return apply_fsdp(model, info, mixed_precision=mixed_precision, cpu_offload=cpu_offload)


def materialize(model, info, cpu_offload=False, full_state=None):
    """Allocate the shards of a model sharded on the meta device and, given `full_state` (rank 0: the full
    CPU state dict, the other ranks: {}), fill them: each tensor is broadcast in turn and every rank keeps
    its shard of it. Without it the shards stay uninitialised, for a checkpoint to overwrite."""
    model.to_empty(device="cpu" if offloads(cpu_offload, info) else info.device)
    if full_state is not None:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state, options=options)
    return model


def local_bytes(t) -> int:
    """Bytes this rank holds of `t`: its shard of a DTensor, or all of a plain tensor."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def gradient_bytes(model) -> int:
    """Bytes of gradient this rank holds now: its shards' .grad, plus the unsharded gradients FSDP2 keeps
    while micro-steps accumulate without reduce-scatter (read from FSDP2's internal FSDPParam fields)."""
    total = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for fsdp_param in group.fsdp_params if group else ():
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            for grad in (fsdp_param.unsharded_accumulated_grad, unsharded.grad if unsharded is not None else None):
                total += local_bytes(grad) if grad is not None else 0
    return total
