"""Analytic targets on the gold task (prefopt/gold/targets.py): the numeric minimizer against both closed forms, the
labeler folded in against the labeler itself, and no target where none exists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prefopt.gold import targets
from prefopt.gold.pairs import Labeler
from prefopt.gold.task import frontier_point, frontier_reward_at_kl


def test_win_probability_by_hand_and_against_the_labeler():
    """Cells R = (1, 0), L = (5, 7), T = 1, flips 0.1, length bias 0.5: P(cell 0 wins) = 0.9 q + 0.1 (1 - q) with
    q = 0.5 sigmoid(1) + 0.5 * 0 (cell 1 is longer) = 0.365529; the labeler's own draws agree."""
    p = targets.win_probability(np.array([1.0, 0.0]), np.array([5, 7]), 1.0, 0.1, 0.5)
    q = 0.5 / (1 + math.exp(-1))
    assert p[0, 1] == pytest.approx(0.9 * q + 0.1 * (1 - q), abs=1e-12) == pytest.approx(0.392423, abs=1e-6)
    assert p[0, 1] + p[1, 0] == pytest.approx(1.0) and p[0, 0] == pytest.approx(0.5)
    labeler = Labeler(temperature=1.0, label_flip=0.1, length_bias=0.5)
    g, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    a, b = ["good"] * 5, ["bad"] * 7
    wins = np.mean([labeler.a_wins(a, b, 1.0, 0.0, g, noise)[0] for _ in range(20_000)])
    assert abs(wins - p[0, 1]) < 0.01  # 3 standard errors of 20,000 draws is 0.0104
    # T = 0: the higher reward wins, ties 50/50
    p0 = targets.win_probability(np.array([1.0, 0.0, 1.0]), np.zeros(3), 0.0)
    assert p0[0, 1] == 1.0 and p0[1, 0] == 0.0 and p0[0, 2] == 0.5


def test_the_numeric_minimizer_reproduces_both_closed_forms():
    """DPO with clean labels: the frontier point at b = T beta; IPO: u = P(y > mu) / tau; to 1e-8."""
    prob, reward, length = targets.cells(by_length=False)
    for t, beta in ((1.0, 0.5), (0.5, 2.0)):
        p = targets.win_probability(reward, length, t)
        u = targets.minimize_pair_loss(targets.margin_loss("dpo", {"beta": beta}), prob, p)
        assert targets.tilt_point(u, prob, reward) == pytest.approx(frontier_point(t * beta), abs=1e-8)
    for t, flip in ((1.0, 0.0), (0.0, 0.0), (1.0, 0.3)):
        p = targets.win_probability(reward, length, t, flip)
        u = targets.minimize_pair_loss(targets.margin_loss("ipo", {"beta": 0.5}), prob, p)
        closed = targets.target("ipo", {"beta": 0.5}, {"label_temperature": t, "label_flip": flip})
        assert closed[2] == "closed form"
        assert targets.tilt_point(u, prob, reward) == pytest.approx(closed[:2], abs=1e-8)


def test_targets_with_the_labeler_folded_in():
    """Flipped labels pull DPO's optimum toward the reference (the flip acts like a hotter labeler) and cDPO's further;
    robust DPO told the true eps is unbiased: its optimum is the clean frontier point; IPO's optimum tilts by a win
    rate, not by R, so it lies below the frontier; a length-biased labeler moves DPO's optimum off the frontier."""
    clean = frontier_point(0.5)
    kls = [targets.target("dpo", {"beta": 0.5}, {"label_flip": eps})[0] for eps in (0.0, 0.1, 0.2, 0.4)]
    assert kls[0] == pytest.approx(clean[0]) and all(np.diff(kls) < 0)
    cdpo = targets.target("dpo", {"beta": 0.5, "label_smoothing": 0.2}, {"label_flip": 0.2})
    assert cdpo[0] < kls[2]
    for eps in (0.1, 0.3):
        robust = targets.target("robust", {"beta": 0.5, "label_smoothing": eps}, {"label_flip": eps})
        assert robust[:2] == pytest.approx(clean, abs=1e-8) and robust[2] == "numeric"
    ipo_kl, ipo_reward, _ = targets.target("ipo", {"beta": 0.1}, {"label_temperature": 0.0})
    assert frontier_reward_at_kl(ipo_kl) - ipo_reward > 0.01
    biased_kl, biased_reward, _ = targets.target("dpo", {"beta": 0.5}, {"length_bias": 0.5})
    assert frontier_reward_at_kl(biased_kl) - biased_reward > 0.01


