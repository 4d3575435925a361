"""beta_dpo and alpha_dpo: hand values with their running state given explicitly, the state's arithmetic over two
batches, the Gaussian filter's distribution and reproducibility, validation reads, checkpoints, identities, limits.

Neither loss has a closed-form optimum to test on a bandit: beta-DPO's batch-level beta and alpha-DPO's z-score
depend on the batch's composition, and the bandits' population batch (every ordered pair) has mean margin 0. The
limit that replaces it: once the running mean has caught up with a constant batch, beta-DPO is DPO at beta.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases_adaptive import BETA_BATCH, HAND, INIT, Z_HAND, batch_z, hand_record, init_record
from loss_records import AVG_L, AVG_W, H, H_AVG, LL, LW, L, sig, t
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)

from prefopt.fast.scorer import Scorer, ScoringOptions
from prefopt.losses import LossConfig
from prefopt.losses.state import GaussianPairFilter, MarginMoments, SingleProcess
from prefopt.records import PairLogps

ONE = SingleProcess()


def f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def margins(xs: list[float], mean: float | None = None, std: float | None = None) -> PairLogps:
    """A record whose margins h (and averaged margins: one token each) are xs; optional running mean and std of h."""
    zero, one = t([0.0] * len(xs)), t([1.0] * len(xs))
    lp = PairLogps(t(xs), zero, one, one, zero, zero)
    return lp if mean is None else lp.replace(margin_ema_mean=f64(mean), margin_ema_std=f64(std))


def sample_std(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


# ---------------------------------------------------------------- hand values with the state's fields given
def test_generic_cases_hold_on_records_carrying_the_state_fields():
    for name, (params, expected) in HAND.items():
        torch.testing.assert_close(LossConfig(name, **params)(hand_record()), t(expected), rtol=1e-9, atol=1e-12)
    for name, (params, expected) in INIT.items():
        torch.testing.assert_close(LossConfig(name, **params)(init_record()), t(expected()), rtol=1e-9, atol=1e-12)


def test_beta_dpo_keeps_the_filtered_pairs_mean_and_offers_the_authors_discrepancy():
    lp = hand_record().replace(kept_pairs=torch.tensor([True, False, True]))
    # kept h = [1, 3]: mean M = 0.5 * 2 = 1, M_0 = 0.25: beta_batch = 0.5 (1 + 0.5 * 0.75) = 0.6875; scale B/k = 3/2
    out = LossConfig("beta_dpo", beta=0.5, alpha=0.5)(lp)
    torch.testing.assert_close(out, t([1.5 * L(0.6875 * 1), 0.0, 1.5 * L(0.6875 * 3)]), rtol=1e-12, atol=0)
    assert out.mean().item() == pytest.approx((L(0.6875) + L(0.6875 * 3)) / 2, rel=1e-12)  # the kept pairs' mean
    # discrepancy=margin (authors' code): M = h, beta_batch = 0.5 (1 + 0.5 (2/3 - 0.5)) = 13/24
    out = LossConfig("beta_dpo", beta=0.5, alpha=0.5, discrepancy="margin")(hand_record())
    torch.testing.assert_close(out, t([L(13 / 24 * h) for h in H]), rtol=1e-12, atol=0)
    # the linear rule would give 0.5 (1 + 10 * 0.5 (1/3 - 5)) < 0: floored at beta_min
    far = hand_record().replace(margin_ema_mean=f64(10.0))
    out = LossConfig("beta_dpo", beta=0.5, alpha=10.0, beta_min=0.01)(far)
    torch.testing.assert_close(out, t([L(0.01 * h) for h in H]), rtol=1e-12, atol=0)


def test_beta_dpo_is_dpo_at_alpha_zero_and_without_the_state_it_refuses():
    for lp in (hand_record(), hand_record().replace(margin_ema_mean=f64(-7.0))):
        torch.testing.assert_close(LossConfig("beta_dpo", beta=0.3, alpha=0.0)(lp), LossConfig("dpo", beta=0.3)(lp))
    with pytest.raises(ValueError, match="margin_ema_mean"):
        LossConfig("beta_dpo")(hand_record().replace(margin_ema_mean=None))


def test_beta_batch_and_the_running_mean_carry_no_gradient():
    lp = hand_record(grad=True).replace(margin_ema_mean=torch.tensor(0.5, dtype=torch.float64, requires_grad=True))
    LossConfig("beta_dpo", beta=0.5, alpha=0.5)(lp).sum().backward()
    assert lp.margin_ema_mean.grad is None
    # d L(b h)/d logp_w = -b sigmoid(-b h) with b = beta_batch a constant (a gradient through b would add a term)
    expected = t([-BETA_BATCH * sig(-BETA_BATCH * h) for h in H])
    torch.testing.assert_close(lp.policy_chosen_logps.grad, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(lp.policy_rejected_logps.grad, -expected, rtol=1e-12, atol=0)


def test_once_the_running_mean_has_caught_up_beta_dpo_is_dpo():
    state, lp = MarginMoments(momentum=0.5, margin="sum"), hand_record()
    for _ in range(60):  # 0.5^60: the EMA of a constant batch mean 2/3 has converged
        seen = state.update(lp, ONE)
    assert seen.margin_ema_mean.item() == pytest.approx(2 / 3, rel=1e-12)
    torch.testing.assert_close(LossConfig("beta_dpo", beta=0.5, alpha=0.9)(seen), LossConfig("dpo", beta=0.5)(lp))


# ---------------------------------------------------------------- the running statistics
def test_the_moments_of_two_batches_by_hand():
    state = MarginMoments(momentum=0.9, margin="sum")
    first = state.update(hand_record(), ONE)  # h = [1, -2, 3]: mean 2/3, sample std sqrt(57/9) = 2.5166
    assert first.margin_ema_mean.item() == pytest.approx(0.1 * 2 / 3, rel=1e-12)
    assert first.margin_ema_std.item() == pytest.approx(0.1 * sample_std(H), rel=1e-12)
    second = state.update(margins([2.0, 4.0]), ONE)  # mean 3, sample std sqrt(2)
    assert second.margin_ema_mean.item() == pytest.approx(0.9 * 0.1 * 2 / 3 + 0.1 * 3, rel=1e-12)  # 0.36
    assert second.margin_ema_std.item() == pytest.approx(0.9 * 0.1 * sample_std(H) + 0.1 * math.sqrt(2), rel=1e-12)
    assert first.margin_ema_mean.item() == pytest.approx(0.1 * 2 / 3)  # an earlier record keeps its values
    single = MarginMoments(momentum=0.9, margin="sum").update(margins([5.0]), ONE)
    assert single.margin_ema_std.item() == 0.0  # one pair: no spread
    averaged = MarginMoments(momentum=0.9, margin="mean").update(hand_record(), ONE)  # d = H_AVG
    assert averaged.avg_margin_ema_mean.item() == pytest.approx(0.1 * sum(H_AVG) / 3, rel=1e-12)
    assert averaged.avg_margin_ema_std.item() == pytest.approx(0.1 * sample_std(H_AVG), rel=1e-12)
    assert averaged.margin_ema_std is None  # the averaged margin fills only its own fields


def test_the_moments_span_ranks():
    class TwoRanks(SingleProcess):  # the other rank saw the same margins: the global batch is h twice
        def sum(self, tensor):
            return 2 * tensor

    seen = MarginMoments(momentum=0.0, margin="sum").update(hand_record(), TwoRanks())
    assert seen.margin_ema_mean.item() == pytest.approx(2 / 3, rel=1e-12)
    assert seen.margin_ema_std.item() == pytest.approx(sample_std(H + H), rel=1e-12)


def test_reads_change_no_state_and_keep_every_pair():
    moments, keep = MarginMoments(momentum=0.9, margin="sum"), GaussianPairFilter(rho=0.5, seed=3)
    for _ in range(3):
        keep.update(moments.update(margins([0.0, 1.0, 2.0, 9.0]), ONE), ONE)
    before = {k: v.clone() for m in (moments, keep) for k, v in m.state_dict(prefix=f"{id(m)}.").items()}
    val = keep.read(moments.read(margins([4.0, 5.0, 6.0, 7.0])))
    after = {k: v for m in (moments, keep) for k, v in m.state_dict(prefix=f"{id(m)}.").items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert val.kept_pairs is None and val.margin_ema_mean.item() == moments.mean.item()
    assert LossConfig("beta_dpo", alpha=0.0)(val).ne(0).all()  # every pair counts in validation


def test_a_state_round_trips_through_its_state_dict():
    moments, keep = MarginMoments(momentum=0.9, margin="sum"), GaussianPairFilter(rho=0.5, seed=1)
    batch = margins([0.0, 0.5, 1.0, 1.5, 2.0, 9.0])
    for _ in range(4):
        keep.update(moments.update(batch, ONE), ONE)
    moments2, keep2 = MarginMoments(momentum=0.9, margin="sum"), GaussianPairFilter(rho=0.5, seed=1)
    keep2.update(moments2.update(margins([3.0, 1.0]), ONE), ONE)  # a used state: loading must replace its draw count
    moments2.load_state_dict(moments.state_dict())
    keep2.load_state_dict(keep.state_dict())
    assert moments2.mean.item() == moments.mean.item() and moments2.std.item() == moments.std.item()
    assert int(keep2.draws) == int(keep.draws) == 4
    for _ in range(5):  # the resumed state draws what the original draws
        a, b = moments.update(batch, ONE), moments2.update(batch, ONE)
        assert torch.equal(keep.update(a, ONE).kept_pairs, keep2.update(b, ONE).kept_pairs)


# ---------------------------------------------------------------- the Gaussian filter
def test_the_filter_keeps_floor_rho_b_pairs_reproducibly():
    lp = margins([0.1 * i for i in range(10)], mean=0.5, std=0.3)
    masks = [GaussianPairFilter(rho=0.75, seed=7).update(lp, ONE).kept_pairs for _ in range(2)]
    assert torch.equal(masks[0], masks[1]) and int(masks[0].sum()) == 7  # floor(7.5)
    keep = GaussianPairFilter(rho=0.75, seed=7)
    draws = [keep.update(lp, ONE).kept_pairs for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # each draw has its own seed
    other = GaussianPairFilter(rho=0.75, seed=8)
    assert any(not torch.equal(d, other.update(lp, ONE).kept_pairs) for d in draws)
    assert GaussianPairFilter(rho=1.0, seed=0).update(lp, ONE).kept_pairs.all()
    assert int(GaussianPairFilter(rho=0.01, seed=0).update(lp, ONE).kept_pairs.sum()) == 1  # at least one
    assert int(GaussianPairFilter(rho=0.7, seed=0).update(lp, ONE).kept_pairs.sum()) == 7  # 0.7 * 10 in floats
    with pytest.raises(ValueError, match="declare MarginMoments before it"):
        GaussianPairFilter(rho=0.5, seed=0).update(margins([1.0, 2.0]), ONE)


def test_each_rank_draws_its_own_pairs(monkeypatch):
    """Under several processes the draw's seed also hashes the rank, so ranks do not share their noise."""
    lp = margins([0.1 * i for i in range(10)], mean=0.5, std=0.3)
    rank0 = GaussianPairFilter(rho=0.5, seed=7)
    masks0 = [rank0.update(lp, ONE).kept_pairs for _ in range(6)]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    rank1 = GaussianPairFilter(rho=0.5, seed=7)
    masks1 = [rank1.update(lp, ONE).kept_pairs for _ in range(6)]
    assert any(not torch.equal(a, b) for a, b in zip(masks0, masks1))


