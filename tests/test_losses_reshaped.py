"""The reshaped DPO losses: their two-arm optima, what each gradient moves, their limits, and their ranges.

The optima are derived by hand from each loss's stationarity condition (docstrings below) on a two-arm bandit: arms 0
and 1, reference mu = (0.4, 0.6), one-token responses, ordered pairs (0 > 1) with weight p = 0.8 and (1 > 0) with
weight 1 - p (Bradley-Terry on a reward gap of logit 0.8). With pi_0 = x, r_0 = log(x / 0.4), r_1 = log((1 - x) / 0.6);
the roots are found by bisection on plain floats and compared with the policy Adam trains on the registry's losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from loss_records import H, L, hand_pairs, init_pairs, sig, t
from test_loss_bandits import one_thread  # noqa: F401  (fixture: one intra-op thread)

from prefopt.losses import LossConfig
from prefopt.records import PairLogps

MU2 = torch.tensor([0.4, 0.6], dtype=torch.float64)
P, BETA = 0.8, 1.0


def _two_arm(loss: LossConfig, steps: int = 1500, lr: float = 0.05) -> float:
    """Minimize p loss(0 > 1) + (1 - p) loss(1 > 0) over the logits with Adam; return pi_0."""
    theta = MU2.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    chosen, rejected = torch.tensor([0, 1]), torch.tensor([1, 0])
    weights = torch.tensor([P, 1 - P], dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        logp = torch.log_softmax(theta, -1)
        lp = PairLogps(logp[chosen], logp[rejected], one, one, MU2.log()[chosen], MU2.log()[rejected])
        (weights * loss(lp)).sum().backward()
        opt.step()
    return float(torch.softmax(theta.detach(), -1)[0])


def _root(f: Callable[[float], float], lo: float, hi: float) -> float:
    """Bisection: the x in [lo, hi] where f changes sign."""
    assert f(lo) * f(hi) < 0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def _r(x: float) -> tuple[float, float]:
    return math.log(x / 0.4), math.log((1 - x) / 0.6)


def _pi0_from_margin(h: float) -> float:  # r_0 - r_1 = h  <=>  x / (1 - x) = (0.4 / 0.6) e^h
    return 0.4 * math.exp(h) / (0.4 * math.exp(h) + 0.6)


def _shift_optimum(lam: float) -> float:
    """dJ/dx = 0 with z_1 = beta (r_0 - lam r_1), z_2 = beta (r_1 - lam r_0):
    p sigmoid(-z_1) ((1 - x) + lam x) = (1 - p) sigmoid(-z_2) (x + lam (1 - x))."""
    def f(x: float) -> float:
        r0, r1 = _r(x)
        z1, z2 = BETA * (r0 - lam * r1), BETA * (r1 - lam * r0)
        return P * sig(-z1) * ((1 - x) + lam * x) - (1 - P) * sig(-z2) * (x + lam * (1 - x))
    return _root(f, 0.41, 0.999)


def _minor_optimum() -> float:
    """Where r_0 > 0 > r_1, J = p L(beta r_0) + (1 - p) L(-beta h), stationary where
    p sigmoid(-beta r_0) (1 - x) = (1 - p) sigmoid(beta h)."""
    def f(x: float) -> float:
        r0, r1 = _r(x)
        return P * sig(-BETA * r0) * (1 - x) - (1 - P) * sig(BETA * (r0 - r1))
    return _root(f, 0.41, 0.999)


def _bpo_optimum(alpha: float) -> float:
    """Where r_0 > -alpha r_1 and r_1 < -alpha r_0, both minima pick r_1's side: J = p L(-alpha beta r_1) + (1 - p)
    L(beta r_1) depends on r_1 alone, stationary where p alpha sigmoid(alpha beta r_1) = (1 - p) sigmoid(-beta r_1)."""
    r1 = _root(lambda r: P * alpha * sig(alpha * BETA * r) - (1 - P) * sig(-BETA * r), -20.0, 0.0)
    x = 1 - 0.6 * math.exp(r1)
    r0 = _r(x)[0]
    assert r0 > -alpha * r1 and r1 < -alpha * r0  # the regime the derivation assumed
    return x


def _focal_optimum(gamma: float, detached: bool) -> float:
    """FocalPO depends on z = beta h alone, which the logits set freely. Detached weight: the fixed point of
    p p_z^gamma (1 - p_z) = (1 - p) (1 - p_z)^gamma p_z, i.e. z = logit(p) / (1 - gamma). With the weight's gradient:
    p G'(z) = (1 - p) G'(-z), G'(z) = -sigmoid(z)^gamma sigmoid(-z) (1 + gamma log sigmoid(z))."""
    if detached:
        return _pi0_from_margin(math.log(P / (1 - P)) / (1 - gamma) / BETA)
    g = lambda z: -sig(z) ** gamma * sig(-z) * (1 + gamma * math.log(sig(z)))  # noqa: E731
    return _pi0_from_margin(_root(lambda z: P * g(z) - (1 - P) * g(-z), 0.0, 10.0) / BETA)


