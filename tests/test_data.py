"""The DataModule: sources, checks that name file/row/field, truncation, and paired/unpaired batches."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from micro_fixtures import micro_model, micro_pairs  # noqa: F401  (fixtures)

from prefopt.train.data import EpochSeededSampler, PreferenceDataModule


def _dm(path, model, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(dataset=str(path), tokenizer=str(model), val_fraction=0.25, batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paired_batch_layout(micro_model, micro_pairs):
    dm = _dm(micro_pairs, micro_model)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8  # 4 chosen rows then 4 rejected rows
    # Both halves share their prompts, row for row.
    first = batch["input_ids"][:, :3]
    assert torch.equal(first[:4], first[4:])
    assert (batch["completion_mask"] <= batch["attention_mask"]).all()
    assert batch["completion_mask"][:, :3].sum() == 0  # "<bos> film :" is prompt


def test_unpaired_batches_mix_labels_and_append_mismatched_kl_rows(micro_model, micro_pairs):
    dm = _dm(micro_pairs, micro_model, unpaired=True)
    batches = list(dm.train_dataloader())
    labels = torch.cat([b["desirable"] for b in batches])
    assert labels.shape[0] == len(dm.train_examples) * 2 // 8 * 8  # drop_last over 2 x pairs rows
    assert all(0 < b["desirable"].float().mean() < 1 for b in batches), "a batch holds a single label"
    b = batches[0]
    n = b["desirable"].shape[0]
    assert b["input_ids"].shape[0] == 2 * n
    # KL row i = prompt of row i + completion of row i+1.
    row_completion = lambda r: b["input_ids"][r][b["completion_mask"][r].bool()].tolist()  # noqa: E731
    assert row_completion(n + 0) == row_completion(1)


def test_truncation_keeps_the_end_of_the_prompt_and_drops_prompts_that_fill_max_length(micro_model, tmp_path):
    rows = [
        {"prompt": "the a it was film :", "chosen": "good great fun", "rejected": "bad dull"},
        {"prompt": "film :", "chosen": "good", "rejected": "bad"},
        {"prompt": "film :", "chosen": "good", "rejected": "good"},  # identical completions: dropped
    ] * 4
    path = _write(tmp_path / "t.jsonl", rows)
    dm = _dm(path, micro_model, max_length=6, max_prompt_length=3, val_split=None)
    prompts = {tuple(e["prompt_ids"]) for e in dm.train_examples + dm.val_examples}
    tok = dm.tokenizer
    assert tuple(tok.convert_tokens_to_ids(["was", "film", ":"])) in prompts  # keep_end: the last 3 tokens
    assert all(len(e["prompt_ids"]) + len(e["chosen_ids"]) <= 6 for e in dm.train_examples)
    assert dm.drop_counts["train"]["identical"] + dm.drop_counts["val"]["identical"] == 4
    assert dm.drop_counts["train"]["truncated"] > 0
    dm = _dm(path, micro_model, max_length=4, val_split=None)  # "<bos> the a it was film :" alone fills 4
    assert dm.drop_counts["train"]["prompt_too_long"] + dm.drop_counts["val"]["prompt_too_long"] == 4


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "film :", "chosen": "good"}], "missing column 'rejected'"),
        ([{"prompt": "film :", "chosen": "good", "rejected": 3}],
         r"row 1 \(counting from 1\), field 'rejected': expected a string"),
        ([{"prompt": "film :", "chosen": "good", "rejected": "bad"},
          {"prompt": "film :", "chosen": " ", "rejected": "bad"}], r"row 2 \(counting from 1\), field 'chosen': empty completion"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(rows, message, micro_model, tmp_path):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as exc:
        _dm(path, micro_model)
    assert str(path) in str(exc.value)


def test_unreadable_file_is_named(micro_model, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "film :", "chosen": "go')
    with pytest.raises(ValueError, match="broken.jsonl"):
        _dm(path, micro_model)


def test_column_mapping_and_other_formats(micro_model, micro_pairs, tmp_path):
    rows = [json.loads(line) for line in micro_pairs.read_text().splitlines()]
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    ds = datasets.Dataset.from_list(renamed)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "disk"))
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    reference = _dm(micro_pairs, micro_model)
    for source, extra in [("p.parquet", {}), ("p.csv", {}), ("disk", {"val_split": "test"})]:
        dm = _dm(tmp_path / source, micro_model, columns=columns, **extra)
        if not extra:
            assert dm.train_examples == reference.train_examples, source
        assert len(dm.val_examples) > 0


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSeededSampler(10, seed=3), EpochSeededSampler(10, seed=3)
    torch.manual_seed(123)
    first = list(a)
    torch.manual_seed(999)
    assert list(b) == first
    b.set_epoch(1)
    second = list(b)
    assert second != first and sorted(second) == list(range(10))
    b.skip = 4  # a resumed epoch skips what it already trained on, once
    assert list(b) == second[4:]
    assert list(b) == second
