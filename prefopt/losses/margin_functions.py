"""Losses that are a fixed function of DPO's reference-based margin (or of a link of the ratio pi / pi_ref).

GPO (Tang et al. 2024, arXiv 2402.05749) writes an offline preference loss as f(beta h) for a function f of the
margin h = r_w - r_l (their rho): the logistic f(x) = log(1 + exp(-x)) is DPO (`dpo`), the hinge max(0, 1 - x) is
SLiC/RSO (`hinge`), the squared (x - 1)^2 = beta^2 (h - 1/beta)^2 is IPO (`ipo` with tau = beta/2, up to the factor
beta^2). This module adds GPO's other three (exponential, truncated quadratic, Savage: the standard classification
losses of those names, applied to x = beta h as GPO does; the paper's table was not re-read when this was written),
chi-PO (a link phi(u) = u + log u of u = pi / pi_ref in place of DPO's log u), Cal-DPO (the logistic loss on h plus
squares that calibrate r_w and r_l to +-1/(2 beta)) and DPO with a constant target margin.

Notation (docs/loss_pitfalls.md): r = logp(y) - ref_logp(y) summed over completion tokens, h = r_w - r_l,
L(z) = -log sigmoid(z). Every function returns per-pair losses, shape (B,); the batch loss is their mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.registry import register
from prefopt.losses.schema import NonNegative, Positive
from prefopt.records import PairLogps

GPO = ("Tang et al. 2024, 'Generalized Preference Optimization: A Unified Approach to Offline Alignment', "
       "arXiv 2402.05749")
_MAX_EXP = 80.0  # exp(80) ~ 5.5e34 < float32 max: chi-PO's exp(r) stays finite (its margin is clipped far below)


@register(
    "gpo_exp",
    paper=f"{GPO}, Table 1 (exponential loss)",
    formula="exp(-beta h)",
    needs_reference=True,
)
def gpo_exp(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """GPO with the exponential loss f(x) = exp(-x) (AdaBoost's loss) on x = beta h.

    Its pairwise minimizer is beta h* = logit(P(y_w > y_l)) / 2, so under Bradley-Terry labels with reward R the
    tabular optimum is pi_ref exp(R / (2 beta)): DPO's optimum at twice the beta. Its gradient grows without bound
    on pairs ranked the wrong way (exp(-beta h) for h < 0), where DPO's saturates at beta. Not in TRL.
    """
    return torch.exp(-beta * lp.margins())


@register(
    "gpo_truncated_quadratic",
    paper=f"{GPO}, Table 1 (truncated quadratic loss)",
    formula="max(0, 1 - beta h)^2",
    needs_reference=True,
)
def gpo_truncated_quadratic(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """GPO with the truncated quadratic (squared hinge) f(x) = max(0, 1 - x)^2 on x = beta h.

    Like the hinge, it stops pushing a pair once beta h >= 1; below that it is GPO's squared loss (beta h - 1)^2,
    i.e. IPO with tau = beta / 2 scaled by beta^2, so where every optimal margin stays below 1/beta its tabular
    optimum is IPO's, pi_ref exp(2 P(y > mu) / beta). Not in TRL.
    """
    return torch.relu(1 - beta * lp.margins()) ** 2


@register(
    "gpo_savage",
    paper=f"{GPO}, Table 1 (Savage loss; Masnadi-Shirazi and Vasconcelos 2008)",
    formula="1 / (1 + exp(beta h))^2 = sigmoid(-beta h)^2",
    needs_reference=True,
)
def gpo_savage(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """GPO with the Savage loss f(x) = 1/(1 + exp(x))^2 on x = beta h: bounded, so outliers cost at most 1.

    It is a proper loss with the logistic link (its pairwise minimizer is sigmoid(beta h*) = P(y_w > y_l)), so its
    tabular optimum under Bradley-Terry labels is DPO's, pi_ref exp(R / beta); but its gradient vanishes for both
    large and very negative beta h, and it is not convex (f'' < 0 for x < -ln 2). Not in TRL.
    """
    return torch.sigmoid(-beta * lp.margins()) ** 2


def _chi_link(r: Tensor) -> Tensor:
    """phi(u) = u + log u at u = pi / pi_ref = exp(r), shape (B,); exp is capped at exp(_MAX_EXP)."""
    return torch.exp(r.clamp(max=_MAX_EXP)) + r


@register(
    "chipo",
    paper="Huang et al. 2024, 'Correcting the Mythos of KL-Regularization: Direct Alignment without Overoptimization "
    "via Chi-Squared Preference Optimization', arXiv 2407.13399, Algorithm 1 (chiPO)",
    formula="L(clip(beta (phi(u_w) - phi(u_l)), -2 r_max, 2 r_max)), phi(u) = u + log u, u = exp(r) = pi / pi_ref",
    needs_reference=True,
    reward="beta * phi(pi / pi_ref) = beta * (exp(logp - ref_logp) + logp - ref_logp)",
)
def chipo(lp: PairLogps, *, beta: Positive = 0.1, r_max: Positive = 1.0) -> Tensor:
    """chi^2-Preference Optimization: DPO with the link log u replaced by phi(u) = u + log u, whose implicit reward
    beta phi(pi/pi_ref) regularizes with the mixed chi^2 + KL divergence (f-DPO with f(u) = (u - 1)^2 / 2 + u log u).

    The margin beta (phi(u_w) - phi(u_l)) is clipped to [-2 r_max, 2 r_max], r_max the bound on the rewards: a pair
    whose margin has reached 2 r_max gets no gradient. The ratio is of the whole response (summed log-probs). Without
    clipping the Bradley-Terry tabular optimum is pi_ref phi^-1((R - lambda) / beta), lambda normalizing. phi and
    the clip of the margin at 2 r_max follow the paper's Algorithm 1 as usually restated; they were not re-checked
    against the paper's text when this was written. r_max = 1 (rewards in [0, 1]) is this repository's default, not
    the paper's. Deviation: exp(r) is capped at exp(80) to keep float32 finite; the clipped loss is unchanged unless
    both log-ratios of a pair exceed 80 nats. Not in TRL.
    """
    margin = beta * (_chi_link(lp.chosen_logratios()) - _chi_link(lp.rejected_logratios()))  # (B,)
    return -F.logsigmoid(margin.clamp(-2 * r_max, 2 * r_max))


@register(
    "cal_dpo",
    paper="Xiao et al. 2024, 'Cal-DPO: Calibrated Direct Preference Optimization for Language Model Alignment', "
    "arXiv 2412.14516 (NeurIPS 2024); authors' code: github.com/Cal-DPO/Cal-DPO (Pythia), tengxiao1/Cal-DPO (Zephyr)",
    formula="L(h) + w [(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2], w = calibration_weight (1; Zephyr code: 0.5)",
    needs_reference=True,
    reward="beta * (logp - ref_logp): Cal-DPO calibrates it to the reward scale, beta r_w -> 1/2, beta r_l -> -1/2",
)
def cal_dpo(lp: PairLogps, *, beta: Positive = 0.1, calibration_weight: NonNegative = 1.0) -> Tensor:
    """Calibrated DPO: the contrastive logistic loss on h plus squares that pull each log-ratio to the scale of a
    reward of +-1/2, r_w -> 1/(2 beta) and r_l -> -1/(2 beta), so that h cannot grow by lowering both likelihoods.

    Source: the authors' code (the paper's equation was not re-read when this was written). beta does not multiply
    h in the logistic term: in both of their implementations the contrastive term is L(h), and beta enters only
    through the calibration targets. calibration_weight = 1 follows their Pythia code (loss 'cal_dpo', shift 0.5);
    their Zephyr (TRL-based) code halves the squares: calibration_weight = 0.5. It is `composite` of dpo (beta 1)
    and sppo (beta) exactly; TRL's loss_type=["sigmoid", "sppo_hard"] differs, as TRL's sigmoid term is L(beta h).
    """
    c = 0.5 / beta
    calibration = (lp.chosen_logratios() - c) ** 2 + (lp.rejected_logratios() + c) ** 2  # (B,)
    return -F.logsigmoid(lp.margins()) + calibration_weight * calibration


@register(
    "dpo_margin",
    paper="Amini et al. 2024, 'Direct Preference Optimization with an Offset' (ODPO), arXiv 2402.10571: the "
    "constant-offset special case of its loss (no paper found that introduced the constant margin itself)",
    formula="L(beta h - margin)",
    needs_reference=True,
)
def dpo_margin(lp: PairLogps, *, beta: Positive = 0.1, margin: NonNegative = 0.5) -> Tensor:
    """DPO with a constant target margin in reward units: the implicit reward beta h must exceed `margin`.

    ODPO's offset Delta(y_w, y_l) held constant (`odpo` with a score gap of 1 and scaling=identity); SimPO's gamma
    plays the same role without a reference. margin = 0 is DPO. With label noise the pairwise optimum moves out:
    for P(y_w > y_l) = p, a = exp(beta h*) solves (1 - p) a^2 + (1 - 2p) e^margin a - p = 0. Not in TRL.
    """
    return -F.logsigmoid(beta * lp.margins() - margin)
