"""Functions of the margin: their tabular optima, their single-pair limits, identities and parameter ranges.

The optima, derived from each loss's pairwise minimizer (a pair (a, b) labeled a > b with probability p contributes
p f(beta d) + (1 - p) f(-beta d), d = r_a - r_b; where the minimizers are differences of one function of the arm,
the population optimum attains them all). Bradley-Terry labels on the reward R (tests/test_loss_bandits.py):
- exponential f(x) = exp(-x): beta d* = logit(p) / 2 = (R_a - R_b) / 2, so pi* = pi_ref exp(R / (2 beta)) / Z;
- Savage f(x) = sigmoid(-x)^2: sigmoid(beta d*) = p, DPO's optimum pi_ref exp(R / beta) / Z;
- truncated quadratic: beta d* = 2p - 1 where that is <= 1, the squared loss's least-squares optimum
  pi_ref exp(2 P(y > mu) / beta) / Z (IPO at tau = beta / 2) whenever those margins stay below 1/beta;
- chi-PO without clipping: beta (phi(u_a) - phi(u_b)) = R_a - R_b, u = pi / pi_ref, so
  u_a = phi^-1((R_a - lambda) / beta), lambda normalizing.
"""

from __future__ import annotations

import math

import pytest
import torch
from loss_records import H, L, R_L, R_W, hand_pairs, t
from test_loss_bandits import (  # noqa: F401  (one_thread: fixture)
    MU, R, bt_preferences, dpo_optimum, ipo_optimum, one_thread, train_population, train_single_pair, tv,
)

from prefopt.losses import LossConfig
from prefopt.records import PairLogps


# ---------------------------------------------------------------------------------------------- GPO
def test_gpo_exponential_lands_on_dpos_optimum_at_twice_the_beta() -> None:
    beta = 0.5
    policy = train_population(LossConfig("gpo_exp", beta=beta), bt_preferences(R))
    assert tv(policy, dpo_optimum(2 * beta)) < 0.01, (policy, dpo_optimum(2 * beta))
    assert tv(dpo_optimum(2 * beta), dpo_optimum(beta)) > 0.1  # a different point from DPO's at the same beta


def test_gpo_savage_is_a_proper_loss_with_dpos_optimum() -> None:
    beta = 0.5
    policy = train_population(LossConfig("gpo_savage", beta=beta), bt_preferences(R), steps=3000)
    assert tv(policy, dpo_optimum(beta)) < 0.01, (policy, dpo_optimum(beta))


def test_gpo_truncated_quadratic_lands_on_ipos_optimum_at_half_the_beta() -> None:
    beta, prefs = 0.5, bt_preferences(R)
    win_rate = prefs @ MU  # P(y > mu): the optimal margins are beta d = 2 (win_a - win_b), all below 1 here
    assert 2 * float(win_rate.max() - win_rate.min()) < 1
    policy = train_population(LossConfig("gpo_truncated_quadratic", beta=beta), prefs)
    assert tv(policy, ipo_optimum(prefs, beta / 2)) < 0.01, (policy, ipo_optimum(prefs, beta / 2))


def test_truncated_quadratic_stops_at_margin_one_over_beta_and_exponential_does_not_stop() -> None:
    beta = 0.5
    margins = train_single_pair(LossConfig("gpo_truncated_quadratic", beta=beta), steps=800, lr=0.01)
    assert 1 / beta <= margins[-1] < 1 / beta + 0.25, margins[-1]  # Adam's momentum overshoots a little
    assert margins[-1] == margins[599]  # no gradient once h >= 1/beta
    exp = train_single_pair(LossConfig("gpo_exp", beta=beta), steps=800, lr=0.01)
    assert exp[-1] > margins[-1] + 1 and exp[-1] > exp[599] + 0.5  # past 1/beta and still growing


def _grad_in_margin(name: str, beta: float, h: list[float]) -> torch.Tensor:
    """d loss / d h for pairs with margins h (r_w = h, r_l = 0), shape (len(h),)."""
    lp = PairLogps(t(h, grad=True), t([0.0] * len(h)), t([1.0] * len(h)), t([1.0] * len(h)),
                   t([0.0] * len(h)), t([0.0] * len(h)))
    LossConfig(name, beta=beta)(lp).sum().backward()
    assert lp.policy_chosen_logps.grad is not None
    return lp.policy_chosen_logps.grad


def test_savage_gradient_is_its_closed_form_and_vanishes_on_both_tails() -> None:
    """f'(x) = -2 sigmoid(-x)^2 sigmoid(x): a badly ranked pair (an outlier, beta h << 0) gets almost no push, unlike
    DPO, whose push tends to beta there; exponential's grows without bound."""
    beta, h = 0.5, [-20.0, -2.0, 0.0, 2.0, 20.0]
    expected = [-2 * beta * (1 / (1 + math.exp(beta * x))) ** 2 / (1 + math.exp(-beta * x)) for x in h]
    savage = _grad_in_margin("gpo_savage", beta, h)
    torch.testing.assert_close(savage, t(expected))
    dpo, exp = _grad_in_margin("dpo", beta, h), _grad_in_margin("gpo_exp", beta, h)
    assert abs(float(savage[0])) < 1e-3 and abs(float(savage[-1])) < 1e-3
    assert float(dpo[0]) == pytest.approx(-beta, rel=1e-4) and float(exp[0]) < -1000 * beta
    assert bool((savage < 0).all())  # still a push the right way everywhere


