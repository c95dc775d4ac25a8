"""Issue 20 item 2, the parts a CPU can check (the CUDA run is tests/gpu/test_gpu.py): the step's scalars are read
to the host in one place whatever their devices, and --defer_grad_sync=auto defers only for offloaded gradients
with accumulation."""
import pytest
import torch

from configs.parser import ConfigError, load_config
from configs.pretrain import PretrainConfig
from utils.training.distributed import DistInfo
from utils.training.trainer import defers_grad_sync, to_host


def info(device):
    return DistInfo(rank=0, local_rank=0, world_size=2, local_world_size=2, device=torch.device(device),
                    backend="gloo")


@pytest.mark.parametrize("device, offload, accum, setting, expected", [
    ("cuda", True, 4, "auto", True),    # offloaded gradients, accumulation: one copy to the host per step
    ("cuda", True, 1, "auto", False),   # nothing to accumulate
    ("cuda", False, 4, "auto", False),  # shards on the GPU: reduce-scatter per micro-step keeps memory low
    ("cpu", True, 4, "auto", False),    # cpu_offload means nothing on a CPU run
    ("cuda", True, 4, False, False),    # an explicit setting is kept
    ("cpu", False, 4, True, True),
])
def test_auto_defers_the_gradient_sync_only_for_offloaded_accumulation(device, offload, accum, setting, expected):
    cfg = PretrainConfig(cpu_offload=offload, gradient_accum_steps=accum, defer_grad_sync=setting)
    assert defers_grad_sync(cfg, info(device)) is expected


def test_defer_grad_sync_flag_takes_auto_true_false_only():
    assert load_config(PretrainConfig, []).defer_grad_sync == "auto"
    assert load_config(PretrainConfig, ["--defer_grad_sync=true"]).defer_grad_sync is True
    assert load_config(PretrainConfig, ["--defer_grad_sync=false"]).defer_grad_sync is False
    with pytest.raises((ConfigError, SystemExit)):
        load_config(PretrainConfig, ["--defer_grad_sync=sometimes"])


def test_to_host_reads_scalars_of_any_dtype_exactly():
    loss, norm, count = torch.tensor(2.5), torch.tensor(0.3, dtype=torch.bfloat16), torch.tensor(7)
    assert to_host(loss, norm, count) == [2.5, float(norm), 7.0]
    assert all(type(v) is float for v in to_host(loss, norm))