@pytest.mark.parametrize("rho", [0.34, 0.67])  # keep 1 or 2 of 3
def test_kept_pairs_follow_the_gaussian_weights(rho):
    """Margins [0, 1, 3] around mean 0 with std 1: w = [1, e^-1/2, e^-9/2]. Drawing k without replacement with
    probability proportional to w keeps pair i with P(i) = p_i (k = 1) or p_i + sum_j!=i p_j p_i / (1 - p_j)
    (k = 2), p = w / sum w; 4000 draws put each frequency within 0.03 (> 4 standard errors)."""
    xs = [0.0, 1.0, 3.0]
    w = [math.exp(-x * x / 2) for x in xs]
    p = [v / sum(w) for v in w]
    if rho < 0.5:
        expected = p
    else:
        expected = [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(3) if j != i) for i in range(3)]
    keep, lp = GaussianPairFilter(rho=rho, seed=0), margins(xs, mean=0.0, std=1.0)
    counts = sum(keep.update(lp, ONE).kept_pairs.double() for _ in range(4000))
    torch.testing.assert_close(counts / 4000, t(expected), rtol=0, atol=0.03)
    # the spread matters: with std 3 the weights are flatter, and the far pair is kept far more often
    flat = GaussianPairFilter(rho=rho, seed=0)
    wide = sum(flat.update(margins(xs, mean=0.0, std=3.0), ONE).kept_pairs.double() for _ in range(1000))
    assert wide[2] / 1000 > expected[2] + 0.1


