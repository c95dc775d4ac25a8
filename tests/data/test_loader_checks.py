"""Issue 16: the training loaders say what a wrong --data_dir holds (and how to build from it into
another directory), and fine-tuning at a shorter max_seq_length than the data was built for never
cuts a completion silently."""
import json

import pytest

from custom_dataset import DatasetError, FinetuneLoader, PretrainLoader


@pytest.fixture
def stages(tmp_path, write, prepare_pretrain_cli, build_pretrain_cli, prepare_finetune_cli, build_finetune_cli):
    """One directory of each kind: prepared and built, for pretraining and for fine-tuning."""
    write(tmp_path / "raw" / "a.txt", "A document about the river and the long road. " * 20)
    write(tmp_path / "raw" / "b.txt", "Another document about a small dog. " * 20)
    write(tmp_path / "qa" / "qa.jsonl", "".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) + "\n"
                                                for i in range(8)))
    d = {k: tmp_path / k for k in ("cleaned", "built", "prepared_qa", "built_qa")}
    prepare_pretrain_cli([tmp_path / "raw"], d["cleaned"])
    build_pretrain_cli(d["cleaned"], d["built"], "--val_fraction", "0.5")
    prepare_finetune_cli([tmp_path / "qa"], d["prepared_qa"])
    build_finetune_cli(d["prepared_qa"], d["built_qa"])
    return d


def test_a_prepared_dir_given_to_training_is_built_into_another_dir(stages):
    cleaned, qa = stages["cleaned"], stages["prepared_qa"]
    with pytest.raises(FileNotFoundError) as e:
        PretrainLoader([str(cleaned)], "train", 8, 1)
    # the old hint was "build_pretrain_datasets.py --input CLEANED_DIR --output <this cleaned dir>"
    assert str(e.value) == (f"pretraining data {cleaned / 'train.bin'} not found: {cleaned} holds cleaned pretraining "
                            f"text (prepare_data_pretrain.py output), not a built dataset: build it with "
                            f"build_pretrain_datasets.py --input {cleaned} --output {cleaned}_built, then pass "
                            f"--data_dir={cleaned}_built")
    hint = f"build it with build_finetune_datasets.py --input {qa} --output {qa}_built, then pass --data_dir={qa}_built"
    with pytest.raises(FileNotFoundError, match=hint):
        FinetuneLoader(str(qa / "train.jsonl"), 1)


def test_another_stages_dataset_is_named_as_such(stages):
    pretrain_data = r"a built pretraining dataset \(build_pretrain_datasets.py output\)"
    finetune_data = r"a built fine-tuning dataset \(build_finetune_datasets.py output\)"
    with pytest.raises(FileNotFoundError, match=f"is {pretrain_data}, which is for pretrain.py; "
                                                f"this run needs {finetune_data}"):
        FinetuneLoader(str(stages["built"] / "train.jsonl"), 1)
    with pytest.raises(FileNotFoundError, match=f"is {finetune_data}, which is for finetune.py or finetune_lora.py; "
                                                f"this run needs {pretrain_data}"):
        PretrainLoader([str(stages["built_qa"])], "train", 8, 1)
    (stages["built"] / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match="is a built pretraining dataset .* with files missing; rebuild it"):
        PretrainLoader([str(stages["built"])], "val", 8, 1)


def write_examples(d, lengths, max_seq_len):
    """train.jsonl of examples with the given (prompt, completion) lengths, and the meta.json of a build."""
    d.mkdir(exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps({"prompt_ids": list(range(p)), "completion_ids": list(range(c))})
                                           + "\n" for p, c in lengths))
    (d / "meta.json").write_text(json.dumps({"format": "minigpt-finetune-tokens-v1", "max_seq_len": max_seq_len}))
    return str(d / "train.jsonl")


def test_a_shorter_max_seq_length_refuses_to_cut_completions(tmp_path):
    # at 8 tokens: (3, 2) fits, (9, 3) loses 4 prompt tokens, (2, 8) and (1, 9) would lose completion tokens
    path = write_examples(tmp_path, [(3, 2), (9, 3), (2, 8), (1, 9)], max_seq_len=16)
    with pytest.raises(DatasetError) as e:
        FinetuneLoader(path, 1, max_seq_length=8)
    assert str(e.value) == (f"{path} was built with --max_seq_len 16; at --max_seq_length=8, 2 of its 4 examples would "
                            "lose the end of their completion (\" END\" included): rebuild it with "
                            "build_finetune_datasets.py --max_seq_len 8 (which drops those) or raise --max_seq_length")
    FinetuneLoader(path, 1, max_seq_length=16)  # what it was built for
    FinetuneLoader(path, 1, max_seq_length=10)  # every completion fits; (9, 3) only loses prompt tokens


def test_a_shorter_max_seq_length_notes_cut_prompts_once(tmp_path, capsys):
    path = write_examples(tmp_path, [(3, 2), (9, 3), (7, 2)], max_seq_len=16)
    loader = FinetuneLoader(path, 3, max_seq_length=8, shuffle=False)
    FinetuneLoader(path, 3, max_seq_length=8)  # made again (the val loader is, at every evaluation): no repeat
    FinetuneLoader(path, 3, max_seq_length=9, rank=1, world_size=2)  # other ranks stay quiet (1 would be cut at 9)
    assert capsys.readouterr().err == (f"note: {path} was built with --max_seq_len 16; at --max_seq_length=8, "
                                       "2 of its 3 examples lose the start of their prompt\n")
    x, y = loader.next_batch()
    assert x[1].tolist() == [4, 5, 6, 7, 8, 0, 1]  # the last 5 prompt tokens, then the whole completion
    assert (y[1] != -100).sum() == 3
