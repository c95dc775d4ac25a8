"""Fast decoding (issue 23): int8 weights, the static KV cache and its compiled steps, prompt-lookup speculation.

References are independent of the code under test: a hand computation of the int8 product, a model
whose weights are the dequantised values (plain fp32 forward), nanoGPT's full-recompute loop,
transformers' `generate`, and plain greedy decoding for speculation.
"""
import copy

import pytest
import torch
import transformers

from models.gpt2 import GPT2Config, GPT2LMHeadModel, lookup_draft
from utils.checkpoints.hf_mapping import config_to_hf, hf_to_ours
from utils.generation.loading import prepare_for_decode
from utils.generation.quantize import Int8Linear, quantize_int8, w8a8_available
from utils.generation.streaming import stream_tokens


def tiny(block_size=48, seed=0, pad=64):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny", block_size=block_size, pad_vocab_multiple=pad)).eval()


def greedy_by_recompute(model, idx, n):
    """nanoGPT's loop: recompute the last block_size tokens every step, no cache."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


# ------------------------------------------------------------------------------------------ int8

def test_int8_linear_equals_hand_computation():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    W = linear.weight.detach()
    q = Int8Linear.from_linear(linear, kernel="dequant")
    # by hand: per output row, scale = max |w| / 127, w_int8 = round(w / scale)
    for row in range(40):
        s = max(abs(float(w)) for w in W[row]) / 127
        assert q.scale[row].item() == pytest.approx(s, rel=1e-6)
        assert q.weight_int8[row].tolist() == [int(torch.round(w / torch.tensor(s))) for w in W[row]]
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max().item() == 127
    x = torch.randn(3, 5, 96)
    hand = (x.double() @ q.weight_int8.double().T) * q.scale.double() + linear.bias.double()
    assert (q(x).double() - hand).abs().max().item() < 1e-5
    # the CPU int8 kernel (bf16 activations): the same product with x rounded to bf16, fp32 accumulation
    fast = Int8Linear.from_linear(linear, kernel="int8pack")
    x1 = torch.randn(1, 1, 96)
    hand1 = (x1.bfloat16().double() @ fast.weight_int8.double().T) * fast.scale.bfloat16().double() \
        + linear.bias.double()
    y = fast(x1)
    assert y.dtype == torch.float32 and y.shape == (1, 1, 40)
    assert (y.double() - hand1).abs().max().item() < 2e-2 * hand1.abs().max().item()


class HandW8A8(torch.nn.Module):
    """The CPU int8 kernel's numbers written out in float64: the input row's values rounded to 127 even
    steps between the row's min and max, times the dequantised weights."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().double()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.w = torch.round(w / scale).clamp(-127, 127) * scale
        self.b = None if linear.bias is None else linear.bias.detach().double()

    def forward(self, x):
        xd = x.double()
        lo, hi = xd.amin(-1, keepdim=True), xd.amax(-1, keepdim=True)
        step = (hi - lo) / 127
        rounded = torch.where(step > 0, lo + torch.round((xd - lo) / step) * step, xd)  # a constant row is exact
        y = rounded @ self.w.T
        return (y if self.b is None else y + self.b).to(x.dtype)


def w8a8_reference(model):
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, attr, HandW8A8(m))
    return ref


needs_w8a8 = pytest.mark.skipif(not w8a8_available(), reason="fbgemm's int8 GEMM is for x86 CPUs")


@needs_w8a8
def test_w8a8_linear_equals_hand_computation_row_by_row():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    q = Int8Linear.from_linear(linear, kernel="w8a8")
    x = torch.randn(3, 5, 96)
    x[0, 0] = 0.25  # a constant row: zero width between its min and max
    hand = HandW8A8(linear)(x.double())
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 40)
    assert (y.double() - hand).abs().max().item() < 1e-5 * hand.abs().max().item()
    # by hand once more, from the int8 weights: codes in [0, 127], x ~= lo + codes * step
    row = x[1, 2].double()
    lo, step = row.min(), (row.max() - row.min()) / 127
    codes = torch.round((row - lo) / step)
    assert codes.min() == 0 and codes.max() == 127
    w = q.weight_int8.double() * q.scale.double()[:, None]
    assert torch.allclose(y[1, 2].double(), (lo + codes * step) @ w.T + linear.bias.double(), rtol=0, atol=1e-5)
    # each row is quantised alone: a row's result does not depend on the rows beside it (speculation, batches)
    assert torch.equal(q(x[1:2, 2:3]), y[1:2, 2:3])
    assert torch.equal(copy.deepcopy(q)(x), y)  # a copy packs its own weights