def test_the_filter_survives_vanishing_weights_and_zero_spread():
    far = GaussianPairFilter(rho=0.5, seed=0).update(margins([1e3, 2e3, 5.0, 3e3], mean=0.0, std=1.0), ONE)
    # every w but the third underflows to 0 in float64 (torch.multinomial would refuse to draw 2); the log-weights
    # still order them: the two nearest pairs
    assert far.kept_pairs.tolist() == [True, False, True, False]
    flat = GaussianPairFilter(rho=0.5, seed=0).update(margins([0.0] * 4, mean=0.0, std=0.0), ONE)
    assert int(flat.kept_pairs.sum()) == 2  # at initialization (every h = 0, std 0): a uniform draw


# ---------------------------------------------------------------- alpha_dpo
def test_alpha_dpo_running_normalization_by_hand():
    lp = hand_record().replace(avg_margin_ema_mean=f64(0.2), avg_margin_ema_std=f64(0.5))
    z = [(d - 0.2) / 0.5 for d in H_AVG]  # [0.6, -2.0667, 3.6]
    expected = [L(2.0 * (w - v - 0.25 - 0.5 * q)) for w, v, q in zip(AVG_W, AVG_L, z)]
    torch.testing.assert_close(LossConfig("alpha_dpo", beta=2.0, gamma_beta_ratio=0.25, alpha=0.5)(lp), t(expected))
    with pytest.raises(ValueError, match="avg_margin_ema_mean"):
        LossConfig("alpha_dpo")(hand_record())
    # fed by its state: one update with momentum 0 gives the batch's own mean and std, so running = batch
    fed = MarginMoments(momentum=0.0, margin="mean").update(hand_record(), ONE)
    torch.testing.assert_close(LossConfig("alpha_dpo")(fed), LossConfig("alpha_dpo", normalization="batch")(fed))


