"""A --data_dir that holds the wrong kind of data says what it holds and what to run (issue 16 item 10)."""
import json

import pytest

from custom_dataset import FinetuneLoader, PretrainLoader


def test_prepared_text_given_to_pretraining_suggests_building_into_another_dir(tmp_path):
    cleaned = tmp_path / "cleaned"  # prepare_data_pretrain.py output: shards of {"text": ...} and a report
    cleaned.mkdir()
    (cleaned / "shard_00000.jsonl").write_text(json.dumps({"text": "Hello there."}) + "\n")
    (cleaned / "report.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        PretrainLoader([(str(cleaned), 1)], "train", 8, 2)
    message = str(e.value)
    assert f"{cleaned} holds .jsonl files, not a built dataset" in message
    assert (f"build_pretrain_datasets.py --input {cleaned} --output {cleaned}_built, then pass "
            f"--data_dir={cleaned}_built") in message
    assert f"--output {cleaned} " not in message and not message.endswith(f"--output {cleaned}")  # never into itself


def test_a_dataset_of_the_other_stage_is_named(tmp_path, write_pretrain_data, write_finetune_data):
    pre, sft = write_pretrain_data(tmp_path / "pre", n_docs=50), write_finetune_data(tmp_path / "sft", 8, 4)
    with pytest.raises(FileNotFoundError, match=f"{pre} is a built pretraining dataset \\(build_pretrain_datasets.py "
                                                 "output\\), which is for pretrain.py; this run needs a built"):
        FinetuneLoader(f"{pre}/train.jsonl", 2)
    with pytest.raises(FileNotFoundError, match=f"{sft} is a built fine-tuning dataset \\(build_finetune_datasets.py "
                                                 "output\\), which is for finetune.py or finetune_lora.py"):
        PretrainLoader([(str(sft), 1)], "train", 8, 2)
