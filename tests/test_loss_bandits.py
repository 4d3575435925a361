"""Tabular bandits: each loss, trained to convergence, lands on its analytic optimum.

The optima: docs/loss_pitfalls.md, 'Known analytic optima'.

One prompt, K arms. The policy is a categorical over the arms with logits theta (initialized at the reference), the
reference a fixed categorical mu. Each arm is a one-token completion, so its log-prob is log softmax(theta)[arm].
Pairs (a, b) are drawn from mu x mu and labeled a > b with probability P(a > b) (Bradley-Terry on a reward R, or
deterministic). The *population* loss sums the registry's per-pair losses over all K^2 ordered pairs (a chosen,
b rejected) weighted by mu(a) mu(b) P(a > b): exact, and fast enough to train to convergence with Adam in well
under a second per run. Everything is float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from prefopt.losses import LossConfig
from prefopt.records import PairLogps

MU = torch.tensor([0.10, 0.20, 0.30, 0.25, 0.15], dtype=torch.float64)  # the reference
R = torch.tensor([0.0, 0.5, 1.0, -0.5, 1.5], dtype=torch.float64)  # the reward behind the labels
K = MU.numel()
A, B = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
A, B = A.reshape(-1), B.reshape(-1)  # (K^2,): every ordered pair (a chosen, b rejected)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tensors of 25 elements gain nothing from intra-op threads, and on a busy 2-core machine their
    synchronization made float64 logsigmoid ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bt_preferences(reward: torch.Tensor) -> torch.Tensor:
    """P(a > b) = sigmoid(R_a - R_b), shape (K, K)."""
    return torch.sigmoid(reward[:, None] - reward[None, :])


def deterministic_preferences(reward: torch.Tensor) -> torch.Tensor:
    """P(a > b) = 1 if R_a > R_b, 0 if R_a < R_b, 1/2 on the diagonal (R has distinct values)."""
    p = (reward[:, None] > reward[None, :]).double()
    return p + 0.5 * torch.eye(reward.numel(), dtype=torch.float64)


def record(theta: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> PairLogps:
    logp, ref = torch.log_softmax(theta, -1), MU.log()
    one = torch.ones(chosen.numel(), dtype=torch.float64)  # one token per completion: shared = full
    return PairLogps(
        policy_chosen_logps=logp[chosen], policy_rejected_logps=logp[rejected],
        chosen_lengths=one, rejected_lengths=one,
        ref_chosen_logps=ref[chosen], ref_rejected_logps=ref[rejected],
        policy_chosen_shared_logps=logp[chosen], policy_rejected_shared_logps=logp[rejected],
        ref_chosen_shared_logps=ref[chosen], ref_rejected_shared_logps=ref[rejected],
        running_logratio_mean=torch.zeros((), dtype=torch.float64),
    )


def train_population(
    loss: LossConfig, preferences: torch.Tensor, steps: int = 1500, lr: float = 0.05, **adam: float | tuple
) -> torch.Tensor:
    """Minimize sum_ab mu(a) mu(b) P(a > b) loss(a > b) over theta with Adam; return the final policy, shape (K,)."""
    weights = (MU[A] * MU[B] * preferences[A, B]).detach()  # (K^2,)
    theta = MU.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr, **adam)
    for _ in range(steps):
        opt.zero_grad()
        (weights * loss(record(theta, A, B))).sum().backward()
        opt.step()
    return torch.softmax(theta.detach(), -1)


def train_single_pair(loss: LossConfig, steps: int, lr: float = 0.05) -> list[float]:
    """Two arms, one pair (arm 0 > arm 1); return the margin h = r_w - r_l after each step."""
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    chosen, rejected = torch.tensor([0]), torch.tensor([1])
    margins = []
    for _ in range(steps):
        opt.zero_grad()
        logp = torch.log_softmax(theta, -1)
        one = torch.ones(1, dtype=torch.float64)
        lp = PairLogps(logp[chosen], logp[rejected], one, one, torch.full((1,), -math.log(2), dtype=torch.float64),
                       torch.full((1,), -math.log(2), dtype=torch.float64))
        loss(lp).sum().backward()
        opt.step()
        # h = (logp_0 - ref) - (logp_1 - ref) = theta_0 - theta_1
        margins.append(float(theta.detach()[0] - theta.detach()[1]))
    return margins


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def dpo_optimum(beta: float) -> torch.Tensor:
    """pi_ref exp(R / beta) / Z (Rafailov et al. 2023, Eq. 4)."""
    return torch.softmax(MU.log() + R / beta, -1)


def ipo_optimum(preferences: torch.Tensor, tau: float) -> torch.Tensor:
    """pi_ref exp(P(y > mu) / tau) / Z, P(y > mu) = sum_b mu(b) P(y > b) (Azar et al. 2023)."""
    return torch.softmax(MU.log() + (preferences @ MU) / tau, -1)


def test_dpo_converges_to_the_kl_regularized_optimum() -> None:
    beta = 0.5
    policy = train_population(LossConfig("dpo", beta=beta), bt_preferences(R))
    assert tv(policy, dpo_optimum(beta)) < 0.02, (policy, dpo_optimum(beta))
    assert tv(policy, MU) > 0.2  # it did move


def test_ipo_converges_to_its_closed_form() -> None:
    tau, prefs = 0.5, bt_preferences(R)
    policy = train_population(LossConfig("ipo", beta=tau), prefs)
    assert tv(policy, ipo_optimum(prefs, tau)) < 0.02, (policy, ipo_optimum(prefs, tau))


def test_reference_free_ipo_converges_to_the_closed_form_with_a_uniform_reference() -> None:
    """IPO's optimum pi_ref exp(P(y > mu) / tau) / Z with the uniform distribution as the reference: one-token
    responses make the averaged log-probs the log-probs themselves."""
    tau, prefs = 0.5, bt_preferences(R)
    policy = train_population(LossConfig("ipo_ref_free", beta=tau), prefs)
    optimum = torch.softmax((prefs @ MU) / tau, -1)
    assert tv(policy, optimum) < 0.02, (policy, optimum)
    assert tv(optimum, ipo_optimum(prefs, tau)) > 0.05  # not the reference-based optimum


def test_cdpo_has_a_finite_optimum_and_robust_dpo_has_none() -> None:
    eps, beta = 0.1, 1.0
    cdpo = train_single_pair(LossConfig("cdpo", beta=beta, label_smoothing=eps), steps=1500)
    assert abs(beta * cdpo[-1] - math.log((1 - eps) / eps)) < 1e-3, cdpo[-1]
    robust = train_single_pair(LossConfig("robust", beta=beta, label_smoothing=eps), steps=1500)
    assert beta * robust[-1] > math.log((1 - eps) / eps) + 10  # far past cDPO's optimum ...
    assert robust[-1] > robust[749] + 10  # ... and still growing


def test_hinge_stops_at_margin_one_over_beta() -> None:
    beta = 0.5
    margins = train_single_pair(LossConfig("hinge", beta=beta), steps=800, lr=0.01)
    assert 1 / beta <= margins[-1] < 1 / beta + 0.25, margins[-1]  # Adam's momentum overshoots a little
    assert margins[-1] == margins[599]  # no gradient once h >= 1/beta: it has stopped


def test_deterministic_preferences_dpo_ignores_beta_ipo_does_not() -> None:
    """Deterministic labels: DPO has no finite optimum for any beta (every run heads to the best arm), while
    IPO's optimum pi_ref exp(P(y > mu) / tau) / Z keeps depending on tau.

    DPO's gradients decay like exp(-beta h) on the way; Adam with a short second-moment memory (beta2 = 0.9) and a
    negligible eps keeps its step size regardless, so every beta gets there in the same budget. (With the default
    beta2 = 0.999 the beta = 5 run is still at pi(best) ~ 0.66 after 1500 steps: heading there, slowly.)
    """
    prefs = deterministic_preferences(R)
    best = int(R.argmax())
    scale_free = {"betas": (0.9, 0.9), "eps": 1e-30}
    dpo = [train_population(LossConfig("dpo", beta=beta), prefs, **scale_free) for beta in (0.1, 1.0, 5.0)]
    for policy in dpo:
        assert float(policy[best]) > 0.95, policy
        assert tv(policy, dpo[0]) < 0.05
    ipo = {tau: train_population(LossConfig("ipo", beta=tau), prefs) for tau in (0.1, 1.0, 5.0)}
    for tau, policy in ipo.items():
        assert tv(policy, ipo_optimum(prefs, tau)) < 0.02, (tau, policy, ipo_optimum(prefs, tau))
    assert tv(ipo[0.1], ipo[5.0]) > 0.3
