"""Issue 20 item 3: a built dataset cut short (or with an empty split) is refused in one line before anything
is created: no traceback from inside numpy, no empty ckpt_dir, no model loaded for nothing."""
import os

import pytest

import evaluate
import pretrain

TINY = ["--model_type=gpt2-tiny", "--max_seq_length=16", "--mixed_precision=false", "--device=cpu", "--cpu_threads=1",
        "--micro_batch_size=2", "--max_train_iters=2"]


@pytest.fixture
def built(tmp_path, write, prepare_pretrain_cli, build_pretrain_cli):
    """Two real build_pretrain_datasets.py outputs: one with a validation split, one built with --val_fraction 0."""
    for i in range(6):
        write(tmp_path / "raw" / f"{i}.txt", f"Document {i} about the river and the long road. " * 20)
    prepare_pretrain_cli([tmp_path / "raw"], tmp_path / "cleaned")
    build_pretrain_cli(tmp_path / "cleaned", tmp_path / "built", "--val_fraction", "0.5")
    build_pretrain_cli(tmp_path / "cleaned", tmp_path / "no_val", "--val_fraction", "0")
    return tmp_path


def refused(tmp_path, capsys, data_dir):
    """pretrain.py on data_dir: the one line it printed; neither its ckpt_dir nor its log_dir exists."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        pretrain.main(TINY + [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
                              f"--log_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()
    return err.strip()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_token_file_cut_to_an_odd_size_is_one_line_and_creates_nothing(built, capsys, split):
    path = built / "built" / f"{split}.bin"
    os.truncate(path, 1001)  # the reviewer's `truncate -s 1001`
    assert refused(built, capsys, built / "built") == (
        f"pretrain.py: error: {path} is 1001 bytes, not a whole number of uint16 tokens (cut short?); rebuild it "
        "with build_pretrain_datasets.py or copy it again")


def test_a_token_file_cut_at_a_token_boundary_is_caught_by_its_meta_json(built, capsys):
    path = built / "built" / "train.bin"
    tokens = os.path.getsize(path) // 2
    os.truncate(path, 1000)  # still whole tokens: only meta.json's count tells
    assert refused(built, capsys, built / "built") == (
        f"pretrain.py: error: {path} holds 500 tokens, but its meta.json records {tokens} (cut short or replaced?); "
        "rebuild it with build_pretrain_datasets.py or copy it again")


def test_val_loss_on_an_empty_val_bin_is_one_line_before_loading_a_model(built, fails):
    # The checkpoint does not exist either: the data is checked first, so the val.bin is what the line names.
    line = fails(evaluate, ["--checkpoint", str(built / "no_model"), "--tasks", "val_loss",
                            "--val_data", str(built / "no_val")])
    assert line == (f"evaluate.py: error: {built / 'no_val' / 'val.bin'} is empty (built with --val_fraction 0?); "
                    "rebuild the dataset with a --val_fraction above 0, or pass another --val_data")
