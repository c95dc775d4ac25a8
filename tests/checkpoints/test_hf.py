"""The HF transformers bridge: import/export round trip, offline loading, greedy parity, bad inputs.

Everything runs on random-init transformers models saved to a temp dir (no weights can be
downloaded here, and no test touches the network).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from utils.checkpoints.hf import _convert, _InMemory, export_to_hf, import_hf_dir
from utils.checkpoints.hf_mapping import HFConversionError
from utils.checkpoints.model import load_model
from utils.tokenizer import get_tokenizer, vocab_files

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)


def random_hf(seed=0, **kwargs):
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    with torch.no_grad():  # HF inits biases and LayerNorms to constants: perturb all so every tensor counts
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny"
    random_hf(**TINY).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    """hf_dir -> ours (vocab padded to 64) -> exported back to transformers."""
    root = tmp_path_factory.mktemp("conv")
    import_hf_dir(hf_dir, root / "ours", pad_vocab_multiple=64)
    export_to_hf(root / "ours", root / "export")
    return root / "ours", root / "export"


def read_safetensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_round_trip_is_bit_exact(hf_dir, converted):
    ours_dir, export_dir = converted
    original, back = read_safetensors(hf_dir / "model.safetensors"), read_safetensors(export_dir / "model.safetensors")
    original.pop("lm_head.weight", None)  # tied to wte; transformers may or may not store it
    assert set(back) == set(original)
    for k in original:
        assert back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]), k
    ours = load_file(ours_dir / "model.safetensors")
    assert ours["transformer.wte.weight"].shape == (50304, 64)  # padded on import ...
    assert back["transformer.wte.weight"].shape == (50257, 64)  # ... dropped on export


def test_export_loads_in_transformers_offline_with_same_logits(converted):
    ours_dir, export_dir = converted
    ours = load_model(ours_dir).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_dir).eval()
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["vocab_size"] == 50257 and config["n_positions"] == config["n_ctx"] == 128
    assert config["bos_token_id"] == config["eos_token_id"] == 50256 and config["tie_word_embeddings"] is True
    gen = json.loads((export_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 50256
    vocab_bpe, encoder_json = vocab_files()
    assert (export_dir / "vocab.json").read_bytes() == open(encoder_json, "rb").read()
    assert (export_dir / "merges.txt").read_bytes() == open(vocab_bpe, "rb").read()
    assert not [f for f in os.listdir(export_dir.parent) if ".tmp-" in f]  # atomic: no leftovers


def test_export_tokenizer_and_pipeline_offline(converted):
    _, export_dir = converted
    tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    enc = get_tokenizer()
    for text in ["Hello world", " héllo  wörld\n\n\tx", "日本語のテキスト 🤖", "It's 3.14159 -- isn't it?",
                 "<|endoftext|>"]:
        assert tok(text)["input_ids"] == enc.encode(text, allowed_special="all"), text
        assert tok.decode(enc.encode(text, allowed_special="all")) == text
    assert tok.eos_token_id == tok.bos_token_id == 50256 and tok.model_max_length == 128
    pipe = transformers.pipeline("text-generation", model=str(export_dir), device="cpu")
    out = pipe("Hello world", max_new_tokens=5, min_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("Hello world") and len(tok(out)["input_ids"]) == 2 + 5


@pytest.mark.parametrize("hf_kwargs, prompt_len, pad", [
    (dict(n_layer=2, n_head=4, n_embd=64, n_positions=128), 11, 64),
    (dict(n_layer=3, n_head=2, n_embd=96, n_positions=96), 5, 1),
])
def test_greedy_equals_transformers_generate(tmp_path, hf_kwargs, prompt_len, pad):
    hf = random_hf(seed=1, **hf_kwargs)
    hf.save_pretrained(tmp_path / "hf")
    import_hf_dir(tmp_path / "hf", tmp_path / "ours", pad_vocab_multiple=pad)
    ours = load_model(tmp_path / "ours").eval()
    assert prompt_len + 64 <= ours.config.block_size  # one context window: no sliding on either side
    idx = torch.randint(0, 50257, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    # min_new_tokens: transformers must not stop at eos (50256) before 64 tokens.
    ref = hf.generate(idx, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=50256)
    out = ours.generate(idx, 64, temperature=0)
    assert out.shape == ref.shape == (2, prompt_len + 64)
    assert out.tolist() == ref.tolist()


def test_sharded_and_bin_dirs_import_the_same(hf_dir, converted, tmp_path):
    ours_dir, _ = converted
    reference = load_file(ours_dir / "model.safetensors")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd = {(k.removeprefix("transformer.")): v for k, v in sd.items()}  # the old OpenAI layout: no prefix
    torch.save(sd, bin_dir / "pytorch_model.bin")
    for src in ("sharded", "bin"):
        import_hf_dir(tmp_path / src, tmp_path / f"ours_{src}", pad_vocab_multiple=64)
        got = load_file(tmp_path / f"ours_{src}" / "model.safetensors")
        assert set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in reference), src


def test_bad_checkpoint_fails_before_reading_weights(hf_dir):
    config = transformers.GPT2Config.from_pretrained(hf_dir).to_dict()
    sd = dict(transformers.GPT2LMHeadModel.from_pretrained(hf_dir).state_dict())
    del sd["transformer.h.1.mlp.c_fc.weight"]
    source = _InMemory(sd)
    n = len(sd)
    with pytest.raises(HFConversionError, match=r"missing tensors \['transformer.h.1.mlp.c_fc.weight'\]"):
        _convert(config, source, "test", 1)
    assert len(sd) == n  # names and shapes were checked on meta tensors: nothing was read


# ------------------------------------------------------------------------------- the command line

def convert(*args, env=None):
    proc = subprocess.run([sys.executable, "convert_hf_checkpoint.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convert_hf_checkpoint.py: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_bad_dirs(root, hf_dir):
    """Directories that are not GPT-2 checkpoints, each with what the error must say."""
    cases = {}
    root.mkdir()
    neo = root / "gpt_neo"
    neo.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    (neo / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neo"}))
    cases["gpt_neo"] = (neo, ["model_type is 'gpt_neo', not 'gpt2'"])
    missing = root / "missing_tensor"
    missing.mkdir()
    (missing / "config.json").write_text((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "model.safetensors")
    del sd["transformer.h.0.attn.c_attn.weight"], sd["transformer.ln_f.bias"]
    save_file(sd, missing / "model.safetensors", metadata={"format": "pt"})
    cases["missing"] = (missing, ["missing tensors", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.bias"])
    vocab = root / "vocab"
    vocab.mkdir()
    transformers.GPT2Config(vocab_size=50000, **TINY).save_pretrained(vocab)
    cases["vocab"] = (vocab, ["vocab_size is 50000, not GPT-2's 50257"])
    noweights = root / "no_weights"
    noweights.mkdir()
    (noweights / "config.json").write_text((hf_dir / "config.json").read_text())
    cases["no_weights"] = (noweights, ["no weights", "it holds config.json"])
    cases["no_config"] = (root, ["no config.json"])
    cases["not_a_dir"] = (root / "nope", ["not a directory"])
    return cases


def convert_in_process(capfd, *args):
    """The script's own entry point (`run(PROG, main)`), in this process: same handling, no interpreter start-up."""
    import convert_hf_checkpoint
    with pytest.raises(SystemExit) as e:
        convert_hf_checkpoint.run(convert_hf_checkpoint.PROG, convert_hf_checkpoint.main, [str(a) for a in args])
    out, err = capfd.readouterr()
    return e.value.code, out, err


