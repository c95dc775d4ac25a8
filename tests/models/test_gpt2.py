"""Our GPT-2 against HF transformers' GPT2LMHeadModel on the same (random) weights."""
import pytest
import torch
import transformers

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.checkpoints.hf_mapping import config_from_hf, hf_to_ours


def build_pair(pad_vocab_multiple=1, **hf_kwargs):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**hf_kwargs)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF inits biases and LayerNorms to constants: perturb all so every tensor counts
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = config_from_hf(hf_config, pad_vocab_multiple=pad_vocab_multiple)
    ours = GPT2LMHeadModel(config)
    missing, unexpected = ours.load_state_dict(hf_to_ours(dict(hf.state_dict()), config), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # lm_head is tied to wte
    return hf, ours.eval()


def shifted_targets(idx):
    return torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1)


def check_parity(hf, ours, idx):
    with torch.no_grad():
        ref = hf(idx, labels=idx)  # HF shifts the labels itself
        logits, loss = ours(idx, targets=shifted_targets(idx))
    assert logits.shape == ref.logits.shape
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    if idx.size(1) > 1:
        assert abs(loss.item() - ref.loss.item()) <= 1e-5


@pytest.mark.parametrize("pad", [1, 64])
@pytest.mark.parametrize("T", [1, 17, 64])
def test_logits_match_hf_small(pad, T):
    hf, ours = build_pair(pad, n_layer=2, n_head=4, n_embd=64, n_positions=64)
    check_parity(hf, ours, torch.randint(0, 50257, (3, T)))


def test_logits_match_hf_gpt2_124m():
    hf, ours = build_pair(1, n_layer=12, n_head=12, n_embd=768, n_positions=1024)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == 124_439_808
    check_parity(hf, ours, torch.randint(0, 50257, (1, 1024)))  # exactly block_size
    check_parity(hf, ours, torch.randint(0, 50257, (2, 1)))


def test_ignored_targets_do_not_count():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny")).eval()
    idx = torch.randint(0, 50257, (2, 8))
    targets = torch.randint(0, 50257, (2, 8))
    masked = targets.clone()
    masked[:, :5] = -100
    logits, loss = model(idx, masked)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 50257), targets[:, 5:].reshape(-1))
    assert torch.allclose(loss, ref)


def test_padded_vocab_never_visible():
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", pad_vocab_multiple=64))
    assert model.transformer.wte.weight.shape[0] == 50304
    logits, _ = model(torch.randint(0, 50257, (1, 4)))
    assert logits.shape[-1] == 50257


def test_gpt2_init_and_tying():
    model = GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", n_layer=8, n_embd=256, n_head=4))
    assert model.lm_head.weight is model.transformer.wte.weight
    std_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 2e-3 and abs(std_proj - 0.02 / 4) < 1e-3  # 0.02 / sqrt(2 * 8)


def test_presets_sizes():
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168}
    for name, n in expected.items():
        with torch.device("meta"):
            assert GPT2LMHeadModel(GPT2Config.from_preset(name)).num_params() == n
    with pytest.raises(ValueError, match="unknown model preset"):
        GPT2Config.from_preset("gpt3")