def test_gpo_identities() -> None:
    lp = hand_pairs()
    beta = 0.5
    trunc = LossConfig("gpo_truncated_quadratic", beta=beta)(lp)
    torch.testing.assert_close(trunc, LossConfig("hinge", beta=beta)(lp) ** 2)  # the squared hinge
    # below beta h = 1 it is GPO's squared loss (beta h - 1)^2 = beta^2 IPO(tau = beta/2): pairs 0, 1 (beta h = 0.5, -1)
    ipo = LossConfig("ipo", beta=beta / 2)(lp)
    torch.testing.assert_close(trunc[:2], beta**2 * ipo[:2])
    assert float(trunc[2]) == 0.0 and float(ipo[2]) > 0  # pair 2 (beta h = 1.5) is past the truncation
    savage = LossConfig("gpo_savage", beta=beta)(lp)
    torch.testing.assert_close(savage, torch.sigmoid(-beta * t(H)) ** 2)


# ---------------------------------------------------------------------------------------------- chi-PO
def _phi_inverse(y: float) -> float:
    """The u > 0 with u + log u = y, by bisection (phi is increasing)."""
    lo, hi = 1e-300, max(1.0, y + 1.0)
    for _ in range(200):
        mid = math.sqrt(lo * hi) if hi / lo > 4 else (lo + hi) / 2
        lo, hi = (mid, hi) if mid + math.log(mid) < y else (lo, mid)
    return (lo + hi) / 2


def chipo_optimum(beta: float) -> torch.Tensor:
    """pi_ref u with u_a = phi^-1((R_a - lambda) / beta), lambda chosen so that sum_a pi_ref(a) u_a = 1."""
    def mass(lam: float) -> float:
        return sum(float(m) * _phi_inverse((float(r) - lam) / beta) for m, r in zip(MU, R))

    lo, hi = -50.0, 50.0  # mass decreases in lambda
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) > 1 else (lo, mid)
    return torch.tensor([float(m) * _phi_inverse((float(r) - lo) / beta) for m, r in zip(MU, R)], dtype=torch.float64)


def test_chipo_lands_on_its_chi_squared_optimum_when_clipping_is_inactive() -> None:
    beta = 0.5
    optimum = chipo_optimum(beta)
    assert abs(float(optimum.sum()) - 1) < 1e-9
    policy = train_population(LossConfig("chipo", beta=beta, r_max=10.0), bt_preferences(R))
    assert tv(policy, optimum) < 0.01, (policy, optimum)
    assert tv(optimum, dpo_optimum(beta)) > 0.1  # more conservative than DPO's: the chi^2 term caps pi / pi_ref
    assert float((optimum / MU).max()) < float((dpo_optimum(beta) / MU).max())


def test_chipo_clipping_stops_the_margin_at_twice_r_max() -> None:
    """Two arms, reference 1/2 each: r = log(2 sigmoid(+-h)), so beta (phi(u_w) - phi(u_l)) = beta (2 tanh(h/2) + h)."""
    beta, r_max = 1.0, 0.5
    margins = train_single_pair(LossConfig("chipo", beta=beta, r_max=r_max), steps=800, lr=0.002)
    link_margin = beta * (2 * math.tanh(margins[-1] / 2) + margins[-1])
    assert 2 * r_max <= link_margin < 2 * r_max + 0.1, link_margin  # Adam's momentum overshoots a little
    assert margins[-1] == margins[599]  # clipped: no gradient


def test_chipo_unclipped_values_and_huge_ratios_stay_finite() -> None:
    lp = hand_pairs()
    expected = [L(0.5 * (math.exp(w) + w - math.exp(v) - v)) for w, v in zip(R_W, R_L)]
    torch.testing.assert_close(LossConfig("chipo", beta=0.5, r_max=100.0)(lp), t(expected))
    big = hand_pairs().replace(policy_chosen_logps=torch.tensor([300.0, 0.0, -300.0], requires_grad=True),
                               policy_rejected_logps=torch.zeros(3), ref_chosen_logps=torch.zeros(3),
                               ref_rejected_logps=torch.zeros(3))
    loss = LossConfig("chipo", beta=0.1)(big)
    loss.sum().backward()
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(big.policy_chosen_logps.grad).all())
    torch.testing.assert_close(loss.detach()[[0, 2]], torch.tensor([L(2.0), L(-2.0)]))  # clipped at +-2 r_max


