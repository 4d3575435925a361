"""The losses that read the responses' scores: their optima, their limits, and the data path that brings the scores.

Optima: reward-aware PO's three distances are all 0 exactly where beta h = eta D for every pair, so on a tabular
bandit whose pairs are scored by the reward R the population optimum is pi_ref exp(eta R / beta) / Z, DPO's optimum
at beta / eta. A tied pair's Rao-Kupper and Davidson losses are smallest at h = 0.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from loss_records import H, L, hand_pairs, t
from micro_fixtures import micro_model, micro_pairs  # noqa: F401  (fixtures)
from test_loss_bandits import A, B, MU, R, one_thread, record, tv  # noqa: F401  (one_thread: fixture)

from prefopt.losses import LossConfig
from prefopt.train.data import PreferenceDataModule
from prefopt.train.formats import DataError


def _scored_population(loss: LossConfig, steps: int = 3000, lr: float = 0.05) -> torch.Tensor:
    """Every ordered pair (a, b) of arms, a as chosen, weighted mu(a) mu(b), scored by R; the trained policy."""
    theta = MU.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    weights = MU[A] * MU[B]
    for _ in range(steps):
        opt.zero_grad()
        lp = record(theta, A, B).replace(chosen_scores=R[A], rejected_scores=R[B])
        (weights * loss(lp)).sum().backward()
        opt.step()
    return torch.softmax(theta.detach(), -1)


@pytest.mark.parametrize("name", ["rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "infonca"])
def test_reward_aware_po_lands_on_dpos_optimum_at_beta_over_eta(name: str) -> None:
    """InfoNCA's soft labels sigmoid(D / alpha) put its optimum at beta h = D / alpha: eta plays 1 / alpha."""
    beta, eta = 0.5, 0.25
    loss = LossConfig(name, beta=beta, alpha=1 / eta) if name == "infonca" else LossConfig(name, beta=beta, eta=eta)
    policy = _scored_population(loss)
    target = torch.softmax(MU.log() + eta * R / beta, -1)
    assert tv(policy, target) < 2e-3, (policy, target)


def test_odpo_limits() -> None:
    lp = hand_pairs()
    torch.testing.assert_close(LossConfig("odpo", beta=0.3, alpha=0.0)(lp), LossConfig("dpo", beta=0.3)(lp))
    # identity scaling: offset alpha * D = 0.5 * [1, 0, -1]
    identity = LossConfig("odpo", beta=0.5, alpha=0.5, scaling="identity")(lp)
    torch.testing.assert_close(identity, t([L(0.5 * h - 0.5 * g) for h, g in zip(H, [1.0, 0.0, -1.0])]))
    # the log offset is taken at min_gap where D <= 0: a tied pair's loss falls as min_gap does
    loose = LossConfig("odpo", beta=0.5, min_gap=1e-4)(lp)[1]
    assert loose < LossConfig("odpo", beta=0.5, min_gap=0.1)(lp)[1]


def test_scores_carry_no_gradient() -> None:
    lp = hand_pairs(grad=True).replace(chosen_scores=t([2.0, 1.0, 0.5], grad=True))
    for name in ("odpo", "rpo_sq", "rpo_bwd_kl", "dpo_rk", "dpo_davidson"):
        LossConfig(name)(lp).sum().backward()
    assert lp.chosen_scores.grad is None and lp.policy_chosen_logps.grad is not None


@pytest.mark.parametrize("name", ["dpo_rk", "dpo_davidson"])
def test_a_tie_pulls_the_margin_to_zero(name: str) -> None:
    """A tied pair's loss -log P(tie | d) is smallest, with zero gradient, at d = beta h = 0, where P(tie) = 1/3."""
    def tie_loss(h: float) -> torch.Tensor:
        lp = hand_pairs().replace(ref_chosen_logps=t([-4.0 - h] * 3), policy_chosen_logps=t([-4.0] * 3, grad=True),
                                  policy_rejected_logps=t([-5.0] * 3), ref_rejected_logps=t([-5.0] * 3),
                                  chosen_scores=t([1.0] * 3), rejected_scores=t([1.0] * 3))
        return LossConfig(name, beta=0.5)(lp)[0], lp

    at_zero, lp = tie_loss(0.0)
    at_zero.backward()
    value = at_zero.item()
    assert abs(value - math.log(3.0)) < 1e-12 and abs(lp.policy_chosen_logps.grad[0].item()) < 1e-12
    assert tie_loss(1.0)[0].item() > value and tie_loss(-1.0)[0].item() > value


