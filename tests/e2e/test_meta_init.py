"""Meta-device init (utils/training/trainer.py::build_model): every rank builds the model on the meta
device, only rank 0 materialises the weights and broadcasts them. The sharded model must equal what one
plain process builds, with the seed's init (pretraining) or the checkpoint file's tensors (fine-tuning,
LoRA), and ranks other than 0 must never build the model with weights."""
import json

import pytest
import torch

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.checkpoints.model import save_model


@pytest.mark.parametrize("nproc", [1, 2])
def test_sharded_model_equals_the_plain_model_and_only_rank_0_builds_weights(tmp_path, run_script, nproc):
    torch.manual_seed(7)
    ckpt = save_model(GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny")), str(tmp_path / "base"))
    out = tmp_path / "result.json"
    run_script("tests/e2e/meta_init_worker.py", ckpt, out, nproc=nproc)
    results = json.loads(out.read_text())
    for kind, r in results.items():
        assert r["keys_equal"], kind
        assert r["max_weight_diff"] == 0.0, kind  # a broadcast copies bits
        assert r["max_logit_diff"] < 1e-5, kind
        assert [rank["built"] for rank in r["ranks"]] == [["cpu", "meta"]] + [["meta"]] * (nproc - 1), kind
        for rank in r["ranks"]:
            assert rank["tied"], kind  # lm_head still shares the embedding after to_empty and the load
            assert rank["trainable"] == r["trainable"], kind
            # each rank holds its shard only: 1/nproc of the parameters (FSDP2 pads dim 0 to a multiple)
            assert abs(rank["local_numel"] - r["numel"] / nproc) <= 0.01 * r["numel"], kind
    assert len(results["lora"]["trainable"]) == 2 * 2 * 2  # q and v, A and B, 2 layers
