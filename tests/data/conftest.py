"""Fixtures for the data-script tests: write raw files, run a script's main as the command line
would, and read back what prepare/build wrote."""
import json
import os

import numpy as np
import pytest

import build_finetune_datasets
import build_pretrain_datasets
import prepare_data_finetune
import prepare_data_pretrain
from utils.cli import run


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
        f.write(data)
    return str(path)


@pytest.fixture(scope="session")
def write():
    """write(path, text or bytes) -> path, making parent directories."""
    return _write


@pytest.fixture
def fails(capsys):
    """fails(script_module, argv) -> the one-line error it printed last (exit code 2, no traceback)."""
    def fails(main_module, argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run(main_module.PROG, main_module.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and errors[0].startswith(f"{main_module.PROG}: error: "), err
        assert "Traceback" not in err and err.rstrip().endswith(errors[0]), err  # warnings may come before it
        return errors[0]
    return fails


@pytest.fixture(scope="session")
def no_output():
    """no_output(out): neither the output nor a temporary sibling of it exists."""
    def no_output(out):
        parent, name = os.path.split(os.path.abspath(out))
        leftovers = [n for n in os.listdir(parent) if n.startswith(f".{name}.tmp") or n == name]
        return not leftovers
    return no_output


@pytest.fixture(scope="session")
def prepare_pretrain_cli():
    """prepare_pretrain_cli(inputs, out, *flags) -> (cleaned documents, report)."""
    def prepare(inputs, out, *extra):
        run(prepare_data_pretrain.PROG, prepare_data_pretrain.main,
            ["--input", *map(str, inputs), "--output", str(out), "--num_workers", "0", *extra])
        with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
        docs = []
        for shard in report["outputs"]:
            with open(os.path.join(out, shard["file"]), encoding="utf-8") as f:
                docs += [json.loads(line)["text"] for line in f]
        return docs, report
    return prepare


@pytest.fixture(scope="session")
def build_pretrain_cli():
    """build_pretrain_cli(src, out, *flags) -> ([train tokens, val tokens], meta)."""
    def build(src, out, *extra):
        build_pretrain_datasets.main(["--input", str(src), "--output", str(out), *extra])
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        return [np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val")], meta
    return build


@pytest.fixture(scope="session")
def prepare_finetune_cli():
    """prepare_finetune_cli(inputs, out) -> (examples, report)."""
    def prepare(inputs, out):
        run(prepare_data_finetune.PROG, prepare_data_finetune.main,
            ["--input", *map(str, inputs), "--output", str(out)])
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)
        with open(os.path.join(out, "examples.jsonl")) as f:
            return [json.loads(line) for line in f], report
    return prepare


@pytest.fixture(scope="session")
def build_finetune_cli():
    """build_finetune_cli(src, out, *flags) -> ({split: examples}, meta)."""
    def build(src, out, *extra):
        build_finetune_datasets.main(["--input", str(src), "--output", str(out), *extra])
        result = {}
        for split in ("train", "val"):
            with open(os.path.join(out, f"{split}.jsonl")) as f:
                result[split] = [json.loads(line) for line in f]
        with open(os.path.join(out, "meta.json")) as f:
            return result, json.load(f)
    return build