def test_without_ties_the_tie_models_tend_to_dpo() -> None:
    lp = hand_pairs().replace(chosen_scores=t([3.0] * 3), rejected_scores=t([1.0] * 3))  # no ties
    dpo = LossConfig("dpo", beta=0.5)(lp)
    torch.testing.assert_close(LossConfig("dpo_rk", beta=0.5, nu=1 + 1e-9)(lp), dpo)
    torch.testing.assert_close(LossConfig("dpo_davidson", beta=0.5, nu=1e-12)(lp), dpo)
    # a pair counts as a tie within tie_margin
    near = lp.replace(chosen_scores=t([1.2] * 3))
    assert torch.equal(LossConfig("dpo_rk", tie_margin=0.25)(near), LossConfig("dpo_rk")(near.replace(
        chosen_scores=t([1.0] * 3))))


def test_tie_parameters_are_range_checked() -> None:
    with pytest.raises(ValueError, match="loss 'dpo_rk', nu"):
        LossConfig("dpo_rk", nu=1.0)  # Rao-Kupper needs nu > 1: nu = 1 gives ties probability 0
    with pytest.raises(ValueError, match="loss 'odpo', scaling"):
        LossConfig("odpo", scaling="ratio")


# ---------------------------------------------------------------- the data path
def _scored_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(micro_pairs, **extra):
    rows = [json.loads(line) for line in micro_pairs.read_text().splitlines()]
    return [{**r, "score_w": 2.0 + i % 3, "score_l": 1.0, **extra} for i, r in enumerate(rows)]


def test_scores_reach_the_batches_through_the_column_mapping(micro_model, micro_pairs, tmp_path):
    path = _scored_file(tmp_path / "scored.jsonl", _rows(micro_pairs))
    dm = PreferenceDataModule(dataset=str(path), tokenizer=str(micro_model), val_fraction=0.25, batch_size=4,
                              scores=True, columns={"chosen_score": "score_w", "rejected_score": "score_l"})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    expected = [dm.train_examples[i]["chosen_score"] for i in batch["index"].tolist()]
    assert batch["chosen_score"].tolist() == expected and set(batch["rejected_score"].tolist()) == {1.0}
    assert set(next(iter(dm.val_dataloader()))) >= {"chosen_score", "rejected_score"}
    # without scores the batches carry none: a loss that does not read them pays nothing
    plain = PreferenceDataModule(dataset=str(path), tokenizer=str(micro_model), val_fraction=0.25, batch_size=4)
    plain.setup("fit")
    assert "chosen_score" not in next(iter(plain.train_dataloader()))


def test_missing_or_bad_scores_are_named_before_training(micro_model, micro_pairs, tmp_path):
    rows = [json.loads(x) for x in micro_pairs.read_text().splitlines()]
    unscored = [{k: v for k, v in r.items() if not k.endswith("_score")} for r in rows]
    path = _scored_file(tmp_path / "unscored.jsonl", unscored)
    with pytest.raises(DataError, match=r"unscored.jsonl: .*no column 'chosen_score' \(field 'chosen_score'\)"):
        PreferenceDataModule(dataset=str(path), tokenizer=str(micro_model), scores=True).setup("fit")
    rows = _rows(micro_pairs)
    rows[4]["score_l"] = "high"  # a score column under another name, mapped below
    bad = _scored_file(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl: row 5 \(counting from 1\), field 'score_l': a score must be"):
        PreferenceDataModule(dataset=str(bad), tokenizer=str(micro_model), scores=True,
                             columns={"chosen_score": "score_w", "rejected_score": "score_l"}).setup("fit")
