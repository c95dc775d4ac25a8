"""The chunked LM-head cross-entropy (models/loss.py) against plain F.cross_entropy: values and gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.loss import linear_cross_entropy


def reference(x, w, targets, vocab_size, reduction):
    logits = (x @ w.t())[..., :vocab_size]  # padded rows sliced off, as the model does
    return F.cross_entropy(logits.float().reshape(-1, vocab_size), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def loss_and_grads(fn, x, w, *args):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(x, w, *args)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("vocab_size, padded", [(1000, 1000), (1000, 1024)])
@pytest.mark.parametrize("chunk_rows", [7, 64])
def test_matches_cross_entropy_fp32(reduction, vocab_size, padded, chunk_rows):
    torch.manual_seed(0)
    x = torch.randn(3, 21, 32)
    w = torch.randn(padded, 32) * 0.5
    targets = torch.randint(0, vocab_size, (3, 21))
    targets[0, :9] = -100  # ignored positions, a whole stretch of them
    targets[2, -1] = -100
    ours = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk_rows),
                          x, w, targets, vocab_size, reduction)
    ref = loss_and_grads(reference, x, w, targets, vocab_size, reduction)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6)  # grad of the hidden states
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-5, atol=1e-6)  # grad of the LM head
    assert torch.all(ours[2][vocab_size:] == 0)  # padding rows learn nothing
    assert ours[1].shape == x.shape and ours[2].shape == w.shape


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_cross_entropy_bf16_autocast(reduction):
    """Under autocast both paths run the matmuls in bf16 and the softmax in fp32."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 64)
    w = torch.randn(1088, 64) * 0.2
    targets = torch.randint(0, 1050, (2, 40))
    targets[1, 30:] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=16), x, w, targets, 1050, reduction)
        ref = loss_and_grads(reference, x, w, targets, 1050, reduction)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == x.dtype and ours[2].dtype == w.dtype
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(ours[1:], ref[1:]):
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()  # bf16 rounding of the matmul outputs


def test_extreme_logits_and_all_ignored():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[200.0, 0.0], [0.0, 0.0], [-200.0, 0.0]])  # p(target) underflows to 0 in row 0
    targets = torch.tensor([2, 1])
    ours = loss_and_grads(linear_cross_entropy, x, w, targets, 3, "sum")
    ref = loss_and_grads(reference, x, w, targets, 3, "sum")
    torch.testing.assert_close(ours[0], ref[0])  # 400 + log(1 + ...), finite
    torch.testing.assert_close(ours[1], ref[1])
    torch.testing.assert_close(ours[2], ref[2])
    none = torch.full((2,), -100)
    assert linear_cross_entropy(x, w, none, 3, "sum").item() == 0.0
    assert torch.isnan(linear_cross_entropy(x, w, none, 3, "mean"))  # like F.cross_entropy


def test_no_grad_and_bad_reduction():
    x, w, t = torch.randn(5, 8, requires_grad=True), torch.randn(16, 8), torch.randint(0, 16, (5,))
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(x.detach(), w, t, 16, "mean"))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, t, reduction="max")


def test_per_token_losses_and_their_gradients():
    """reduction="none" (DPO's per-answer sums): F.cross_entropy's per-token losses and, for any weighting of
    them, the same gradients; ignored targets give 0."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 8, requires_grad=True), torch.randn(13, 8, requires_grad=True)
    t = torch.randint(0, 11, (3, 5))
    t[0, :2] = -100
    weights = torch.randn(3, 5)
    ours = linear_cross_entropy(x, w, t, vocab_size=11, reduction="none")
    (ours * weights).sum().backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = F.cross_entropy((x @ w[:11].T).reshape(-1, 11), t.reshape(-1), reduction="none").view(3, 5)
    (ref * weights).sum().backward()
    assert ours.shape == t.shape and bool((ours[0, :2] == 0).all())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [1, 64])
def test_model_return_logits_false_same_loss_and_grads(pad):
    """The training call (return_logits=False) gives the loss and gradients of the default call."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=pad))
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.randint(0, 50257, (2, 16))
    targets[0, :4] = -100
    grads = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, targets, reduction="sum", return_logits=return_logits)
        assert (logits is None) == (not return_logits)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-4)
    for name, g in grads[0][1].items():  # fp32 rounding only (sums in another order)
        assert (grads[1][1][name] - g).abs().max() <= 1e-5 * g.abs().max(), name


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_chunked_loss_under_no_grad_computes_no_gradient():
    torch.manual_seed(0)
    x, w = torch.randn(64, 16, requires_grad=True), torch.randn(96, 16, requires_grad=True)
    t = torch.randint(0, 96, (64,))
    with _Ops() as with_grad:
        loss = linear_cross_entropy(x, w, t, reduction="sum")
    with torch.no_grad(), _Ops() as no_grad:
        loss_ng = linear_cross_entropy(x, w, t, reduction="sum")
    ref = torch.nn.functional.cross_entropy(x @ w.T, t, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and loss_ng.item() == pytest.approx(ref.item(), rel=1e-5)
    grad_ops = [n for n in with_grad.names if "scatter_add" in n]
    assert grad_ops, "the gradient is computed in forward when it is needed"
    assert not [n for n in no_grad.names if "scatter_add" in n]  # (softmax - one_hot) never formed under no_grad
