"""Cross-entropy of the LM head that never holds the whole batch's fp32 logits.

`F.cross_entropy(lm_head(x).float(), targets)` materialises (N, V) logits in bf16, an fp32 copy,
an fp32 log-softmax and, in backward, an fp32 gradient of the same size plus zero-filled buffers
(N = B*T rows, V = 50257 columns: 2048 x 50257 is 400 MB per fp32 tensor). On CPU that memory
traffic and its page faults cost more than the LM-head matmul itself.

`linear_cross_entropy` instead walks over the rows in chunks small enough to stay in cache: for
each chunk it computes the logits, their log-sum-exp, the loss, and directly the gradient of the
loss w.r.t. the logits (softmax - one_hot, scaled by the reduction), written once into one
(N, V) buffer in the matmul dtype (bf16 under autocast). Backward is then two large matmuls:
grad_x = g @ W and grad_W = g^T @ x. Numerically it is the same computation as the plain path
(fp32 softmax, bf16 matmuls under autocast, exactly like autocast's own casts).
"""
import torch

IGNORE_INDEX = -100  # a target that carries no loss: prompt tokens and padding (PyTorch's default)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the LM-head matmul in (bf16 under bf16 autocast), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, mean, chunk_rows, dtype, need_grad, per_row=False):
        # x (N, C), weight (Vp, C), targets (N,) with -100 = ignored; matmuls in `dtype`.
        xc, wc = x.to(dtype), weight.to(dtype)
        N, Vp = x.size(0), weight.size(0)
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        safe_targets = torch.where(valid, targets, 0)
        # d(loss)/d(logits) carries the reduction's factor: 1 for sum, 1/count for mean.
        scale = 1.0 / count.clamp(min=1).float() if mean else torch.ones((), device=x.device)
        # All logits in one large matmul (small ones run far below peak), in the compute dtype;
        # chunk by chunk they are then overwritten by their gradient.
        g = xc @ wc.t()  # (N, Vp)
        losses = torch.empty(N, dtype=torch.float32, device=x.device)
        work = probs = None  # fp32 buffers reused by every chunk: no fresh pages to fault in each time
        for r0 in range(0, N, chunk_rows):
            r1 = min(r0 + chunk_rows, N)
            logits = g[r0:r1]  # (R, Vp): a contiguous view, overwritten in place by its gradient
            if Vp != vocab_size:
                logits[:, vocab_size:] = float("-inf")  # padding rows of the embedding take no probability
            if dtype == torch.float32:
                z = logits
            else:  # the softmax runs in fp32
                if work is None or work.size(0) != r1 - r0:
                    work = torch.empty(r1 - r0, Vp, dtype=torch.float32, device=x.device)
                z = work.copy_(logits)
            if probs is None or probs.size(0) != r1 - r0:
                probs = torch.empty(r1 - r0, Vp, dtype=torch.float32, device=x.device)
            t = safe_targets[r0:r1, None]
            v = valid[r0:r1, None]
            p = torch.softmax(z, dim=1, out=probs)  # one fused kernel: cheaper than max/exp/sum passes
            # log-sum-exp from the most probable class, whose probability (>= 1/V) cannot underflow:
            # lse = z_j - log p_j for any j. The loss is then lse - z_target, exact even for p_target = 0.
            lse = z.amax(dim=1, keepdim=True) - p.amax(dim=1, keepdim=True).log()
            losses[r0:r1] = torch.where(v, lse - z.gather(1, t), 0.0).squeeze(1)
            if need_grad:
                # (softmax - one_hot) * scale, in fp32; rows whose target is ignored get 0.
                p.scatter_add_(1, t, torch.where(v, -1.0, 0.0))
                p.mul_(torch.where(v, scale, 0.0))
                logits.copy_(p)
        if per_row:  # reduction "none": d(loss_i)/d(logits_i) is row i's alone; backward scales it by grad_i
            ctx.per_row = True
            if need_grad:
                ctx.save_for_backward(xc, wc, g)
                ctx.dtypes = (x.dtype, weight.dtype)
            return losses
        ctx.per_row = False
        loss = losses.sum()
        if mean:
            loss = loss / count  # NaN when no target counts, as F.cross_entropy(reduction="mean")
        if need_grad:
            ctx.save_for_backward(xc, wc, g)
            ctx.dtypes = (x.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        xc, wc, g = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        grad_x = grad_w = None
        if ctx.per_row:  # (N,) upstream gradients: scale the rows of g by them, through the smaller operand
            gl = grad_loss.to(torch.float32)[:, None]
            if ctx.needs_input_grad[0]:
                grad_x = ((g @ wc).float() * gl).to(x_dtype)  # (N, C)
            if ctx.needs_input_grad[1]:
                grad_w = (g.t() @ (xc.float() * gl).to(xc.dtype)).to(w_dtype)  # (Vp, C)
            return grad_x, grad_w, None, None, None, None, None, None, None
        # The matmuls round to the compute dtype, as under autocast; the loss's own gradient is
        # applied after, in the parameters' dtype.
        if ctx.needs_input_grad[0]:
            grad_x = (g @ wc).to(x_dtype).mul_(grad_loss)  # (N, C)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ xc).to(w_dtype).mul_(grad_loss)  # (Vp, C)
        return grad_x, grad_w, None, None, None, None, None, None, None


def linear_cross_entropy(x, weight, targets, vocab_size=None, reduction="mean", chunk_rows=None):
    """F.cross_entropy(x @ weight[:vocab_size].T, targets, ignore_index=-100, reduction=reduction).

    x (..., C) hidden states, weight (Vp, C) the LM head (rows past `vocab_size` are padding and
    never take probability), targets (...) token ids with -100 ignored; reduction "mean" or "sum".
    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as autocast
    would run `F.cross_entropy(lm_head(x).float(), ...)`.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    vocab_size = weight.size(0) if vocab_size is None else vocab_size
    if chunk_rows is None:
        # CPU: chunks that stay in cache. GPU: few large chunks; every chunk costs ~20 kernel launches, and at
        # 32 rows an 8x1024 micro-batch took ~5,000 of them (two fp32 (1024, V) buffers: 400 MB at V = 50304).
        chunk_rows = 1024 if x.device.type == "cuda" else 32
    # Under no_grad (evaluation) ctx.needs_input_grad still says True for parameters: ask autograd itself.
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    dtype = _compute_dtype(x)
    shape = targets.shape
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (N, C), (N,)
    keep = None
    if x.device.type == "cpu":
        # Fine-tuning: prompt and padding rows (most of a padded batch) need no logits at all. Not on CUDA,
        # where selecting rows by a mask waits for the GPU (a host sync per call); the chunks mask them instead.
        keep = targets != IGNORE_INDEX
        if bool(keep.all()):
            keep = None
        else:
            x, targets = x[keep], targets[keep]  # (n, C), (n,)
    per_row = reduction == "none"
    loss = _LinearCrossEntropy.apply(x, weight, targets, vocab_size, reduction == "mean", chunk_rows, dtype, need_grad,
                                     per_row)
    if not per_row:
        return loss
    # Back to every position, 0 where the target is ignored: a new tensor (FSDP warns about returning a view).
    keep = torch.ones(shape, dtype=torch.bool, device=loss.device) if keep is None else keep.view(shape)
    return loss.new_zeros(shape).masked_scatter(keep, loss)
