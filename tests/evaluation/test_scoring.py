"""Scoring: log-likelihoods against transformers (an independent model and tokenizer), the shared
context prefix against the model's own forward on each choice alone, lm-eval's tokenization rules."""
import pytest
import torch
import transformers

from models.gpt2 import GPT2Config, GPT2LMHeadModel
from utils.checkpoint import save_model
from utils.checkpoints.hf import export_to_hf
from utils.evaluation.scoring import encode_pair, fit_window, score_requests
from utils.tokenizer import get_tokenizer

# Shared contexts (several choices), a trailing space, a one-token continuation, a context longer
# than the 128-token window (left truncation), non-ASCII text.
LONG = " ".join(f"word{i}" for i in range(150))
REQUESTS = [
    ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis."),
    ("Roof shingle removal: A man is sitting on a roof. He", " is ripping level tiles off."),
    ("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof."),
    ("Question: How do I ready a guinea pig cage?\nAnswer:", " Provide it with bedding made of paper strips."),
    ("Question: How do I ready a guinea pig cage?\nAnswer:", " Provide it with bedding made of jeans."),
    ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ("The answer is ", "yes"),
    ("He looked at the", " sky"),
    (LONG, " and then the story ended with a long sentence of its own."),
    (LONG + " and", " end"),  # a full window and a one-token continuation, batched with longer ones
    ("Café au lait, s'il vous plaît —", " naïve façade"),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    return GPT2LMHeadModel(GPT2Config.from_preset("gpt2-tiny")).eval()


def hf_scores(hf_dir, requests):
    """Per request: (summed log-prob of the continuation, greedy?) from transformers' model and
    tokenizer, written out from lm-eval's rules (context+continuation encoded whole, left truncation)."""
    tok = transformers.GPT2TokenizerFast.from_pretrained(hf_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for context, cont in requests:
        n = len(context) - len(context.rstrip())
        if n:
            context, cont = context[:-n], context[-n:] + cont
        whole = tok(context + cont)["input_ids"]
        ctx_ids = tok(context)["input_ids"]
        cont_ids = whole[len(ctx_ids):]
        ids = (ctx_ids + cont_ids)[-(hf.config.n_positions + 1):][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -len(cont_ids):], dim=-1)
        t = torch.tensor(cont_ids)
        out.append((logp.gather(1, t[:, None]).sum().item(), bool((logp.argmax(1) == t).all())))
    return out


def test_logliks_equal_transformers_on_the_exported_model(model, tmp_path):
    save_model(model, tmp_path / "ckpt")
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    ref = hf_scores(str(tmp_path / "hf"), REQUESTS)
    ours = score_requests(model, get_tokenizer(), REQUESTS, batch_size=4)
    for (ll, greedy), s, req in zip(ref, ours, REQUESTS):
        assert abs(s.loglik - ll) <= 1e-4, (req, s.loglik, ll)
        assert s.is_greedy == greedy
    assert len({round(s.loglik, 3) for s in ours}) == len(REQUESTS)  # a real spread, not one constant


def full_forward(model, requests):
    """Each request alone through the model's own forward: no cache, no grouping, no padding."""
    enc = get_tokenizer()
    out = []
    for c, x in requests:
        ctx, cont = fit_window(*encode_pair(enc, c, x), model.config.block_size)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx + cont[:-1]]))
        logp = torch.log_softmax(logits[0, -len(cont):], dim=-1)
        t = torch.tensor(cont)
        out.append((logp.gather(1, t[:, None]).sum().item(), bool((logp.argmax(1) == t).all()), len(cont)))
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_shared_prefix_equals_each_choice_alone(model, batch_size):
    ref = full_forward(model, REQUESTS)
    ours = score_requests(model, get_tokenizer(), REQUESTS, batch_size=batch_size)
    for (ll, greedy, n), s in zip(ref, ours):
        assert abs(s.loglik - ll) <= 2e-5 and s.is_greedy == greedy and s.n_tokens == n


def test_greedy_continuation_is_recognised(model):
    """LAMBADA's accuracy: a continuation made of the model's own argmax tokens is greedy."""
    enc = get_tokenizer()
    ctx = enc.encode("The quick brown fox jumps over the lazy dog and")
    with torch.no_grad():
        out = model.generate(torch.tensor([ctx]), max_new_tokens=3, temperature=0)[0, len(ctx):].tolist()
    text = enc.decode(ctx)
    cont = enc.decode(out)
    if encode_pair(enc, text, cont)[1] != out:  # the text must round-trip to the same tokens to be a fair check
        pytest.skip("greedy tokens do not re-encode to themselves")
    s = score_requests(model, enc, [(text, cont), (text, cont + " x")])
    assert s[0].is_greedy and not s[1].is_greedy


def test_encode_pair_follows_lm_eval():
    enc = get_tokenizer()
    # a trailing space moves to the continuation ("Answer: " + "yes" is scored as "Answer:" + " yes")
    assert encode_pair(enc, "Answer: ", "yes") == (enc.encode("Answer:"), enc.encode(" yes"))
    # the continuation's tokens are what encoding the whole adds after the context's tokens
    ctx, cont = encode_pair(enc, "Hello", " world")
    assert ctx + cont == enc.encode("Hello world")


def test_fit_window_truncates_from_the_left():
    ctx, cont = fit_window(list(range(200)), [1000, 1001, 1002], block_size=128)
    # the model sees the last 129 tokens minus the final one: 126 of context + 2 continuation inputs
    assert cont == [1000, 1001, 1002] and ctx == list(range(200 - 126, 200))
    assert fit_window([1, 2], [3], 128) == ([1, 2], [3])
