"""Loading a model to generate with: a checkpoint, a LoRA adapter attached in memory, the decode layout."""
import itertools

import torch

from utils.checkpoints.model import load_model


def load_for_generation(checkpoint, lora=None, device="cpu", dtype="float32"):
    """The model to generate with, in eval mode: a model checkpoint, plus a LoRA adapter attached
    in memory (not merged to disk) when `lora` is a directory.

    dtype "bfloat16" stores the weights in bf16; run it under bf16 autocast (Streamer does). Autocast
    over fp32 weights instead would re-cast every weight at every step: 3x slower decoding on CPU.
    """
    model = load_model(checkpoint, device="cpu")
    if lora is not None:
        from utils.checkpoints.adapter import attach_adapter
        model, _ = attach_adapter(model, lora, base_dir=checkpoint)
    model.requires_grad_(False)
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    return decode_layout(model.to(device).eval())


def decode_layout(model):
    """On CPU, keep every nn.Linear weight column-major: same values and shapes, transposed memory.

    Decoding multiplies one row vector by every weight, so it is bound by reading the weights, and
    on CPU the BLAS streams an (in, out)-major matrix markedly faster than the (out, in) one
    nn.Linear keeps (gpt2 124M, 1 thread: ~30% more tokens/s; bench/generate_throughput.py). Each
    weight is copied once, in place: no extra memory. For inference only (training keeps nn.Linear's layout).
    """
    if next(model.parameters()).device.type != "cpu":
        return model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.is_contiguous():  # the tied lm_head/wte: once
                m.weight.data = m.weight.data.t().contiguous().t()
    return model


def prepare_for_decode(model, quantize=None, compile=False, speculate=None):
    """The model ready for `model.generate(idx, max_new_tokens, temperature=..., top_k=..., top_p=...)`.

    quantize: None / "none", or "int8" (utils/generation/quantize.py: int8 weights, a scale per output
      channel; on x86 CPUs int8 products with each activation row quantised alone, elsewhere weight-only).
    compile: torch.compile the decoder's forward over a static KV cache, once per shape: the prompt
      prefill (prompts right-padded to a power-of-two bucket), the one-token step, and the speculative
      check; on CUDA with CUDA graphs. Nothing recompiles per token or per prompt length within a
      bucket. Without compile the same static-cache path runs eagerly. The compiled decoder belongs
      to this model, which must not change afterwards (dynamo does not re-check its modules).
      True means inductor; a torch.compile backend (a name such as "eager", or a callable) may be given (tests).
    speculate: None / "none", or "lookup" (prompt-lookup drafting, greedy only) as the default of
      `generate(..., speculate=...)`.
    Equal-length prompts take the static path; ragged batches keep the growing cache (same results).
    The model is put in eval mode, frozen, and changed in place; it is returned.
    """
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"quantize must be None, 'none' or 'int8', got {quantize!r}")
    if speculate not in (None, "none", "lookup"):
        raise ValueError(f"speculate must be None, 'none' or 'lookup', got {speculate!r}")
    model.eval().requires_grad_(False)
    if quantize == "int8":
        from utils.generation.quantize import quantize_int8
        quantize_int8(model)
    decode_layout(model)
    forwards = {name: _forward_fn(model, name) for name in ("prefill", "step", "verify")}
    device = model.transformer.wte.weight.device
    if compile:
        import torch._dynamo.config
        # One graph per prompt bucket x cache bucket for the prefill: more than dynamo's default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        backend = "inductor" if compile is True else compile
        # The decoder is compiled for this frozen model (each function's own code object, below), so
        # dynamo need not re-check the model's modules at every call: 5-10% of a gpt2 int8 step on CPU.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if backend == "inductor":
            # CUDA: CUDA graphs (what mode="reduce-overhead" sets). CPU: the graph's wrapper in C++, not Python
            # (9% of a gpt2 int8 step in one comparison); it costs a C++ compile on the first call.
            options["triton.cudagraphs" if device.type == "cuda" else "cpp_wrapper"] = True
        forwards = {name: torch.compile(fn, backend=backend, dynamic=False, fullgraph=True, options=options)
                    for name, fn in forwards.items()}
    model.decode_plan = dict(forwards, cache=_StaticBuffers(), speculate=None if speculate == "none" else speculate,
                             quantize=quantize or "none", compile=bool(compile))
    return model


def _forward_fn(model, name):
    """model.forward_static under a code object of its own: dynamo keeps compiled graphs per code object,
    so each shape family (prefill, step, verify) of each prepared model has its own graphs and recompile
    budget, and no graph compiled for one model is ever tried on another."""
    def forward(idx, pos, logit_index, k, v, span):
        return model.forward_static(idx, pos, logit_index, k, v, span)
    forward.__code__ = forward.__code__.replace(co_name=f"{name}_{next(_code_ids)}")
    return forward


_code_ids = itertools.count()


class _StaticBuffers:
    """The static cache's k, v buffers, kept between calls (same addresses: what CUDA graphs need)."""

    def __init__(self):
        self.key, self.kv = None, None

    def __call__(self, model, batch_size, length):
        from models.gpt2 import StaticKVCache
        key = (batch_size, length)
        if self.key != key:
            self.kv = None  # free the old buffers first
            w = model.transformer.wte.weight
            self.kv = StaticKVCache.buffers(model.config, batch_size, length, w.device, w.dtype)
            if w.device.type == "cuda":
                for t in (*self.kv[0], *self.kv[1]):
                    torch._dynamo.mark_static_address(t)
            self.key = key
        return self.kv
