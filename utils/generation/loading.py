"""Loading a model to generate with: a checkpoint, a LoRA adapter attached in memory, the decode layout."""
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