def dequantised_reference(model):
    """An fp32 model whose Linear weights (and LM head) are W_int8 * scale, computed here by hand."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.detach()
            scale = w.abs().amax(dim=1, keepdim=True) / 127
            m.weight = torch.nn.Parameter(torch.round(w / scale).clamp(-127, 127) * scale)  # unties the head
    return ref


def test_quantised_logits_equal_dequantised_reference():
    model = tiny()
    ref = dequantised_reference(model)
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        expected, _ = ref(idx)
        exact = quantize_int8(copy.deepcopy(model), kernel="dequant")
        got, _ = exact(idx)
        assert (got - expected).abs().max().item() < 1e-4
        fp32, _ = model(idx)
        assert (got - fp32).abs().max().item() > 1e-4  # quantisation did change the weights
        # the int8 kernel path (bf16 activations) on a decode-sized input: close, within bf16 rounding
        fast = quantize_int8(copy.deepcopy(model), kernel="int8pack")
        one, _ = fast(idx[:1, :1])
        ref_one, _ = ref(idx[:1, :1])
        assert (one - ref_one).abs().max().item() < 0.02 * ref_one.abs().max().item()
        # the chunked loss (evaluation's val_loss) reads the dequantised head
        y = torch.randint(0, 50257, (2, 20))
        _, loss = exact(idx, targets=y, return_logits=False)
        _, ref_loss = ref(idx, targets=y)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


@needs_w8a8
def test_w8a8_model_logits_equal_hand_reference():
    model = tiny()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        got, _ = quantize_int8(copy.deepcopy(model), kernel="w8a8")(idx)
        expected, _ = w8a8_reference(model)(idx)
        fp32, _ = model(idx)
    # Float rounding can move an input across a half step (one code, one step x one weight): rare, so
    # the typical logit is exact while the max is not.
    diff = (got - expected).abs()
    assert diff.median().item() < 1e-5 and diff.max().item() < 1e-2 * expected.abs().max().item()
    assert (got - fp32).abs().median().item() > 1e-3  # the activations' rounding shows everywhere


# ------------------------------------------------------------------------------------- the cache

def test_static_cache_equals_dynamic_and_recompute_across_window():
    model = tiny()
    prepared = prepare_for_decode(copy.deepcopy(model))
    idx = torch.randint(0, 50257, (2, 7))
    out = prepared.generate(idx, 100, temperature=0)  # 107 tokens: slides past block_size 48 twice
    assert torch.equal(out, model.generate(idx, 100, temperature=0))  # the growing KVCache
    assert torch.equal(out, greedy_by_recompute(model, idx, 100))
    # a prompt longer than a prefill bucket, and one longer than the context
    for T in (17, 60):
        idx = torch.randint(0, 50257, (1, T))
        assert torch.equal(prepared.generate(idx, 12, temperature=0), greedy_by_recompute(model, idx, 12))


def test_static_cache_greedy_equals_transformers_generate():
    torch.manual_seed(3)
    config = GPT2Config.from_preset("gpt2-tiny", block_size=64)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = GPT2LMHeadModel(config).eval()
    ours.load_state_dict(hf_to_ours(dict(hf.state_dict()), config), strict=False)
    prepared = prepare_for_decode(ours)
    idx = torch.randint(0, 50257, (1, 9))
    ref = hf.generate(idx, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=50256)
    assert prepared.generate(idx, 40, temperature=0).tolist() == ref.tolist()


def test_sampling_on_the_static_cache_matches_the_plain_decoder():
    model = tiny()
    prepared = prepare_for_decode(copy.deepcopy(model))
    idx = torch.randint(0, 50257, (1, 5))
    kw = dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3)
    a = model.generate(idx, 25, generator=torch.Generator().manual_seed(3), **kw)
    b = prepared.generate(idx, 25, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it (each compile or recompile)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_no_recompile_per_token_or_prompt_length():
    torch._dynamo.reset()
    model = tiny(block_size=128)
    backend = CountingBackend()
    prepared = prepare_for_decode(copy.deepcopy(model), compile=backend)
    for T in (3, 5, 9, 12):  # prompt bucket 16; cache bucket 32 (T + 20 <= 32)
        idx = torch.randint(0, 50257, (1, T))
        assert torch.equal(prepared.generate(idx, 20, temperature=0), model.generate(idx, 20, temperature=0))
    assert backend.graphs == 2  # one prefill, one decode step: 80 tokens and 4 prompt lengths
    idx = torch.randint(0, 50257, (1, 20))  # prompt bucket 32, cache bucket 64: one more of each
    assert torch.equal(prepared.generate(idx, 30, temperature=0), model.generate(idx, 30, temperature=0))
    assert backend.graphs == 4


def test_int8_compiled_with_inductor_equals_int8_eager():
    """The real compiler once, on a very small model and few tokens (slow on a shared CPU)."""
    torch._dynamo.reset()
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=512)).eval()
    eager = prepare_for_decode(copy.deepcopy(model), quantize="int8")
    compiled = prepare_for_decode(copy.deepcopy(model), quantize="int8", compile=True)
    idx = torch.randint(0, 512, (1, 6))
    assert torch.equal(compiled.generate(idx, 8, temperature=0), eager.generate(idx, 8, temperature=0))


# ---------------------------------------------------------------------------------- speculation

def test_lookup_draft_by_hand():
    assert lookup_draft([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]        # "2 3" seen before: what followed
    assert lookup_draft([7, 1, 2, 8, 1, 2, 9, 1, 2], 2) == [9, 1]       # the latest earlier match wins
    assert lookup_draft([1, 2, 3, 4], 5) == []                           # nothing repeats
    assert lookup_draft([5, 6, 7, 6], 4) == [7, 6]                       # falls back to a 1-gram


@pytest.mark.parametrize("prompt", [
    [464, 3290, 318, 257, 1332, 13, 383, 3290, 318, 257, 1332, 13, 383, 3290],  # repeats itself
    [40, 716, 257, 1332, 286, 262, 1080, 13, 9],                                 # no repeated n-gram
])
def test_speculative_equals_plain_greedy(prompt):
    model = tiny(block_size=96)
    prepared = prepare_for_decode(copy.deepcopy(model), speculate="lookup")
    idx = torch.tensor([prompt])
    out = prepared.generate(idx, 70, temperature=0)  # the last tokens run past the cache bucket's end
    assert torch.equal(out, model.generate(idx, 70, temperature=0))
    stats = prepared.decode_plan["stats"]
    assert stats["forwards"] < 70 - 1 or stats["drafted"] == 0
    # a random tiny model falls into loops, so even the non-repeating prompt gets accepted drafts
    assert stats["accepted"] > 0
    # stop tokens and streaming through the speculative path
    stop = out[0, len(prompt) + 30].item()
    streamed = list(stream_tokens(prepared, prompt, 70, stop_tokens=(stop,), temperature=0))
    plain = model.generate([prompt], 70, temperature=0, stop_tokens=[stop])[0][len(prompt):]
    assert streamed + [stop] == plain


def test_int8_speculation_checks_drafts_with_the_int8_model():
    """The check's rows go through the same int8 kernel as the one-row steps (each row quantised alone),
    so on a prompt without near-ties the tokens are plain int8 greedy's. Near-ties can still round apart
    in the attention (9 rows vs 1): docs/decoding.md, Limits."""
    model = tiny(block_size=96)
    prompt = torch.tensor([[464, 3290, 318, 257, 1332, 13, 383, 3290, 318, 257, 1332, 13, 383, 3290]])
    plain = prepare_for_decode(copy.deepcopy(model), quantize="int8").generate(prompt, 60, temperature=0)
    prepared = prepare_for_decode(copy.deepcopy(model), quantize="int8", speculate="lookup")
    assert torch.equal(prepared.generate(prompt, 60, temperature=0), plain)
    assert prepared.decode_plan["stats"]["accepted"] > 0


def test_compiled_decoders_of_two_models_never_share_graphs():
    """Dynamo does not re-check the model at each call (prepare_for_decode): each prepared model's decoder
    has code objects of its own, so a second model of the same shape gets its own graphs, weights and
    int8 packing, not the first one's."""
    torch._dynamo.reset()
    idx = torch.randint(0, 50257, (1, 6))
    for seed in (1, 2):
        model = tiny(seed=seed)
        eager = prepare_for_decode(copy.deepcopy(model), quantize="int8").generate(idx, 10, temperature=0)
        compiled = prepare_for_decode(copy.deepcopy(model), quantize="int8", compile="eager")
        assert torch.equal(compiled.generate(idx, 10, temperature=0), eager)


