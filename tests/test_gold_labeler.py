"""The built-in task's scenario knobs (prefopt/gold/pairs.py, `Labeler`): each does what it says, measured on the
pairs it makes, and leaves everything else as the default labeler has it (same samples, same draws, same cache key).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from test_gold_task import one_thread  # noqa: F401  (autouse fixture: one thread)

from prefopt.gold import task
from prefopt.gold.build import _hash
from prefopt.gold.pairs import PAIRS_META, PAIRS_VERSION, Labeler, _reference_identity, ensure_pairs




def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _meta(path):
    return json.loads((path.parent / PAIRS_META).read_text())["train"]


def test_default_labeler_keeps_the_cache_key_of_the_pairs_made_before_the_knobs(gold_reference_dir, tmp_path):
    train, _ = ensure_pairs(gold_reference_dir, 0, 4, 2, 1.0, cache_dir=tmp_path)
    before = {"version": PAIRS_VERSION, "reference": _reference_identity(gold_reference_dir), "seed": 0,
              "pairs_per_prompt": 4, "val_pairs_per_prompt": 2, "label_temperature": 1.0,
              "topics": task.TRAIN_TOPICS, "max_new_tokens": 16}
    assert train.parent.name == f"pairs-{_hash(before)}"


def test_label_flip_rate_on_10000_pairs(gold_reference_dir, tmp_path):
    """Deterministic labels (T = 0) flipped with eps = 0.3: among pairs of distinct rewards, 30% +- 2% disagree with the
    reward; the samples are the default labeler's and the labels differ exactly on the flipped pairs."""
    clean, _ = ensure_pairs(gold_reference_dir, 1, 1250, 2, 0.0, cache_dir=tmp_path)
    noisy, _ = ensure_pairs(gold_reference_dir, 1, 1250, 2, 0.0, label_flip=0.3, cache_dir=tmp_path)
    clean_rows, noisy_rows = _rows(clean), _rows(noisy)
    assert len(noisy_rows) == 10_000
    distinct = [r for r in noisy_rows if r["chosen_reward"] != r["rejected_reward"]]
    wrong = sum(r["chosen_reward"] < r["rejected_reward"] for r in distinct) / len(distinct)
    assert abs(wrong - 0.3) < 0.02 and abs(_meta(noisy)["flipped_fraction"] - 0.3) < 0.02
    assert _meta(clean)["label_agreement"] == 1.0
    same = [{c["chosen"], c["rejected"]} == {n["chosen"], n["rejected"]} for c, n in zip(clean_rows, noisy_rows)]
    assert all(same)
    changed = sum(c["chosen"] != n["chosen"] for c, n in zip(clean_rows, noisy_rows))
    assert changed == round(_meta(noisy)["flipped_fraction"] * 10_000)  # ties' coin is the same draw in both


def test_length_biased_labeler_prefers_length_beyond_the_reward(gold_reference_dir, tmp_path):
    """With p_len = 0.4, a pair of unequal lengths is won by the longer response with probability
    p_len + (1 - p_len) q, where q is the reward labeler's own rate on the same pairs (measured: q ~ 0.5)."""
    plain, _ = ensure_pairs(gold_reference_dir, 2, 1250, 2, 1.0, cache_dir=tmp_path)
    biased, _ = ensure_pairs(gold_reference_dir, 2, 1250, 2, 1.0, length_bias=0.4, cache_dir=tmp_path)

    def longer_wins(rows):
        unequal = [r for r in rows if len(r["chosen"].split()) != len(r["rejected"].split())]
        return sum(len(r["chosen"].split()) > len(r["rejected"].split()) for r in unequal) / len(unequal)

    q = longer_wins(_rows(plain))
    assert abs(q - 0.5) < 0.05  # the gold reward is length-normalized: length barely predicts the label
    assert abs(longer_wins(_rows(biased)) - (0.4 + 0.6 * q)) < 0.02


def test_near_duplicate_pairs_differ_in_one_word(gold_reference_dir, tmp_path):
    train, _ = ensure_pairs(gold_reference_dir, 3, 50, 2, 1.0, rejected_edits=1, cache_dir=tmp_path)
    for r in _rows(train):
        a, b = r["chosen"].split(), r["rejected"].split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
        assert r["chosen_reward"] == task.gold_reward(r["topic"], a)
    # most one-word edits change the reward (a sentiment word in or out), and the labels follow it
    assert _meta(train)["ties"] < 0.5 * len(_rows(train))


def test_excluded_words_never_appear(gold_reference_dir, tmp_path):
    train, val = ensure_pairs(gold_reference_dir, 4, 50, 2, 1.0, excluded_words=["superb", "best"], extra_responses=1,
                              cache_dir=tmp_path)
    words = Counter(w for r in _rows(train) + _rows(val) for key in ("chosen", "rejected") for w in r[key].split())
    words.update(w for r in _rows(train) for e in r["extra"] for w in e.split())
    assert not {"superb", "best"} & set(words) and words["great"] > 0


@pytest.mark.parametrize("bad, match", [
    ({"label_flip": 1.5}, r"data.gold.label_flip must be in \[0, 1\]"),
    ({"length_bias": -0.1}, r"data.gold.length_bias must be in \[0, 1\]"),
    ({"excluded_words": ["splendid"]}, r"data.gold.excluded_words: \['splendid'\] are not words of the task"),
])
def test_bad_knobs_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        Labeler(**bad)
