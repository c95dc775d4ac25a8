"""finetune_dpo.py --pack=true trains exactly as without packing: a pair's chosen and rejected sequences share a
packed row as two documents, and the log-prob sums are taken per document, so on the same checkpoint and the same
pairs every step's loss and reward/logp metrics equal the unpacked run's (fp32, 1e-5). Unpacked DPO is checked
against TRL's DPOTrainer in test_dpo_trl.py, so this chains packed DPO to TRL."""
import pytest
import torch

import finetune_dpo
from custom_dataset import PreferenceLoader, packed_preference_collate
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.checkpoints.model import load_model, save_model
from utils.training.dpo import answer_logps
from utils.training.metrics import read_metrics

PAIRS, SEQ = 8, 128  # rows of 2 x 128 tokens: longer than the model's block_size (positions restart per document)
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, write_preference_data):
    root = tmp_path_factory.mktemp("dpo_packed")
    torch.manual_seed(0)
    save_model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=SEQ)), root / "base")
    write_preference_data(root / "data", n_train=PAIRS, n_val=8)
    rows = len(PreferenceLoader(root / "data" / "train.jsonl", 1, pack=True, max_seq_length=SEQ))
    assert rows < PAIRS / 2  # several pairs share a row
    return root, rows


def run(root, name, micro_batch_size, *extra):
    """Two steps of 1 micro-batch holding all the pairs (epoch 1, then epoch 2), a constant, large LR; the
    evaluation (by pair, unpacked: eval_iters x micro_batch_size pairs) reads all the validation pairs."""
    finetune_dpo.main([f"--pretrained_ckpt={root / 'base'}", f"--data_dir={root / 'data'}",
                       f"--ckpt_dir={root / name / 'ck'}", f"--log_dir={root / name / 'runs'}",
                       f"--micro_batch_size={micro_batch_size}", "--gradient_accum_steps=1", "--num_epochs=2",
                       f"--max_seq_length={SEQ}", "--max_lr=1e-2", "--min_lr=1e-2", "--warmup_steps=0",
                       "--eval_interval=0", f"--eval_iters={-(-PAIRS // micro_batch_size)}", "--ckpt_interval=0",
                       "--log_interval=1", "--mixed_precision=false", "--device=cpu", "--cpu_threads=1", *extra])
    return read_metrics(root / name / "runs")


@pytest.mark.parametrize("loss_type, extra", [("sigmoid", []),  # a frozen reference copy
                                              ("ipo", ["--beta=0.5", "--precompute_ref=true"])])  # per-token means
def test_packed_step_equals_unpacked(setup, loss_type, extra):
    root, rows = setup
    steps, evals = run(root, f"{loss_type}_unpacked", PAIRS, f"--loss_type={loss_type}", *extra)
    packed, packed_evals = run(root, f"{loss_type}_packed", rows, "--pack=true", f"--loss_type={loss_type}", *extra)
    assert sorted(steps) == sorted(packed) == [1, 2]
    assert abs(steps[2]["rewards/margins"]) > 1e-3  # step 2: the policy has moved, the rewards are not all 0
    for s in (1, 2):
        for k in METRICS:
            if s == 1 and k == "rewards/accuracies":
                # policy = reference: every reward is 0 up to rounding (the precomputed reference ran unpacked,
                # the policy packed), and [chosen > rejected] flips on that rounding; the rewards are checked
                assert abs(steps[1]["rewards/margins"]) < 1e-5
                continue
            assert abs(packed[s][k] - steps[s][k]) <= 1e-5, (s, k, packed[s][k], steps[s][k])
    for k in METRICS:  # the evaluation (by pair, unpacked) of the two runs' final models
        assert abs(packed_evals[2][f"eval_{k}"] - evals[2][f"eval_{k}"]) <= 1e-5, k


def test_row_mostly_padding(setup):
    """One pair alone in a row of 2 x 128 tokens: the padding (~200 tokens, more than block_size) still gets
    positions the model has; the pair's log-probs equal its unpacked ones."""
    root, _ = setup
    loader = PreferenceLoader(root / "data" / "train.jsonl", 1, shuffle=False, max_seq_length=SEQ)
    model = load_model(root / "base").eval()
    packed = packed_preference_collate([[(0, loader.pair(0))]], 2 * SEQ, max_seq_length=SEQ)
    assert (packed.labels == -100).sum() > SEQ
    with torch.no_grad():
        torch.testing.assert_close(answer_logps(model, packed), answer_logps(model, loader.collate([0])),
                                   rtol=0, atol=1e-5)