def test_alpha_dpo_at_alpha_zero_is_simpo_and_its_margin_is_detached():
    lp = hand_record().replace(avg_margin_ema_mean=f64(0.2), avg_margin_ema_std=f64(0.5))
    for normalization in ("running", "batch"):
        alpha0 = LossConfig("alpha_dpo", beta=2.5, gamma_beta_ratio=0.4, alpha=0.0, normalization=normalization)
        torch.testing.assert_close(alpha0(lp), LossConfig("simpo", beta=2.5, gamma_beta_ratio=0.4)(lp))
    lp = hand_record(grad=True).replace(ref_chosen_logps=t([-5.0, -5.0, -4.0], grad=True))
    LossConfig("alpha_dpo", beta=2.0, gamma_beta_ratio=0.25, alpha=0.5, normalization="batch")(lp).sum().backward()
    assert lp.ref_chosen_logps.grad is None  # the reference enters only through the stop-gradient margin
    # d/d logp_w = -(beta / |y_w|) sigmoid(-logit): the policy reaches the loss only through u, not through z
    logits = [2.0 * (w - v - 0.25 - 0.5 * z) for w, v, z in zip(AVG_W, AVG_L, Z_HAND)]
    expected = t([-2.0 / n * sig(-q) for q, n in zip(logits, LW)])
    torch.testing.assert_close(lp.policy_chosen_logps.grad, expected, rtol=1e-12, atol=0)
    expected = t([2.0 / n * sig(-q) for q, n in zip(logits, LL)])
    torch.testing.assert_close(lp.policy_rejected_logps.grad, expected, rtol=1e-12, atol=0)


