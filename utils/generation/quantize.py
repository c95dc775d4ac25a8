"""int8 weight-only quantisation for decoding: every nn.Linear of the blocks and the (untied) LM head.

Per output channel c: scale[c] = max|W[c, :]| / 127, W_int8 = round(W / scale) in [-127, 127], so
y = (x @ W_int8.T) * scale + b. Activations stay in floating point (weight-only: no calibration data).

Why it is faster: a batch-1 decode step reads every weight once and is bound by memory bandwidth;
int8 weights are a quarter of fp32's bytes. That only pays with a kernel that reads the int8 bytes
directly; dequantising to fp32 per call reads them and then writes and reads a full fp32 copy.
The kernels, measured (bench/int8_matmul.py, BENCHMARKS.md "Decoding"):
  * CPU: torch.ops.aten._weight_int8pack_mm. With fp32 activations it is 5-10x slower than a dense
    fp32 matmul (AVX2 here; Zen 4 too), with bf16 activations it runs from the int8 bytes. So on CPU
    the activation is cast to bf16 for the matmul and the result back to fp32 ("int8pack").
  * CUDA: F.linear(x, W_int8.to(x.dtype)) * scale, which torch.compile fuses into one kernel that
    reads int8 (gpt-fast's int8 path) ("dequant"). Eager CUDA dequantises per call: use --compile.
Many rows at once (prefill, evaluation) are compute-bound: there "dequant" is used everywhere, in
the activations' dtype, so evaluation scores the int8 weights without bf16 activation rounding.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = ("int8pack", "dequant")
SMALL_ROWS = 16  # up to this many rows (decode steps, speculative checks) take the int8 kernel


def quantize_per_channel(weight):
    """(N, K) float -> (int8 (N, K), fp32 scale (N,)) with absmax scaling per output row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row (vocab padding) stays zero
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights and per-output-channel fp32 scales."""

    def __init__(self, weight_int8, scale, bias=None, kernel="dequant", act_dtype=torch.bfloat16):
        super().__init__()
        assert kernel in KERNELS, kernel
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)  # (N, K) int8
        self.register_buffer("scale", scale)              # (N,) fp32
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernel, self.act_dtype = kernel, act_dtype
        # _weight_int8pack_mm takes its scales in the activations' dtype
        self.register_buffer("scale_act", scale.to(act_dtype) if kernel == "int8pack" else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel="dequant", act_dtype=torch.bfloat16):
        q, scale = quantize_per_channel(linear.weight)
        return cls(q, scale, linear.bias, kernel, act_dtype)

    @property
    def weight(self):
        """The dequantised weight (N, K): what the int8 model computes with (the chunked loss reads it)."""
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x):
        rows = x.numel() // self.in_features
        if self.kernel == "int8pack" and rows <= SMALL_ROWS:
            x2 = x.reshape(rows, self.in_features).to(self.act_dtype)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale_act)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def default_kernel(device) -> str:
    return "int8pack" if torch.device(device).type == "cpu" else "dequant"


def quantize_int8(model, kernel=None):
    """Replace the model's nn.Linear layers (blocks and LM head) with Int8Linear, in place; returns it.

    The LM head is tied to the token embedding: the head becomes int8, the embedding keeps its float
    weights (a decode step reads one row of it, the head reads all of them).
    """
    device = next(model.parameters()).device
    kernel = kernel or default_kernel(device)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, Int8Linear.from_linear(linear, kernel).to(device))
    return model


def int8_bytes(model) -> int:
    """Bytes of int8 weights in the model (for the one-line summary)."""
    return sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Linear))