def _alphapo_optimum(beta: float, gamma: float, alpha: float) -> float:
    """Reference-free, one token: avg = log pi. dJ/dx = 0 gives p sigmoid(gamma - u) = (1 - p) sigmoid(u + gamma) with
    u = beta (r(pi_0) - r(pi_1)), i.e. a = e^u solves (1 - p) a^2 + (1 - 2p) e^gamma a - p = 0; then pi_0 by
    bisection."""
    c = math.exp(gamma)
    a = (-(1 - 2 * P) * c + math.sqrt((1 - 2 * P) ** 2 * c * c + 4 * P * (1 - P))) / (2 * (1 - P))
    reward = (lambda pi: math.log(pi)) if alpha == 0 else (lambda pi: (1 - pi ** -alpha) / alpha)
    return _root(lambda x: beta * (reward(x) - reward(1 - x)) - math.log(a), 1e-9, 1 - 1e-9)


TWO_ARM = {
    "dpo_shift": (LossConfig("dpo_shift", beta=BETA, f_lambda=0.5), lambda: _shift_optimum(0.5)),
    "minor_dpo": (LossConfig("minor_dpo", beta=BETA), _minor_optimum),
    "bpo": (LossConfig("bpo", beta=BETA, alpha=0.3), lambda: _bpo_optimum(0.3)),
    "focalpo": (LossConfig("focalpo", beta=BETA, gamma=0.05), lambda: _focal_optimum(0.05, detached=False)),
    "focalpo_detached": (LossConfig("focalpo", beta=BETA, gamma=0.5, detach_weight=True),
                         lambda: _focal_optimum(0.5, detached=True)),
    "alphapo": (LossConfig("alphapo", beta=2.0, gamma_beta_ratio=0.5, alpha=0.25),
                lambda: _alphapo_optimum(2, 1, 0.25)),
    "alphapo_negative": (LossConfig("alphapo", beta=2.0, gamma_beta_ratio=0.5, alpha=-0.5),
                         lambda: _alphapo_optimum(2, 1, -0.5)),
}


@pytest.mark.parametrize("case", sorted(TWO_ARM))
def test_two_arm_bandit_lands_on_the_derived_optimum(case: str) -> None:
    loss, optimum = TWO_ARM[case]
    expected = optimum()
    assert abs(_two_arm(loss) - expected) < 2e-3, (case, expected)


def test_two_arm_optima_against_dpos() -> None:
    """DPO's optimum is x / (1 - x) = (0.4/0.6) (p / (1 - p))^(1/beta). DPO-Shift (f < 1) gives the majority arm more
    mass than DPO; MinorDPO, whose rejected arm 1 stops being pushed once below the reference, stays nearer to it."""
    dpo = _pi0_from_margin(math.log(P / (1 - P)) / BETA)
    assert abs(_shift_optimum(1.0) - dpo) < 1e-9
    assert _shift_optimum(0.5) > _shift_optimum(0.9) > dpo
    assert 0.4 < _minor_optimum() < dpo
    assert abs(_alphapo_optimum(2, 0, 0) - _pi0_from_margin(math.log(P / (1 - P)) / 2 + math.log(1.5))) < 1e-9


