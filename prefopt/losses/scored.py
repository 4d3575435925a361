"""Losses that read the responses' scores: how much better the chosen response is, not only that it is.

The record's `chosen_scores` and `rejected_scores` (s_w, s_l) are the data's scalar scores of the two responses: the
built-in task's exact gold reward, or a dataset's score columns mapped with `data.columns` (UltraFeedback's ratings,
a reward model's outputs). Notation (docs/loss_pitfalls.md): r_w, r_l summed log-ratios, h = r_w - r_l,
L(z) = -log sigmoid(z), D = s_w - s_l. Every function returns per-pair losses, shape (B,); scores carry no gradient.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.registry import register
from prefopt.losses.schema import NonNegative, Positive, Range
from prefopt.records import PairLogps

SCORES = ("chosen_scores", "rejected_scores")
AboveOne = Annotated[float, Range(1.0, None, low_inclusive=False)]


def score_gap(lp: PairLogps) -> Tensor:
    """D = s_w - s_l, shape (B,), detached."""
    if lp.chosen_scores is None or lp.rejected_scores is None:
        raise ValueError("this loss reads chosen_scores and rejected_scores: the data's scores (data.scores)")
    return (lp.chosen_scores - lp.rejected_scores).detach()


@register(
    "odpo",
    paper="Amini et al. 2024, 'Direct Preference Optimization with an Offset', arXiv 2402.10571 (the ODPO loss with "
    "the offset alpha * log(s_w - s_l), as the authors' code computes it)",
    formula="L(beta h - Delta), Delta = alpha log(max(D, min_gap)) (scaling=log) or alpha D (scaling=identity)",
    needs_reference=True,
    reads=SCORES,
)
def odpo(
    lp: PairLogps, *, beta: Positive = 0.1, alpha: NonNegative = 1.0, scaling: Literal["log", "identity"] = "log",
    min_gap: Positive = 0.01,
) -> Tensor:
    """DPO with an offset: the chosen response must beat the rejected one by a margin that grows with their score gap.

    The offset is alpha times a monotone function of D: log, the paper's and the authors' code's choice (their
    ablation also tries other scalings; identity is offered). The log needs D > 0, which holds on data built from
    scores; where labels are noisy or tied (D <= 0) it is taken at min_gap, so those pairs get a strongly negative
    offset, i.e. little push, the limit of the log as D falls to 0 (a deviation: the paper's data has no such pairs).
    alpha = 0 is DPO.
    """
    gap = score_gap(lp)
    offset = alpha * (torch.log(gap.clamp(min=min_gap)) if scaling == "log" else gap)
    return -F.logsigmoid(beta * lp.margins() - offset)


NEMOTRON = ("Nvidia 2024, 'Nemotron-4 340B Technical Report', arXiv 2406.11704, Sec. 3.4.3 (reward-aware preference "
            "optimization); distances as NeMo-Aligner names them")


def _kl_of_logits(target: Tensor, model: Tensor) -> Tensor:
    """KL(Bern(sigmoid(target)) || Bern(sigmoid(model))), shape (B,), finite for any logits."""
    p = torch.sigmoid(target)
    return p * (F.logsigmoid(target) - F.logsigmoid(model)) + (1 - p) * (F.logsigmoid(-target) - F.logsigmoid(-model))


@register(
    "rpo_bwd_kl",
    paper=f"{NEMOTRON}: the report's distance D[a || b] = KL(Bern(sigmoid b) || Bern(sigmoid a)) ('rpo_bwd_kl')",
    formula="KL(Bern(sigmoid(eta D)) || Bern(sigmoid(beta h))): the implied win rate matches the scores' one",
    needs_reference=True,
    reads=SCORES,
)
def rpo_bwd_kl(lp: PairLogps, *, beta: Positive = 0.1, eta: Positive = 1.0) -> Tensor:
    """Reward-aware preference optimization: the implicit reward gap beta h is fitted to the scaled score gap eta D.

    Not `rpo` (Pang et al.'s DPO + NLL). The report's distance compares the Bradley-Terry win probabilities of the
    two gaps: the target's, sigmoid(eta D), against the model's, sigmoid(beta h). Its minimum, 0, is at
    beta h = eta D for every pair, so with exact scores the tabular optimum is pi_ref exp(eta R / beta) / Z, DPO's at
    beta / eta (tests/test_losses_scored.py checks it on a bandit).
    """
    return _kl_of_logits(eta * score_gap(lp), beta * lp.margins())


@register(
    "rpo_fwd_kl",
    paper=f"{NEMOTRON}: the reversed distance KL(Bern(sigmoid a) || Bern(sigmoid b)) ('rpo_fwd_kl')",
    formula="KL(Bern(sigmoid(beta h)) || Bern(sigmoid(eta D)))",
    needs_reference=True,
    reads=SCORES,
)
def rpo_fwd_kl(lp: PairLogps, *, beta: Positive = 0.1, eta: Positive = 1.0) -> Tensor:
    """Reward-aware PO with the Bernoulli KL the other way round (mode-seeking); the same optimum, beta h = eta D."""
    return _kl_of_logits(beta * lp.margins(), eta * score_gap(lp))


@register(
    "rpo_sq",
    paper=f"{NEMOTRON}: the squared distance (a - b)^2 ('rpo_sq')",
    formula="(beta h - eta D)^2",
    needs_reference=True,
    reads=SCORES,
)
def rpo_sq(lp: PairLogps, *, beta: Positive = 0.1, eta: Positive = 1.0) -> Tensor:
    """Reward-aware PO with the squared distance: regress the implicit reward gap onto the scaled score gap.

    IPO regresses h onto a constant 1/(2 beta); this regresses it onto eta D / beta, pair by pair.
    """
    return (beta * lp.margins() - eta * score_gap(lp)) ** 2


TIES = ("Chen et al. 2024, 'On Extending Direct Preference Optimization to Accommodate Ties', arXiv 2409.17431 "
        "(NeurIPS 2025)")


def _is_tie(lp: PairLogps, tie_margin: float) -> Tensor:
    return score_gap(lp).abs() <= tie_margin


@register(
    "dpo_rk",
    paper=f"{TIES}: DPO-RK, the Rao-Kupper (1967) model in place of Bradley-Terry",
    formula="clear pairs -log sigmoid(beta h - log nu); ties (|D| <= tie_margin) -log(1 - sigmoid(beta h - log nu) "
    "- sigmoid(-beta h - log nu))",
    needs_reference=True,
    reads=SCORES,
)
def dpo_rk(lp: PairLogps, *, beta: Positive = 0.1, nu: AboveOne = 2.0, tie_margin: NonNegative = 0.0) -> Tensor:
    """DPO with ties, Rao-Kupper: a tie has probability (nu^2 - 1) / ((e^{d/2} + nu e^{-d/2})(e^{-d/2} + nu e^{d/2})),
    d = beta h; a win sigmoid(d - log nu). Tied pairs pull their margin toward 0, clear pairs push it up as in DPO.

    A pair is a tie when its scores differ by at most tie_margin (0: equal scores, as the built-in task's exact ties;
    rated data uses its rating step). nu = 2 gives a tie probability of 1/3 at d = 0; the paper's value of nu for its
    experiments was not checked here. nu -> 1 without ties is DPO.
    """
    d = beta * lp.margins()
    log_nu = math.log(nu)
    win = F.logsigmoid(d - log_nu)
    tie = math.log(nu * nu - 1) - torch.logaddexp(d / 2, log_nu - d / 2) - torch.logaddexp(-d / 2, log_nu + d / 2)
    return -torch.where(_is_tie(lp, tie_margin), tie, win)


@register(
    "dpo_davidson",
    paper=f"{TIES}: DPO-D, the Davidson (1970) model in place of Bradley-Terry",
    formula="clear pairs -log(e^{d/2} / Z); ties -log(nu / Z); Z = e^{d/2} + e^{-d/2} + nu, d = beta h",
    needs_reference=True,
    reads=SCORES,
)
def dpo_davidson(lp: PairLogps, *, beta: Positive = 0.1, nu: Positive = 1.0, tie_margin: NonNegative = 0.0) -> Tensor:
    """DPO with ties, Davidson: win, tie and loss have probabilities proportional to e^{d/2}, nu and e^{-d/2}.

    nu = 1 gives a tie probability of 1/3 at d = 0 (the paper's value was not checked here); nu -> 0 without ties
    is DPO. A pair is a tie when its scores differ by at most tie_margin.
    """
    d = beta * lp.margins()
    log_z = torch.logsumexp(torch.stack([d / 2, -d / 2, torch.full_like(d, math.log(nu))]), dim=0)
    return -torch.where(_is_tie(lp, tie_margin), math.log(nu) - log_z, d / 2 - log_z)


@register(
    "infonca",
    paper="Chen et al. 2024, 'Noise Contrastive Alignment of Language Models with Explicit Rewards', arXiv 2402.05369 "
    "(InfoNCA, with K = 2 responses per prompt)",
    formula="-sum_i softmax(s / alpha)_i log softmax(beta r)_i over the pair = cross-entropy of sigmoid(beta h) "
    "against sigmoid(D / alpha)",
    needs_reference=True,
    reads=SCORES,
    labels=False,
)
def infonca(lp: PairLogps, *, beta: Positive = 0.1, alpha: Positive = 1.0) -> Tensor:
    """InfoNCA on a pair: the softmax of the implicit rewards beta r is fitted to the softmax of the scores s / alpha.

    With K responses per prompt the paper's loss is a K-way cross-entropy; on paired data (K = 2) it is DPO with a
    soft label sigmoid(D / alpha) in place of 1, so its optimum is beta h = D / alpha for every pair, and with exact
    scores the tabular optimum is pi_ref exp(R / (alpha beta)) / Z. With more than two scored responses per prompt:
    `infonca_k`. (`nca` is the same paper's NCA.)
    """
    target = torch.sigmoid(score_gap(lp) / alpha)
    z = beta * lp.margins()
    return -(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z))


@register(
    "infonca_k",
    paper="Chen et al. 2024, 'Noise Contrastive Alignment of Language Models with Explicit Rewards', arXiv 2402.05369 "
    "(InfoNCA: K responses per prompt with their rewards)",
    formula="-sum_i softmax(s / alpha)_i log softmax(beta r)_i over the K = M + 2 responses: the pair and the M "
    "further ones",
    needs_reference=True,
    reads=SCORES + ("policy_extra_logps", "ref_extra_logps", "extra_scores"),
    labels=False,
)
def infonca_k(lp: PairLogps, *, beta: Positive = 0.1, alpha: Positive = 1.0) -> Tensor:
    """InfoNCA with K responses per prompt: the softmax of the implicit rewards beta r_i fitted to that of s_i / alpha.

    The K responses are the pair's two and the data's M further ones (`data.extras`: on the built-in task,
    `data.gold.extra_responses` further reference samples with their gold rewards); which of the pair is "chosen" does
    not matter, only the scores do. With M = 0 it is `infonca`. For responses sampled from pi_ref the population
    optimum is r = R / (alpha beta) + c(x): pi_ref exp(R / (alpha beta)) / Z, as for K = 2, approached faster in K.
    """
    if lp.policy_extra_logps is None or lp.ref_extra_logps is None or lp.extra_scores is None:
        raise ValueError("infonca_k reads further scored responses per prompt (data.extras)")
    rewards = torch.cat([torch.stack([lp.chosen_logratios(), lp.rejected_logratios()], -1),
                         lp.policy_extra_logps - lp.ref_extra_logps], -1)  # (B, K)
    scores = torch.cat([torch.stack([lp.chosen_scores, lp.rejected_scores], -1), lp.extra_scores], -1).detach()
    target = torch.softmax(scores / alpha, -1)
    return -(target * torch.log_softmax(beta * rewards, -1)).sum(-1)