def test_cli_import_export(hf_dir, converted, tmp_path):
    ours_dir, _ = converted
    rc, out, err = convert("--hf_dir", hf_dir, "--output", tmp_path / "ours")
    assert rc == 0, err
    got, ref = load_file(tmp_path / "ours" / "model.safetensors"), load_file(ours_dir / "model.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    rc, _, err = convert("--to_hf", "--checkpoint", tmp_path / "ours", "--output", tmp_path / "export")
    assert rc == 0, err
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export") is not None
    rc, _, err = convert("--to_hf", "--checkpoint", tmp_path / "ours", "--output", tmp_path / "export")
    assert_one_line_error(rc, err, "already exists", "--overwrite")


def test_cli_bad_inputs(hf_dir, converted, tmp_path, capfd):
    ours_dir, _ = converted
    for name, (path, fragments) in write_bad_dirs(tmp_path / "bad", hf_dir).items():
        rc, _, err = convert_in_process(capfd, "--hf_dir", path, "--output", tmp_path / f"out_{name}")
        assert_one_line_error(rc, err, *fragments)
        assert not (tmp_path / f"out_{name}").exists()
    rc, _, err = convert_in_process(capfd, "--hf_dir", hf_dir, "--output", ours_dir)
    assert_one_line_error(rc, err, "already exists", "--overwrite")
    rc, _, err = convert_in_process(capfd, "--to_hf", "--checkpoint", hf_dir, "--output", tmp_path / "x")
    assert_one_line_error(rc, err, "not a miniGPT model config")
    rc, _, err = convert_in_process(capfd, "--hf_model", "gpt3", "--output", tmp_path / "x")
    assert_one_line_error(rc, err, "unknown --hf_model 'gpt3'", "gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    rc, _, err = convert_in_process(capfd, "--to_hf", "--output", tmp_path / "x")
    assert rc == 2 and "--to_hf needs --checkpoint" in err and "Traceback" not in err  # argparse: usage + error


def test_cli_bad_inputs_as_subprocesses(hf_dir, tmp_path):
    """End to end, as a user runs it: no network, a non-GPT-2 dir."""
    rc, _, err = convert("--hf_model", "gpt2", "--output", tmp_path / "x",
                         env={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert_one_line_error(rc, err, "could not load 'gpt2'", "no network", "--hf_dir")
    cases = write_bad_dirs(tmp_path / "bad", hf_dir)
    rc, _, err = convert("--hf_dir", cases["gpt_neo"][0], "--output", tmp_path / "y")
    assert_one_line_error(rc, err, *cases["gpt_neo"][1])


def test_cli_hf_model_from_the_hf_cache(hf_dir, converted, tmp_path):
    """--hf_model goes through transformers.from_pretrained: here served from a local HF cache."""
    ours_dir, _ = converted
    snapshot = tmp_path / "cache" / "models--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((hf_dir / name).read_bytes())
    (tmp_path / "cache" / "models--gpt2" / "refs").mkdir()
    (tmp_path / "cache" / "models--gpt2" / "refs" / "main").write_text("0" * 40)
    rc, _, err = convert("--hf_model", "gpt2", "--output", tmp_path / "ours",
                         env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    assert rc == 0, err
    got, ref = load_file(tmp_path / "ours" / "model.safetensors"), load_file(ours_dir / "model.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_cli_help():
    rc, out, _ = convert("--help")
    assert rc == 0 and "--hf_model" in out and "--to_hf" in out and "--pad_vocab_multiple" in out