# ---------------------------------------------------------------------------------------------- Cal-DPO
def _calibrated_point(beta: float, weight: float) -> float:
    """The stationary r of one pair with free log-ratios: r_w = -r_l = r, sigmoid(-2r) = 2 weight (r - 1/(2 beta))."""
    lo, hi = -10.0, 10.0 + 1 / beta
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 / (1 + math.exp(2 * mid)) > 2 * weight * (mid - 0.5 / beta) else (lo, mid)
    return lo


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_cal_dpo_calibrates_each_log_ratio_near_plus_minus_one_over_two_beta(weight: float) -> None:
    """One pair, r_w and r_l free: the minimum has r_w = -r_l just above 1/(2 beta); DPO's loss has no minimum there."""
    beta = 0.25
    chosen, rejected = torch.zeros(1, dtype=torch.float64, requires_grad=True), torch.zeros(1, dtype=torch.float64,
                                                                                               requires_grad=True)
    opt = torch.optim.LBFGS([chosen, rejected], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)
    zero, one = t([0.0]), t([1.0])
    loss = LossConfig("cal_dpo", beta=beta, calibration_weight=weight)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(PairLogps(chosen, rejected, one, one, zero, zero)).sum()
        value.backward()
        return value

    opt.step(closure)
    r = _calibrated_point(beta, weight)
    assert 0.5 / beta < r < 0.5 / beta + 0.1
    torch.testing.assert_close(torch.cat([chosen, rejected]).detach(), t([r, -r]), rtol=0, atol=1e-6)


def test_cal_dpo_is_dpo_at_beta_one_plus_sppos_squares() -> None:
    lp = hand_pairs()
    cal = LossConfig("cal_dpo", beta=0.3)
    composite = LossConfig("composite", terms=[{"name": "dpo", "beta": 1.0}, {"name": "sppo", "beta": 0.3}])
    torch.testing.assert_close(cal(lp), composite(lp), rtol=0, atol=1e-12)
    half = LossConfig("composite", terms=[{"name": "dpo", "beta": 1.0}, {"name": "sppo", "beta": 0.3, "weight": 0.5}])
    torch.testing.assert_close(LossConfig("cal_dpo", beta=0.3, calibration_weight=0.5)(lp), half(lp))
    no_calibration = LossConfig("cal_dpo", beta=0.3, calibration_weight=0.0)(lp)
    torch.testing.assert_close(no_calibration, LossConfig("dpo", beta=1.0)(lp), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- DPO with a margin
def _two_arm_margin(loss: LossConfig, p: float, steps: int = 2000) -> float:
    """Two arms, reference (0.4, 0.6), pairs from mu x mu with P(arm 0 > arm 1) = p; the trained beta-free margin h."""
    ref = torch.tensor([0.4, 0.6], dtype=torch.float64).log()
    theta = ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    chosen, rejected = torch.tensor([0, 1]), torch.tensor([1, 0])
    weights = t([p, 1 - p])  # mu(0) mu(1) is common to both orders; the tied diagonal pairs carry no gradient
    one = t([1.0, 1.0])
    for _ in range(steps):
        opt.zero_grad()
        logp = torch.log_softmax(theta, -1)
        lp = PairLogps(logp[chosen], logp[rejected], one, one, ref[chosen], ref[rejected])
        (weights * loss(lp)).sum().backward()
        opt.step()
    r = torch.log_softmax(theta.detach(), -1) - ref
    return float(r[0] - r[1])


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_dpo_margin_pairwise_optimum_moves_out_as_derived(margin: float) -> None:
    """a = exp(beta h*) solves (1 - p) a^2 + (1 - 2p) e^margin a - p = 0; margin 0 gives DPO's logit(p)."""
    beta, p = 0.5, 0.8
    c = math.exp(margin)
    a = (-(1 - 2 * p) * c + math.sqrt((1 - 2 * p) ** 2 * c * c + 4 * p * (1 - p))) / (2 * (1 - p))
    h = _two_arm_margin(LossConfig("dpo_margin", beta=beta, margin=margin), p)
    assert beta * h == pytest.approx(math.log(a), abs=1e-4), (beta * h, math.log(a))
    if margin == 0.0:
        assert math.log(a) == pytest.approx(math.log(p / (1 - p)))
    else:
        assert math.log(a) > math.log(p / (1 - p)) + 0.5


def test_dpo_margin_at_zero_is_dpo() -> None:
    lp = hand_pairs()
    torch.testing.assert_close(LossConfig("dpo_margin", beta=0.3, margin=0.0)(lp), LossConfig("dpo", beta=0.3)(lp),
                               rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name, bad", [
    ("gpo_exp", {"beta": 0.0}), ("gpo_savage", {"beta": -1.0}), ("gpo_truncated_quadratic", {"beta": float("inf")}),
    ("chipo", {"r_max": 0.0}), ("chipo", {"beta": 0.0}), ("cal_dpo", {"calibration_weight": -0.1}),
    ("cal_dpo", {"beta": 0.0}), ("dpo_margin", {"margin": -0.5}),
])
def test_bad_values_are_rejected(name: str, bad: dict) -> None:
    with pytest.raises(ValueError, match=f"loss '{name}'"):
        LossConfig(name, **bad)


def test_reward_scale_is_beta() -> None:
    for name in ("gpo_exp", "gpo_truncated_quadratic", "gpo_savage", "chipo", "cal_dpo", "dpo_margin"):
        assert LossConfig(name, beta=0.37).reward_scale == 0.37, name
        assert LossConfig(name).needs_reference and LossConfig(name).paired, name
