"""Run by test_precision_choice.py under torchrun: ranks whose own bf16 timings disagree (rank 0 finds bf16 slow,
the others fast) build the model with the training loop's build_model and mixed_precision=auto; rank 0 writes
what each rank chose and the compute dtype FSDP2 was given.

    torchrun --nproc_per_node 2 tests/e2e/precision_worker.py OUT.json
"""
import json
import sys

import torch
import torch.distributed as dist

import utils.hardware
from configs.pretrain import PretrainConfig
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.training.distributed import distributed_run
from utils.training.trainer import TrainTask, build_model


def main(out):
    with distributed_run("cpu") as info:
        # What a rank's own timing could say on a machine whose cores differ, or under a noisy neighbour.
        speedup = 0.02 if info.is_main else 3.0
        utils.hardware.bf16_speedup = lambda device="cpu": speedup
        cfg = PretrainConfig(model_type="gpt2-tiny", mixed_precision="auto")

        def build(device):
            with torch.device(device):
                return GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny"))

        task = TrainTask("pretrain", model_config=None, build_model=build, make_loader=None, save_final=None,
                         check_data=None)
        model, _, bf16 = build_model(cfg, task, info)
        param_dtype = model._get_fsdp_state()._mp_policy.param_dtype
        mine = {"rank": info.rank, "bf16": bf16, "param_dtype": str(param_dtype)}
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, mine)
        if info.is_main:
            with open(out, "w") as f:
                json.dump(gathered, f)


if __name__ == "__main__":
    main(sys.argv[1])