def test_alpha_dpo_batch_z_is_invariant_to_an_offset_of_every_margin():
    lp = hand_record()
    shifted = lp.replace(ref_chosen_logps=lp.ref_chosen_logps - 0.5 * lp.chosen_lengths)  # every d grows by 0.5
    assert batch_z([d + 0.5 for d in H_AVG]) == pytest.approx(Z_HAND)
    config = LossConfig("alpha_dpo", normalization="batch")
    torch.testing.assert_close(config(shifted), config(lp))


# ---------------------------------------------------------------- configuration and metadata
@pytest.mark.parametrize("name, bad", [
    ("beta_dpo", {"rho": 0.0}), ("beta_dpo", {"rho": 1.5}), ("beta_dpo", {"momentum": 1.0}),
    ("beta_dpo", {"seed": -1}), ("beta_dpo", {"seed": 1.5}), ("beta_dpo", {"alpha": -0.1}),
    ("beta_dpo", {"discrepancy": "nats"}), ("beta_dpo", {"beta": 0.1, "beta_min": 0.2}),
    ("alpha_dpo", {"normalization": "global"}), ("alpha_dpo", {"momentum": -0.1}), ("alpha_dpo", {"beta": 0.0}),
])
def test_bad_values_are_rejected(name, bad):
    with pytest.raises(ValueError, match=f"loss '{name}'"):
        LossConfig(name, **bad)


def test_the_declared_state_follows_the_hyperparameters_and_passes_the_scorer_check():
    from prefopt.train.module import PreferenceModule

    beta = LossConfig("beta_dpo", momentum=0.5, rho=0.6, seed=4)
    moments, keep = (factory() for factory in beta.state)
    assert (moments.momentum, moments.margin, keep.rho, keep.seed) == (0.5, "sum", 0.6, 4)
    assert {"margin_ema_mean", "kept_pairs"} <= beta.reads
    assert LossConfig("alpha_dpo", normalization="batch").state == ()
    assert not {"avg_margin_ema_mean", "avg_margin_ema_std"} & LossConfig("alpha_dpo", normalization="batch").reads
    assert [f().margin for f in LossConfig("alpha_dpo").state] == ["mean"]
    for config in (beta, LossConfig("alpha_dpo"), LossConfig("alpha_dpo", normalization="batch", ld_alpha=0.5)):
        Scorer(ScoringOptions(), config)  # every field it reads is produced by the scorer or its state
    assert LossConfig("beta_dpo", wpo=True).params["wpo"]  # the rows stay pairs: WPO's per-pair weights apply
    module = PreferenceModule(loss=beta)
    assert set(module.state_dict()) == {"loss_state.0.mean", "loss_state.0.std", "loss_state.1.draws"}
    assert not list(PreferenceModule(loss=LossConfig("alpha_dpo", normalization="batch")).buffers())


def test_a_resumed_beta_dpo_run_matches_the_uninterrupted_run(micro_base, tmp_path):
    """The shipped experiment, killed after step 4 and resumed from its checkpoint, ends as the uninterrupted run: the
    running mean and std and the filter's draw count travel in the checkpoint, so the same pairs are kept."""
    import json
    from pathlib import Path

    from prefopt.cli import main

    experiment = Path(__file__).resolve().parents[1] / "experiments" / "beta_dpo.yaml"
    every4 = ("--trainer.callbacks+={class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
              f"init_args: {{every_n_train_steps: 4, save_top_k: -1, dirpath: {tmp_path / 'ckpts'}}}}}")

    def fit(*args: str) -> dict:
        cli = main(["fit", f"--config={experiment}", "--trainer.max_steps=8", *args])
        assert int(cli.model.loss_state[1].draws) == 8  # one filter draw per training step
        return json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())

    full = fit(every4)
    resumed = fit(f"--ckpt_path={next((tmp_path / 'ckpts').glob('*step=4.ckpt'))}")
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)
