"""A step whose gradient is not finite is never taken, and never saved."""
import pytest
import torch

import pretrain
from models.gpt2 import GPT2LMHeadModel
from utils.checkpoints.training import list_checkpoints, step_dir_name


class _InfGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); the gradient flowing back through it becomes inf/nan."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _PoisonedAtStep2(GPT2LMHeadModel):
    """The model, with the backward of its second training forward (step 2, no accumulation) poisoned."""

    def __init__(self, config):
        super().__init__(config)
        self.training_forwards = 0
        self.transformer.ln_f.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if torch.is_grad_enabled():  # evaluation runs under no_grad
            self.training_forwards += 1
            if self.training_forwards == 2:
                return _InfGradient.apply(output)


def test_non_finite_gradient_norm_stops_before_the_step(tmp_path, capsys, monkeypatch, write_pretrain_data):
    """Issue 13 minor 7: only the loss was checked, so step 2 was taken and saved with nan weights."""
    write_pretrain_data(tmp_path / "data", n_docs=400)
    monkeypatch.setattr(pretrain, "GPT2LMHeadModel", _PoisonedAtStep2)
    args = ["--model_type=gpt2-tiny", "--max_seq_length=32", "--mixed_precision=false", "--device=cpu",
            "--cpu_threads=1", "--micro_batch_size=2", "--gradient_accum_steps=1", "--max_train_iters=4",
            "--ckpt_interval=1", "--eval_interval=0", "--eval_iters=1", f"--data_dir={tmp_path / 'data'}",
            f"--ckpt_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'runs'}"]
    with pytest.raises(SystemExit) as e:
        pretrain.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    assert "gradient norm is nan at step 2: training diverged" in err or "gradient norm is inf at step 2" in err, err
    assert f"the last good checkpoint is {tmp_path / 'ckpt' / step_dir_name(1)}" in err
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt")] == [1]