@pytest.mark.parametrize("name, params, data", [
    ("dpo", {"beta": 0.5}, {"label_temperature": 0.0}),  # deterministic labels: DPO's log-ratio is unbounded
    ("robust", {"beta": 0.5, "label_smoothing": 0.2}, {}),  # told of flips that never happen: no finite optimum
    ("dpo", {"beta": 0.5}, {"rejected_edits": 1}),  # the pairs are not two independent base samples
    ("dpo", {"beta": 0.5}, {"excluded_words": '["superb", "best"]'}),
    ("dpo", {"beta": 0.5, "ld_alpha": 0.5}, {}),  # reads more than the margin
    ("dpo", {"beta": 0.5, "f_divergence": "js"}, {}),
    ("ipo", {"beta": 0.5, "average_log_probs": True}, {}),
    ("simpo", {"beta": 2.0}, {}),
])
def test_no_target_where_none_exists(name, params, data):
    assert targets.target(name, params, data) is None


def test_a_knob_at_its_default_is_no_knob():
    assert targets.target("dpo", {"beta": 0.5}, {"rejected_edits": 0, "excluded_words": "[]", "label_flip": 0.0}) == (
        *frontier_point(0.5), "closed form")


@pytest.mark.parametrize("setting, loss, b", [
    ({"data.online": '{"pairs_per_round": 32, "responses_per_prompt": 4, "reward": "gold"}'}, "rloo", 0.3),
    ({"data.online": '{"pairs_per_round": 512}'}, "dpo", 0.3),  # on-policy pairs: DPO's optimum does not move
    ({"data.online": '{"pairs_per_round": 1024}', "model.reference_update": '{"every": 32, "alpha": 1.0}'}, "dpo",
     0.3 / 10),  # ceil(300 / 32) = 10 rounds
    ({"model.reference_update": '{"every": 150, "alpha": 1.0}', "data.stages": 2}, "dpo", 0.3 / 2),  # sDPO
    ({"model.reference_update": '{"every": 50, "alpha": 0.6}'}, "dpo", None),  # a soft update: none
    ({"data.online": '{"pairs_per_round": 32, "responses_per_prompt": 4, "reward": "reward_model"}'}, "rloo", None),
    ({"data.online": '{"pairs_per_round": 512}'}, "ipo", None),  # IPO's optimum depends on the sampler
    ({"data.online": '{"pairs_per_round": 512}', "data.gold.label_flip": 0.2}, "dpo", None),  # noisy labels
])
def test_the_targets_of_moving_references_and_on_policy_runs(setting, loss, b):
    """The report's targets where the reference moves by rule or the pairs come from the policy (300 steps, T = 1):
    the frontier point at b = beta (RLOO), T beta (on-policy DPO), T beta / k (k hard resets' stages); none else."""
    import pandas as pd

    from prefopt.study.report import loss_targets

    runs = pd.DataFrame([{"run": "r", "curve": "c", "variant": "c", "status": "ok", "loss": loss, "loss.beta": 0.3,
                          "seed": s, "trainer.max_steps": 300, "val/gold/sampled_kl": 1.0,
                          "val/gold/gold_reward": 1.0, **setting} for s in (0, 1)])
    table = loss_targets(runs)
    if b is None:
        assert table.empty
        return
    (row,) = table.itertuples()
    assert row.b == pytest.approx(b) and (row.target_kl, row.target_reward) == pytest.approx(frontier_point(b))
    assert row.n == 2
