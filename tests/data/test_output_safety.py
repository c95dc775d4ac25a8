"""Issue 16, data safety: no data script's output may destroy or re-read its input, --overwrite replaces
only the script's own output, and a build step reads only what its prepare step writes."""
import json
import os

import pytest

import build_finetune_datasets
import build_pretrain_datasets
import prepare_data_finetune
import prepare_data_pretrain
from utils.files import OutputExistsError, check_output_file, replace_dir


@pytest.fixture
def raw(tmp_path, write):
    """The issue's raw directory: 17 .txt files, a .json array and one .jsonl."""
    d = tmp_path / "raw"
    for i in range(17):
        write(d / f"book{i:02d}.txt", f"Book {i}. " + "Some words of text. " * (i + 1))
    write(d / "array.json", json.dumps([{"text": "array document one"}, {"text": "array document two"}]))
    write(d / "lines.jsonl", json.dumps({"text": "a JSON Lines document"}) + "\n")
    return d


@pytest.fixture
def raw_qa(tmp_path, write):
    d = tmp_path / "raw_qa"
    write(d / "qa.jsonl", "".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."}) + "\n"
                                  for i in range(12)))
    write(d / "chat.yml", "conversations:\n- - Hello\n  - Hi there\n- - How are you?\n  - Fine, thanks.\n")
    return d


@pytest.mark.parametrize("case", ["same", "symlink", "inside", "holds"])
def test_an_output_overlapping_the_input_is_refused_and_the_input_survives(raw, tmp_path, fails, case, snapshot):
    before = snapshot(tmp_path)
    os.symlink(raw, tmp_path / "link")
    out, why = {"same": (raw, "is the input"), "symlink": (tmp_path / "link", "is the input"),
                "inside": (raw / "clean", "is inside the input"), "holds": (tmp_path, "holds the input")}[case]
    msg = fails(prepare_data_pretrain, ["--input", str(raw), "--output", str(out), "--overwrite", "--num_workers", "0"])
    assert msg.startswith(f"prepare_data_pretrain.py: error: --output {out} {why} {raw}: ")
    os.remove(tmp_path / "link")
    assert snapshot(tmp_path) == before  # before the fix "same" left only report.json and a shard


def test_every_data_script_refuses_its_input_as_output(raw, raw_qa, tmp_path, fails, prepare_pretrain_cli,
                                                       prepare_finetune_cli, snapshot):
    prepare_pretrain_cli([raw], tmp_path / "cleaned")
    prepare_finetune_cli([raw_qa], tmp_path / "prepared_qa")
    before = snapshot(tmp_path)
    for module, src in ((build_pretrain_datasets, tmp_path / "cleaned"), (prepare_data_finetune, raw_qa),
                        (build_finetune_datasets, tmp_path / "prepared_qa")):
        msg = fails(module, ["--input", str(src), "--output", str(src), "--overwrite"])
        assert f"--output {src} is the input {src}: writing it would replace the input" in msg
        msg = fails(module, ["--input", str(src), "--output", str(src / "sub")])
        assert f"--output {src / 'sub'} is inside the input {src}: a later run would read it back" in msg
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_this_scripts_own_output(raw, tmp_path, write, fails, prepare_pretrain_cli, snapshot):
    other = tmp_path / "other"
    write(other / "notes.txt", "mine")
    for flags in ([], ["--overwrite"]):
        msg = fails(prepare_data_pretrain, ["--input", str(raw), "--output", str(other), *flags])
        assert msg.endswith(f"output directory {other} already exists and was not written by this script (it has no "
                            "report.json of ours); --overwrite replaces only this script's own output: choose another "
                            "path or empty it yourself")
    assert snapshot(other) == {"notes.txt": b"mine"}
    cleaned = tmp_path / "cleaned"
    prepare_pretrain_cli([raw], cleaned)
    first = snapshot(cleaned)
    prepare_pretrain_cli([raw], cleaned, "--overwrite")  # its own output: replaced (by an identical one)
    assert snapshot(cleaned) == first
    # another script's output is not this one's to replace either
    prepare_pretrain_cli([raw], tmp_path / "cleaned2")
    msg = fails(build_pretrain_datasets, ["--input", str(cleaned), "--output", str(tmp_path / "cleaned2"),
                                          "--overwrite"])
    assert "was not written by this script (it has no meta.json of ours)" in msg
    assert snapshot(tmp_path / "cleaned2") == first