def _three_arms(loss: LossConfig, steps: int = 1500) -> torch.Tensor:
    """Uniform reference over arms A, B, C; the pairs A > B and C > A. Returns the log-ratios r (3,) after training."""
    mu = torch.full((3,), 1 / 3, dtype=torch.float64)
    theta = mu.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    chosen, rejected, one = torch.tensor([0, 2]), torch.tensor([1, 0]), torch.ones(2, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        logp = torch.log_softmax(theta, -1)
        loss(PairLogps(logp[chosen], logp[rejected], one, one, mu.log()[chosen], mu.log()[rejected])).sum().backward()
        opt.step()
    return torch.log_softmax(theta.detach(), -1) - mu.log()


def test_bpo_and_minor_dpo_keep_a_chosen_response_from_degrading() -> None:
    """A is chosen over B and rejected against C. DPO lowers A without limit (the likelihood of a chosen response
    falls: BPO's "degraded chosen responses"); BPO's min(r_w, -alpha r_l) and MinorDPO's max(0, r_l) stop pushing A
    down as a rejected response once that would cost its chosen side, so A stays at or above the reference."""
    assert _three_arms(LossConfig("dpo", beta=1.0))[0] < -5
    for loss in (LossConfig("bpo", beta=1.0, alpha=0.3), LossConfig("bpo", beta=1.0, alpha=1.0),
                 LossConfig("minor_dpo", beta=1.0)):
        r = _three_arms(loss)
        assert r[0] > -1e-3 and r[1] < 0, (loss, r)  # A kept, B (only ever rejected) pushed down


# ---------------------------------------------------------------- what each gradient moves
def test_bpo_moves_only_the_weaker_side() -> None:
    """min(r_w, -0.3 r_l) = [0, -1, 0.6] picks [rejected, chosen, rejected]: each pair's gradient reaches only that
    side, d/d logp_w = -beta sigmoid(-z) and d/d logp_l = alpha beta sigmoid(-z)."""
    lp = hand_pairs(grad=True)
    LossConfig("bpo", beta=1.0, alpha=0.3)(lp).sum().backward()
    torch.testing.assert_close(lp.policy_chosen_logps.grad, t([0.0, -sig(1.0), 0.0]))
    torch.testing.assert_close(lp.policy_rejected_logps.grad, t([0.3 * sig(0.0), 0.0, 0.3 * sig(-0.6)]))


def test_bpo_hinge_link() -> None:
    torch.testing.assert_close(LossConfig("bpo", beta=1.0, alpha=0.3, link="hinge")(hand_pairs()), t([1.0, 2.0, 0.4]))


def test_minor_dpo_stops_pushing_a_rejected_response_below_the_reference() -> None:
    """r_l = [0, 1, -2]: DPO's rejected gradient beta sigmoid(-z) at r_l >= 0 (r_l = 0 included), none at r_l < 0."""
    lp = hand_pairs(grad=True)
    LossConfig("minor_dpo", beta=1.0)(lp).sum().backward()
    torch.testing.assert_close(lp.policy_rejected_logps.grad, t([sig(-1.0), sig(2.0), 0.0]))
    torch.testing.assert_close(lp.policy_chosen_logps.grad, t([-sig(-1.0), -sig(2.0), -sig(-1.0)]))
    # with every r_l >= 0 it is DPO
    shifted = hand_pairs().replace(ref_rejected_logps=t([-5.0, -6.0, -9.0]))
    torch.testing.assert_close(LossConfig("minor_dpo", beta=0.3)(shifted), LossConfig("dpo", beta=0.3)(shifted))


def test_dpo_shift_scales_the_rejected_gradient_by_f_lambda() -> None:
    lp = hand_pairs(grad=True)
    LossConfig("dpo_shift", beta=0.5, f_lambda=0.7)(lp).sum().backward()
    torch.testing.assert_close(lp.policy_rejected_logps.grad, -0.7 * lp.policy_chosen_logps.grad)
    same = LossConfig("dpo_shift", beta=0.3, f_lambda=1.0)(hand_pairs())
    torch.testing.assert_close(same, LossConfig("dpo", beta=0.3)(hand_pairs()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("schedule, f_at", [("increase_linear", lambda t: 0.5 + 0.4 * t),
                                            ("decrease_linear", lambda t: 0.9 - 0.4 * t)])
def test_dpo_shift_schedules_move_f_linearly_with_training_progress(schedule, f_at) -> None:
    """f runs from f_lambda_min to f_lambda (or back) as the run's progress t goes 0 -> 1; at each t the loss is the
    fixed strategy's at that f; the progress comes from the TrainingProgress state, told the trainer's steps."""
    from prefopt.losses.state import TrainingProgress

    config = LossConfig("dpo_shift", beta=0.5, f_lambda=0.9, f_lambda_min=0.5, schedule=schedule)
    assert "training_progress" in config.reads and config.state == (TrainingProgress,)
    state = TrainingProgress()
    for step, total in ((0, 300), (75, 300), (299, 300), (300, 300)):
        state.set_progress(step, total)
        lp = state.read(hand_pairs())
        assert float(lp.training_progress) == pytest.approx(step / total)
        fixed = LossConfig("dpo_shift", beta=0.5, f_lambda=f_at(step / total))(hand_pairs())
        torch.testing.assert_close(config(lp), fixed, rtol=0, atol=1e-6)
    assert LossConfig("dpo_shift").state == () and "training_progress" not in LossConfig("dpo_shift").reads
    with pytest.raises(ValueError, match="training_progress"):
        config(hand_pairs())  # no state ran: the field is missing, and the loss says which
    with pytest.raises(ValueError, match="must not exceed f_lambda"):
        LossConfig("dpo_shift", f_lambda=0.5, f_lambda_min=0.8, schedule="decrease_linear")


def test_focalpo_weights_pairs_by_their_ranking_probability() -> None:
    """gamma = 0 is DPO; the loss is DPO's times p^gamma; its gradient in z = beta h is -p^gamma (1 - p)(1 + gamma
    log p) with the weight's own gradient, -p^gamma (1 - p) with it detached."""
    lp = hand_pairs()
    torch.testing.assert_close(LossConfig("focalpo", beta=0.4, gamma=0.0)(lp), LossConfig("dpo", beta=0.4)(lp))
    gamma = 0.5
    for detach in (False, True):
        lp = hand_pairs(grad=True)
        LossConfig("focalpo", beta=1.0, gamma=gamma, detach_weight=detach)(lp).sum().backward()
        factor = [sig(h) ** gamma * (1 - sig(h)) * (1 + (0 if detach else gamma * math.log(sig(h)))) for h in H]
        torch.testing.assert_close(lp.policy_chosen_logps.grad, t([-f for f in factor]))
        torch.testing.assert_close(lp.policy_rejected_logps.grad, t(factor))


def test_focalpo_gradient_reverses_on_badly_misranked_pairs_unless_detached() -> None:
    """-p^gamma log p -> 0 as p -> 0: below p = e^(-1/gamma) the loss falls as the pair gets more misranked. With
    gamma = 0.5 that is p < e^-2 (beta h < -2.13); a pair at beta h = -3 is pushed the wrong way, unless detached."""
    lp = init_pairs(grad=True).replace(ref_chosen_logps=init_pairs().ref_chosen_logps + 3.0)  # h = -3
    LossConfig("focalpo", beta=1.0, gamma=0.5)(lp).sum().backward()
    assert bool((lp.policy_chosen_logps.grad > 0).all())
    lp = init_pairs(grad=True).replace(ref_chosen_logps=init_pairs().ref_chosen_logps + 3.0)
    LossConfig("focalpo", beta=1.0, gamma=0.5, detach_weight=True)(lp).sum().backward()
    assert bool((lp.policy_chosen_logps.grad < 0).all())


# ---------------------------------------------------------------- AlphaPO
def test_alphapo_tends_to_simpo_as_alpha_goes_to_zero() -> None:
    lp = hand_pairs()
    simpo = LossConfig("simpo", beta=2.5, gamma_beta_ratio=0.4)(lp)
    torch.testing.assert_close(LossConfig("alphapo", beta=2.5, gamma_beta_ratio=0.4, alpha=0.0)(lp), simpo, rtol=0,
                               atol=0)
    for alpha in (1e-6, -1e-6):
        near = LossConfig("alphapo", beta=2.5, gamma_beta_ratio=0.4, alpha=alpha)(lp)
        torch.testing.assert_close(near, simpo, rtol=1e-5, atol=1e-6)


def test_alphapo_matches_trls_reward_transform() -> None:
    """TRL's CPO trainer (loss_type=alphapo): r = (1 - p^(-alpha)) / alpha with p = exp(averaged log-prob)."""
    lp = hand_pairs()
    avg_w, avg_l = lp.policy_chosen_logps / lp.chosen_lengths, lp.policy_rejected_logps / lp.rejected_lengths
    r_w, r_l = (1 - avg_w.exp().pow(-0.3)) / 0.3, (1 - avg_l.exp().pow(-0.3)) / 0.3
    expected = -torch.nn.functional.logsigmoid(2.0 * (r_w - r_l) - 0.5 * 2.0)
    torch.testing.assert_close(LossConfig("alphapo", alpha=0.3)(lp), expected)


def test_alphapo_stays_finite_on_very_unlikely_responses() -> None:
    """exp(-alpha avg) overflows float32 past avg = -88 at alpha = 1 (two such rewards would give inf - inf); the
    exponent is capped at 80."""
    one = torch.ones(3)
    lp = PairLogps(torch.tensor([-2.0, -3000.0, -5000.0]), torch.tensor([-100.0, -500.0, -6000.0]), one, one)
    assert bool(torch.isfinite(LossConfig("alphapo", alpha=1.0)(lp)).all())


# ---------------------------------------------------------------- Dr. DPO
def test_dr_dpo_limits() -> None:
    """beta' -> inf: the batch mean of DPO's losses; beta' -> 0: their minimum. Every row holds the batch value."""
    lp = hand_pairs()
    dpo = LossConfig("dpo", beta=0.5)(lp)
    wide = LossConfig("dr_dpo", beta=0.5, beta_prime=1e6)(lp)
    torch.testing.assert_close(wide, dpo.mean().expand(3), rtol=1e-6, atol=1e-7)
    narrow = LossConfig("dr_dpo", beta=0.5, beta_prime=1e-4)(lp)
    torch.testing.assert_close(narrow, dpo.min().expand(3), rtol=1e-3, atol=1e-3)
    assert narrow.mean() < dpo.mean()  # a soft minimum lies below the mean


def test_dr_dpo_gradient_weights_pairs_by_a_softmax_of_their_losses() -> None:
    """d(batch loss)/d logp_w,i = softmax(-L/beta')_i dL_i/d logp_w,i: pairs with large losses count less than 1/B."""
    losses = [L(0.5 * h) for h in H]
    weights = [math.exp(-x / 0.2) for x in losses]
    weights = [w / sum(weights) for w in weights]
    lp = hand_pairs(grad=True)
    LossConfig("dr_dpo", beta=0.5, beta_prime=0.2)(lp).mean().backward()
    dpo_grad = [-0.5 * sig(-0.5 * h) for h in H]  # dL_i / d logp_w,i
    torch.testing.assert_close(lp.policy_chosen_logps.grad, t([w * g for w, g in zip(weights, dpo_grad)]))
    torch.testing.assert_close(lp.policy_rejected_logps.grad, -lp.policy_chosen_logps.grad)
    assert weights[1] < 1 / 3 < weights[2]  # the misranked pair (h = -2) is down-weighted


# ---------------------------------------------------------------- ranges and options
@pytest.mark.parametrize("name, bad", [
    ("bpo", {"alpha": 0.0}), ("bpo", {"alpha": 1.5}), ("bpo", {"link": "square"}), ("dpo_shift", {"f_lambda": 0.0}),
    ("dpo_shift", {"f_lambda": 1.2}), ("focalpo", {"gamma": -0.1}), ("dr_dpo", {"beta_prime": 0.0}),
    ("alphapo", {"alpha": float("inf")}), ("minor_dpo", {"beta": 0.0}),
])
def test_out_of_range_hyperparameters_are_rejected(name: str, bad: dict) -> None:
    with pytest.raises(ValueError, match=f"loss '{name}'"):
        LossConfig(name, **bad)


def test_dr_dpo_refuses_wpo_and_the_others_accept_it() -> None:
    with pytest.raises(ValueError, match="sorts the batch"):
        LossConfig("dr_dpo", wpo=True)
    for name in ("bpo", "minor_dpo", "dpo_shift", "focalpo", "alphapo"):
        assert bool(torch.isfinite(LossConfig(name, wpo=True)(hand_pairs())).all())
