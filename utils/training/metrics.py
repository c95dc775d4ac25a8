"""Speed accounting shared by the training loop and bench/: model FLOPs and MFU (the measured
matmul peak is utils.hardware.peak_flops).

MFU here is "model FLOPs utilisation" (PaLM, appendix B): the FLOPs the model needs per token
(not what the hardware happens to execute: no recomputation, no vocabulary padding), times
tokens/s, divided by the peak. The peak is *measured* (a large square matmul in the training
dtype), not a datasheet number, so MFU says how close training runs to what matmuls can do here.
"""


def model_flops_per_token(config, seq_len: int) -> int:
    """Training FLOPs per token of GPT2LMHeadModel: 6·N + 12·L·T·d.

    N counts the weights that take part in matmuls: per block 12·d² (q/k/v, output projection,
    MLP in and out) plus the LM head V·d (tied to wte; vocab_size, not the padded size). Biases,
    LayerNorms and the position embedding add no matmul FLOPs. 6 = 2 (multiply-add) × 3 (forward,
    grad of input, grad of weight). 12·L·T·d are the attention scores and the weighted sum of
    values (2·2·T·d per token per layer forward, ×3 with backward), over the full T×T square as
    PaLM and nanoGPT count it (causal kernels skip half of it, so this slightly flatters MFU).
    """
    L, d, V, T = config.n_layer, config.n_embd, config.vocab_size, seq_len
    n_matmul = L * 12 * d * d + V * d
    return 6 * n_matmul + 12 * L * T * d


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float) -> float:
    """Fraction of the peak that the model's FLOPs reach at this throughput."""
    return tokens_per_sec * flops_per_token / peak if peak else 0.0