def test_speculation_refuses_sampling():
    prepared = prepare_for_decode(tiny(), speculate="lookup")
    with pytest.raises(ValueError, match="greedy"):
        prepared.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0.8)


def test_stream_tokens_equals_generate():
    model = tiny()
    for m in (model, prepare_for_decode(copy.deepcopy(model), quantize="int8")):
        prompt = [464, 3290, 318]
        full = m.generate([prompt], 30, temperature=0)[0][3:]
        assert list(stream_tokens(m, prompt, 30, stop_tokens=(), temperature=0)) == full


# ------------------------------------------------------------------------------- the scripts' flags

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from utils.checkpoints.model import save_model
    path = tmp_path_factory.mktemp("decode") / "tiny"
    save_model(tiny(block_size=128), path)
    return path


def run_script(module, capfd, *args):
    from utils.cli import run
    code = 0
    try:
        run(module.PROG, module.main, [*map(str, args), "--dtype", "float32", "--device", "cpu"])
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def test_pretrained_flags_say_their_choice_and_decode_as_the_api(ckpt, capfd):
    import generate_pretrained
    from utils.checkpoints.model import load_model
    from utils.tokenizer import get_tokenizer
    enc = get_tokenizer()
    prompt = "The cat sat on the mat. The cat sat on the"
    rc, out, err = run_script(generate_pretrained, capfd, "--checkpoint", ckpt, "--prompt", prompt, "--temperature", 0,
                              "--max_new_tokens", 24, "--quantize", "int8", "--speculate", "lookup", "--ignore_eot")
    assert rc == 0, err
    lines = err.strip().splitlines()
    assert any(line.startswith("quantize: int8, per-output-channel scales (") for line in lines)
    assert "compile: off (eager)" in lines and any(line.startswith("speculate: prompt lookup") for line in lines)
    assert lines[-1].startswith("total: 24 new tokens in ") and lines[-1].endswith("tokens/s")
    assert any(line.startswith("speculation: ") for line in lines)
    ids = enc.encode(prompt)
    int8 = prepare_for_decode(load_model(ckpt), quantize="int8")
    assert out == enc.decode(int8.generate([ids], 24, temperature=0)[0]) + "\n"


