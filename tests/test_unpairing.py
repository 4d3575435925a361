"""Unpaired rows from pairs (prefopt/train/rows.py): two rows per pair by default, and the imbalanced and unrelated
rows of the scenario of unpaired labels, with exact counts."""

from __future__ import annotations

import pytest
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)

from prefopt.train.rows import Unpairing, unpaired_rows

PAIRS = [{"prompt_ids": [1, i % 3], "chosen_ids": [10 + i], "rejected_ids": [100 + i]} for i in range(40)]


def test_by_default_each_pair_gives_its_chosen_then_its_rejected_row():
    rows = unpaired_rows(PAIRS, None, seed=0)
    assert len(rows) == 80 and [r["desirable"] for r in rows[:4]] == [True, False, True, False]
    assert rows[2] == {"prompt_ids": [1, 1], "completion_ids": [11], "desirable": True}


def test_imbalanced_rows_keep_exact_fractions_of_each_label():
    rows = unpaired_rows(PAIRS, Unpairing(desirable=0.25), seed=0)  # 1:4
    assert sum(r["desirable"] for r in rows) == 10 and sum(not r["desirable"] for r in rows) == 40
    tenth = unpaired_rows(PAIRS, Unpairing(undesirable=0.1), seed=0)  # 10:1
    assert sum(not r["desirable"] for r in tenth) == 4
    assert unpaired_rows(PAIRS, Unpairing(desirable=0.25), seed=0) == rows  # seeded
    assert unpaired_rows(PAIRS, Unpairing(desirable=0.25), seed=1) != rows


def test_unrelated_rows_never_hold_both_responses_of_a_pair():
    rows = unpaired_rows(PAIRS, Unpairing(unrelated=True), seed=0)
    assert len(rows) == 40
    pair_of = [r["completion_ids"][0] - (10 if r["desirable"] else 100) for r in rows]
    assert sorted(pair_of) == list(range(40))  # one row per pair
    assert 10 < sum(r["desirable"] for r in rows) < 30  # a fair coin per pair


@pytest.mark.parametrize("bad", [{"desirable": 0.0}, {"undesirable": 1.5}])
def test_bad_fractions_are_named(bad):
    with pytest.raises(ValueError, match=r"data.unpairing.\w+ must be in \(0, 1\]"):
        Unpairing(**bad)


def test_a_fit_trains_on_the_rows_the_command_line_asks_for(micro_base, monkeypatch):
    """The CLI hands `data.unpairing` to the DataModule (an object, not its dict), and KTO trains on those rows."""
    from prefopt.cli import main

    seen = {}
    real = unpaired_rows

    def spy(examples, unpairing, seed):
        seen["rows"] = real(examples, unpairing, seed)
        return seen["rows"]

    monkeypatch.setattr("prefopt.train.data.unpaired_rows", spy)
    cli = main(["fit", "--model.loss={name: kto}", "--data.unpairing.desirable=0.5", "--data.unpairing.unrelated=true",
                "--trainer.max_steps=2"])
    assert cli.trainer.global_step == 2
    desirable = sum(r["desirable"] for r in seen["rows"])
    assert 0 < desirable < len(seen["rows"]) / 2 + 1 and len(seen["rows"]) < len(cli.datamodule.train_examples)
