"""int8 for decoding: every nn.Linear of the blocks and the (untied) LM head.

Per output channel c: scale[c] = max|W[c, :]| / 127, W_int8 = round(W / scale) in [-127, 127], so
y = (x @ W_int8.T) * scale + b. No calibration data.

Why it is faster: a batch-1 decode step reads every weight once and is bound by memory bandwidth;
int8 weights are a quarter of fp32's bytes. That only pays with a kernel that multiplies the int8
bytes as they come. The kernels, measured (bench/int8_matmul.py, BENCHMARKS.md "Decoding"):
  * x86 CPUs: "w8a8", fbgemm's int8 GEMM (torch's "x86" quantized engine). Each activation row is
    quantised on its own to 7-bit codes, so the product is integer arithmetic and a row's result does
    not depend on its batch. gpt2, 1 thread, AVX2: 12 ms a token for all weights, against 23 ms for
    "int8pack" and 28-34 ms dense fp32. Used at every batch size (evaluation scores these numbers).
  * Other CPUs: "int8pack", torch.ops.aten._weight_int8pack_mm. With fp32 activations it is 5-10x
    slower than a dense fp32 matmul (AVX2 here; Zen 4 too), with bf16 activations it runs from the
    int8 bytes. So the activation is cast to bf16 for the matmul and the result back, for up to
    SMALL_ROWS rows; more rows (prefill, evaluation) take "dequant".
  * CUDA: "dequant", F.linear(x, W_int8.to(x.dtype)) * scale, which torch.compile fuses into one
    kernel that reads int8 (gpt-fast's int8 path). Eager CUDA dequantises per call: use --compile.
"""
import itertools
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = {  # name -> what it computes (the generation scripts print it)
    "w8a8": "int8 weights x 7-bit activations per row, fbgemm's int8 GEMM",
    "int8pack": "int8 weight-only, torch.ops.aten._weight_int8pack_mm with bf16 activations",
    "dequant": "int8 weight-only, dequantised into the matmul (fused by --compile)",
}
SMALL_ROWS = 16  # up to this many rows (decode steps, speculative checks) take the int8pack kernel


# ------------------------------------------------------------------ the x86 int8 x int8 kernel (fbgemm)

def w8a8_available() -> bool:
    """fbgemm's int8 GEMM (torch's "x86" quantized engine): x86 CPUs with AVX2 or newer."""
    return ("x86" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
            and hasattr(torch, "_make_per_channel_quantized_tensor"))


# fbgemm's packed weights are a torch.classes object, which dynamo cannot put in a graph; the op below
# takes an integer key into this table instead, so the compiled decoder calls fbgemm directly.
_PACKED = {}
_keys = itertools.count()
_LIB = torch.library.Library("minigpt", "DEF")
_LIB.define("int8_codes_mm(Tensor codes, int key, int out_features) -> Tensor")


def _int8_codes_mm(codes, key, out_features):
    """codes (R, K) fp32 holding integers in [0, 127] -> (R, N) = codes @ (W_int8 * scale).T, by fbgemm."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default(codes, 1.0, 0, _PACKED[key])


_LIB.impl("int8_codes_mm", _int8_codes_mm, "CPU")


@torch.library.register_fake("minigpt::int8_codes_mm")
def _(codes, key, out_features):
    return codes.new_empty(codes.shape[0], out_features)


def _pack_for_fbgemm(weight_int8, scale):
    """fbgemm's packed layout of W_int8 with per-row scales (a copy: the int8 buffer stays for .weight)."""
    zero = torch.zeros(scale.numel(), dtype=torch.long)
    with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; fbgemm still takes them
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(weight_int8.cpu(), scale.double().cpu(), zero, 0)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "x86"
        try:
            return torch.ops.quantized.linear_prepack(q, None)
        finally:
            torch.backends.quantized.engine = engine


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
        # w8a8: sum_k W[n, k] (dequantised), for the activations' zero point
        self.register_buffer("weight_sum", (weight_int8.float().sum(1) * scale) if kernel == "w8a8" else None)
        self._pack()

    def _pack(self):
        """w8a8: pack the weights for fbgemm under a fresh key, dropped with this module (copies repack)."""
        self.key = None
        if self.kernel == "w8a8":
            self.key = next(_keys)
            _PACKED[self.key] = _pack_for_fbgemm(self.weight_int8, self.scale)
            weakref.finalize(self, _PACKED.pop, self.key, None)

    def __setstate__(self, state):  # copy.deepcopy and pickle: the copy gets its own packed weights
        super().__setstate__(state)
        self._pack()

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
        if self.kernel == "w8a8":
            y = self._w8a8(x.reshape(rows, self.in_features).float())
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        elif self.kernel == "int8pack" and rows <= SMALL_ROWS:
            x2 = x.reshape(rows, self.in_features).to(self.act_dtype)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale_act)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _w8a8(self, x):
        """x (R, K) fp32 -> (R, N): each row quantised on its own to 7-bit codes (asymmetric: the row's
        min to max in 127 steps), multiplied by the int8 weights in fbgemm's int8 GEMM.

        x ~= lo + codes * step, so x @ W.T ~= (codes @ W.T) * step + lo * sum_k W[:, k]. 7 bits, not 8:
        AVX2 adds pairs of u8 x s8 products in int16, which 2 x 127 x 127 cannot overflow. Each row
        is quantised alone, so a row's result does not depend on the other rows (batching, speculation).
        """
        lo, hi = torch.aminmax(x, dim=1, keepdim=True)
        step = (hi - lo).clamp_min(1e-30) / 127                      # (R, 1)
        codes = torch.round((x - lo) / step)                          # (R, K) integers in [0, 127]
        return torch.ops.minigpt.int8_codes_mm(codes, self.key, self.out_features) * step + lo * self.weight_sum

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def default_kernel(device) -> str:
    """CPU: fbgemm's int8 GEMM where torch has it (x86), else int8pack; CUDA: dequant (fused by compile)."""
    if torch.device(device).type != "cpu":
        return "dequant"
    return "w8a8" if w8a8_available() else "int8pack"


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
