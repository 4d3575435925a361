"""Sources: every file type, save_to_disk directories, hub-layout directories, and clear errors for bad ones."""

from __future__ import annotations

import datasets
import pytest
from chat_fixtures import message_rows, write_hub_layout, write_jsonl

from prefopt.train.sources import load_rows

ROWS = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]


def test_every_file_type_gives_the_same_rows(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    write_jsonl(tmp_path / "r.jsonl", ROWS)
    ds.to_json(str(tmp_path / "r.json"), lines=False)
    ds.to_parquet(str(tmp_path / "r.parquet"))
    ds.to_csv(str(tmp_path / "r.csv"), index=False)
    for name in ("r.jsonl", "r.json", "r.parquet", "r.csv"):
        assert load_rows(str(tmp_path / name)).to_list() == ROWS, name


def test_save_to_disk_directories_and_hub_layout_directories(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    assert load_rows(str(tmp_path / "one")).to_list() == ROWS
    assert len(load_rows(str(tmp_path / "dict"), split="test")) == 2
    with pytest.raises(ValueError, match="no split 'validation'; splits: train, test"):
        load_rows(str(tmp_path / "dict"), split="validation")
    # A folder laid out as a hub dataset repository: read by the same load_dataset call as a hub name.
    repo = write_hub_layout(tmp_path / "repo", message_rows(5), message_rows(3))
    assert len(load_rows(str(repo), split="train")) == 5 and len(load_rows(str(repo), split="test")) == 3
    assert load_rows(str(repo), split="test")[0]["chosen"] == message_rows(1)[0]["chosen"]


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file or directory: ./missing.jsonl"):
        load_rows("./missing.jsonl")
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown file type '.txt'"):
        load_rows(str(tmp_path / "r.txt"))
    write_jsonl(tmp_path / "r.jsonl", ROWS)
    with pytest.raises(ValueError, match="single file, so it has no split 'test'"):
        load_rows(str(tmp_path / "r.jsonl"), split="test")
    with pytest.raises(FileNotFoundError, match="val_split: no such file: ./val.jsonll"):  # a typo'd validation file
        load_rows(str(tmp_path / "r.jsonl"), split="./val.jsonll")
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "whole.parquet"))
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(ValueError, match="cut.parquet: could not read it as parquet"):
        load_rows(str(tmp_path / "cut.parquet"))
    with pytest.raises(ValueError, match="could not load hub dataset 'no-such-org/no-such-data'"):
        load_rows("no-such-org/no-such-data")  # offline in tests (HF_DATASETS_OFFLINE=1)


def test_a_separate_validation_file(tmp_path):
    from micro_fixtures import save_micro_model, write_micro_pairs

    from prefopt.train.data import PreferenceDataModule

    model = save_micro_model(tmp_path / "model")
    train, val = write_micro_pairs(tmp_path / "train.jsonl"), write_micro_pairs(tmp_path / "val.jsonl", n=8, seed=1)
    dm = PreferenceDataModule(dataset=str(train), val_split=str(val), tokenizer=str(model), batch_size=4)
    dm.setup("fit")
    assert len(dm.train_examples) == 24 and len(dm.val_examples) == 8
