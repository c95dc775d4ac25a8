"""The LR schedule, by hand."""
import pytest

from utils.training.optim import lr_at


def test_first_step_learns_and_warmup_reaches_max_lr():
    # init_lr=0, max_lr=1e-3, 4 warmup steps: steps 1..4 take 2.5e-4, 5e-4, 7.5e-4, 1e-3 (by hand).
    lrs = [lr_at(s, 0.0, 1e-3, 1e-4, 4, 10) for s in range(10)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[9] < lrs[5] and lr_at(10, 0.0, 1e-3, 1e-4, 4, 10) == 1e-4
