"""Packed rows (doc_ids): every example sees exactly what it would see alone, checked against
transformers' GPT2LMHeadModel run on each example by itself (fp32)."""
import pytest
import torch
import transformers

from models.attention import DocumentMask, positions_in_document
from models.gpt2 import GPT2LMHeadModel
from utils.checkpoints.hf_mapping import config_from_hf, hf_to_ours

LENGTHS = [[7, 12, 5, 3], [20, 9], [31]]  # examples per row; rows padded to T = 32 with a padding "document"
T = 32


def build_pair():
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF inits biases and LayerNorms to constants: perturb all so every tensor counts
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = config_from_hf(hf_config, pad_vocab_multiple=64)
    ours = GPT2LMHeadModel(config)
    ours.load_state_dict(hf_to_ours(dict(hf.state_dict()), config), strict=False)
    return hf, ours.eval()


def packed_batch():
    """(idx, doc_ids, examples): rows of examples side by side, then EOT padding with its own document id."""
    g = torch.Generator().manual_seed(1)
    examples, idx, doc_ids = [], torch.full((len(LENGTHS), T), 50256), torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for b, lengths in enumerate(LENGTHS):
        s = 0
        for d, n in enumerate(lengths):
            ex = torch.randint(0, 50257, (n,), generator=g)
            idx[b, s:s + n], doc_ids[b, s:s + n] = ex, d
            examples.append((b, s, ex))
            s += n
        doc_ids[b, s:] = len(lengths)  # padding attends only to padding
    return idx, doc_ids, examples


def test_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_in_document(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("backend", ["dense", "segments"])
def test_packed_log_probs_equal_hf_on_each_example_alone(backend):
    hf, ours = build_pair()
    ours.doc_attention = backend
    idx, doc_ids, examples = packed_batch()
    with torch.no_grad():
        logp = torch.log_softmax(ours(idx, doc_ids=doc_ids)[0].float(), dim=-1)  # (B, T, V)
        for b, s, ex in examples:
            ref = torch.log_softmax(hf(ex[None]).logits[0].float(), dim=-1)  # (n, V), the example alone
            n = len(ex)
            # Every next-token log-probability inside the example, and the full distributions too.
            got_tok = logp[b, s:s + n - 1].gather(1, ex[1:, None])
            ref_tok = ref[:n - 1].gather(1, ex[1:, None])
            assert (got_tok - ref_tok).abs().max().item() <= 1e-5, (backend, b, s)
            assert (logp[b, s:s + n] - ref).abs().max().item() <= 1e-4


def test_packed_gradients_equal_hf_summed_over_examples():
    """Backward too: the packed row's summed loss has the gradient of the examples' losses summed, each alone."""
    hf, ours = build_pair()
    ours.doc_attention = "dense"
    idx, doc_ids, examples = packed_batch()
    targets = torch.full_like(idx, -100)
    for b, s, ex in examples:
        targets[b, s:s + len(ex) - 1] = ex[1:]  # each example predicts only its own next tokens
    _, loss = ours(idx, targets=targets, doc_ids=doc_ids, reduction="sum")
    loss.backward()
    ref = sum(hf(ex[None], labels=ex[None]).loss * (len(ex) - 1) for _, _, ex in examples)  # HF means: undo it
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    ours_grad = ours.transformer.wte.weight.grad[:50257]
    hf_grad = hf.transformer.wte.weight.grad
    assert (ours_grad - hf_grad).abs().max().item() <= 1e-5
    # The first block's fused q/k/v projection: HF's Conv1D holds it transposed.
    ours_qkv = ours.transformer.h[0].attn.c_attn.weight.grad
    hf_qkv = hf.transformer.h[0].attn.c_attn.weight.grad.t()
    assert (ours_qkv - hf_qkv).abs().max().item() <= 1e-5


def test_without_doc_ids_a_single_document_is_the_plain_model():
    _, ours = build_pair()
    idx = torch.randint(0, 50257, (2, T))
    with torch.no_grad():
        plain = ours(idx)[0]
        for backend in ("dense", "segments"):
            ours.doc_attention = backend
            one_doc = ours(idx, doc_ids=torch.zeros_like(idx))[0]
            assert (plain - one_doc).abs().max().item() <= 1e-5


def test_backends_agree_with_dropout_off_and_refuse_unknown():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, T, 16) for _ in range(3))
    _, doc_ids, _ = packed_batch()
    dense = DocumentMask(doc_ids, "dense").attend(q, k, v)
    segments = DocumentMask(doc_ids, "segments").attend(q, k, v)
    assert (dense - segments).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="unknown attention backend"):
        DocumentMask(doc_ids, "xformers")