def test_finetuned_last_line_and_speculation_needs_greedy(ckpt, capfd):
    import generate_finetuned
    rc, out, err = run_script(generate_finetuned, capfd, "--checkpoint", ckpt, "--question", "Hi?", "--temperature", 0,
                              "--max_new_tokens", 6)
    assert rc == 0, err
    assert "quantize: none (float32 weights)" in err and "speculate: none" in err
    assert err.strip().splitlines()[-1].startswith("total: ")
    rc, out, err = run_script(generate_finetuned, capfd, "--checkpoint", ckpt, "--question", "Hi?",
                              "--speculate", "lookup")
    assert rc == 2 and "Traceback" not in err
    assert err.strip() == ("generate_finetuned.py: error: --speculate lookup gives exactly greedy decoding's tokens: "
                           "it needs --temperature 0 and no --repetition_penalty (got --temperature 0.8, "
                           "--repetition_penalty 1)")


def test_evaluate_quantize_int8_scores_the_int8_weights(ckpt, tmp_path, write_pretrain_data):
    import json

    import evaluate
    from utils.checkpoints.model import load_model
    from utils.evaluation.run import val_loss
    write_pretrain_data(tmp_path / "data", n_docs=200)
    out = tmp_path / "r.json"
    evaluate.main(["--checkpoint", str(ckpt), "--tasks", "val_loss", "--limit", "2", "--val_data",
                   str(tmp_path / "data"), "--quantize", "int8", "--output", str(out), "--device", "cpu"])
    got = json.loads(out.read_text())
    assert got["quantize"] == "int8"
    reference = w8a8_reference if w8a8_available() else dequantised_reference  # what decoding computes
    ref = val_loss(reference(load_model(ckpt).eval()), str(tmp_path / "data"), limit=2)
    assert got["results"]["val_loss"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