def test_overwrite_onto_a_regular_file_keeps_it_and_leaves_no_old_copy(raw, tmp_path, write, fails):
    write(tmp_path / "out", "a file")
    msg = fails(prepare_data_pretrain, ["--input", str(raw), "--output", str(tmp_path / "out"), "--overwrite"])
    assert msg.endswith(f"output directory {tmp_path / 'out'} is an existing file, not a directory; remove it or "
                        "choose another path")
    assert sorted(os.listdir(tmp_path)) == ["out", "raw"] and (tmp_path / "out").read_text() == "a file"


def test_replace_dir_over_a_file_leaves_no_old_copy(tmp_path, write):
    write(tmp_path / "new" / "a", "new")
    write(tmp_path / "dst", "old file")
    replace_dir(str(tmp_path / "new"), str(tmp_path / "dst"))  # rmtree(file, ignore_errors) used to leave dst.old-*
    assert os.listdir(tmp_path) == ["dst"] and (tmp_path / "dst" / "a").read_text() == "new"


def test_build_refuses_raw_input_and_names_the_files_it_would_skip(raw, raw_qa, tmp_path, fails, no_output):
    out = tmp_path / "built"
    msg = fails(build_pretrain_datasets, ["--input", str(raw), "--output", str(out)])
    assert msg.endswith(f"--input {raw} holds 18 file(s) this step would not read (1 .json, 17 .txt: array.json, "
                        "book00.txt, book01.txt, ...); build_pretrain_datasets.py reads the .jsonl that "
                        f"prepare_data_pretrain.py writes: run prepare_data_pretrain.py --input {raw} --output "
                        "PREPARED_DIR, then build from PREPARED_DIR")
    msg = fails(build_finetune_datasets, ["--input", str(raw_qa), "--output", str(out)])
    assert "holds 1 file(s) this step would not read (1 .yml: chat.yml)" in msg
    assert no_output(out)


def test_build_names_another_stages_data_and_an_already_built_dataset(raw, tmp_path, fails, prepare_pretrain_cli,
                                                                     build_pretrain_cli):
    cleaned, built = tmp_path / "cleaned", tmp_path / "built"
    prepare_pretrain_cli([raw], cleaned)
    msg = fails(build_finetune_datasets, ["--input", str(cleaned), "--output", str(tmp_path / "o")])
    assert msg.endswith(f"--input {cleaned} is cleaned pretraining text (prepare_data_pretrain.py output); "
                        "build_finetune_datasets.py reads prepared fine-tuning examples "
                        "(prepare_data_finetune.py output)")
    build_pretrain_cli(cleaned, built)
    msg = fails(build_pretrain_datasets, ["--input", str(built), "--output", str(tmp_path / "o")])
    assert msg.endswith(f"--input {built} is already a built pretraining dataset (build_pretrain_datasets.py output): "
                        f"train on it with --data_dir={built}")


def test_a_single_file_output_replaces_only_its_own_earlier_result(tmp_path, write):
    # evaluate.py --output FILE: a checkpoint's config.json or any other file must never be replaced
    ckpt = tmp_path / "ckpt"
    write(ckpt / "config.json", '{"format": "minigpt-gpt2"}')
    for out, why in ((ckpt / "config.json", "is inside the input"), (ckpt, "is the input"),
                     (tmp_path, "holds the input")):
        with pytest.raises(OutputExistsError, match=f"--output {out} {why} {ckpt}"):
            check_output_file(str(out), "results", [str(ckpt)])
    write(tmp_path / "notes.json", '{"mine": 1}')
    with pytest.raises(OutputExistsError, match="already exists and was not written by this script"):
        check_output_file(str(tmp_path / "notes.json"), "results", [str(ckpt)])
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputExistsError, match="is a directory"):
        check_output_file(str(tmp_path / "sub"), "results")
    write(tmp_path / "eval.json", '{"results": {}}')
    check_output_file(str(tmp_path / "eval.json"), "results", [str(ckpt)])  # its own earlier result: fine
    check_output_file(str(tmp_path / "new.json"), "results", [str(ckpt)])
    assert (ckpt / "config.json").read_text() == '{"format": "minigpt-gpt2"}'
