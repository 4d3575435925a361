"""Reshaped DPO: losses that reweight, shift or rebalance the chosen and the rejected terms of DPO's logistic loss.

Notation (docs/loss_pitfalls.md): r_w = logp(y_w) - ref_logp(y_w), r_l likewise, h = r_w - r_l, L(z) = -log sigmoid(z),
avg(y) = logp(y)/|y|. Log-probs are summed over completion tokens unless a docstring says otherwise. Every function
returns per-pair losses, shape (B,), whose mean is the batch loss; `dr_dpo` returns B copies of its batch value (its
loss is not a sum over pairs). Where a paper's text could not be read, the docstring names the source followed.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.options import option_reads
from prefopt.losses.registry import BASE_FIELDS, REFERENCE_FIELDS, register
from prefopt.losses.schema import NonNegative, Positive, Range
from prefopt.losses.state import TrainingProgress
from prefopt.records import PairLogps

OpenUnitHigh = Annotated[float, Range(0.0, 1.0, low_inclusive=False)]  # (0, 1]
_MAX_EXP = 80.0  # exp(80) ~ 5.5e34 < float32 max: the largest exponent AlphaPO's reward evaluates


@register(
    "bpo",
    paper="Sun et al. 2025, 'BPO: Revisiting Preference Modeling in Direct Preference Optimization', arXiv 2506.03557 "
    "(balanced reward margin min(beta r_w, -alpha beta r_l) with gap adaptor alpha)",
    formula="L(beta min(r_w, -alpha r_l)) (link=logistic); max(0, 1 - beta min(r_w, -alpha r_l)) (link=hinge)",
    needs_reference=True,
)
def bpo(
    lp: PairLogps, *, beta: Positive = 0.1, alpha: OpenUnitHigh = 0.3, link: Literal["logistic", "hinge"] = "logistic"
) -> Tensor:
    """Balanced Preference Optimization: DPO's loss on min(r_w, -alpha r_l) instead of the margin r_w - r_l.

    Only the weaker side moves: while r_w < -alpha r_l the gradient raises the chosen likelihood alone, otherwise it
    lowers the rejected one alone, so the loss never trades chosen likelihood for margin (the paper's "degraded chosen
    responses"). At a tie (initialization) torch.minimum splits the gradient evenly. alpha in (0, 1] is the paper's gap
    adaptor; 0.3 and beta = 0.1 are the authors' training config. The paper applies the balanced margin to several
    link functions; the authors' headline config uses the hinge (link=hinge), the logistic link is BPO's DPO form.
    Same as the authors' code (train_dpo.py, loss_type balance_logistic_alpha / balance_hinge_alpha). Not in TRL.
    """
    z = beta * torch.minimum(lp.chosen_logratios(), -alpha * lp.rejected_logratios())  # (B,)
    return -F.logsigmoid(z) if link == "logistic" else torch.relu(1 - z)


@register(
    "minor_dpo",
    paper="Xie et al. 2024, 'Minor DPO reject penalty to increase training robustness', arXiv 2408.09834 (MinorDPO)",
    formula="L(beta (r_w - max(0, r_l)))",
    needs_reference=True,
)
def minor_dpo(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """MinorDPO: DPO whose rejected term stops pushing once the rejected likelihood is below the reference's.

    max(0, r_l): a rejected response already less likely than under the reference is not penalized further, so its
    log-ratio is not driven to -inf (DPO's over-penalty). At r_l = 0 exactly (initialization) the gradient is DPO's
    (torch.clamp's subgradient 1); the paper's max is silent on the tie.
    Source: secondary summaries of the paper, which agree with a third-party implementation; the paper's equations
    were not readable here. Not in TRL.
    """
    penalty = lp.rejected_logratios().clamp(min=0)  # (B,)
    return -F.logsigmoid(beta * (lp.chosen_logratios() - penalty))


@register(
    "dpo_shift",
    paper="Yang et al. 2025, 'DPO-Shift: Shifting the Distribution of Direct Preference Optimization', "
    "arXiv 2502.07599 (fixed and linear strategies)",
    formula="L(beta r_w - f beta r_l), f = f_lambda (fixed) or linear in the training progress t between f_lambda_min "
    "and f_lambda",
    needs_reference=True,
)
def dpo_shift(
    lp: PairLogps,
    *,
    beta: Positive = 0.1,
    f_lambda: OpenUnitHigh = 0.9,
    schedule: Literal["fixed", "increase_linear", "decrease_linear"] = "fixed",
    f_lambda_min: OpenUnitHigh = 0.5,
) -> Tensor:
    """DPO-Shift: the rejected reward scaled by f(lambda) <= 1, trading reward margin for chosen likelihood.

    f_lambda = 1 is DPO. schedule=fixed keeps f = f_lambda (as the authors' DPOShiftTrainer.dpo_loss, whose
    dpo_lambda also scales the reference's rejected log-prob). The linear strategies move f with the fraction t of the
    run done (`training_progress`, from `TrainingProgress`): increase_linear f = f_lambda_min + (f_lambda -
    f_lambda_min) t, decrease_linear f = f_lambda - (f_lambda - f_lambda_min) t, so f_lambda is the largest value
    and f_lambda_min the smallest; the paper names these strategies, but the exact parametrization of its schedules
    could not be read here (this one interpolates linearly in optimizer steps). TRL has no DPO-Shift.
    """
    f = f_lambda
    if schedule != "fixed":
        if lp.training_progress is None:
            raise ValueError(f"dpo_shift with schedule={schedule} reads lp.training_progress (TrainingProgress fills it)")
        t = lp.training_progress.detach()
        f = f_lambda_min + (f_lambda - f_lambda_min) * (t if schedule == "increase_linear" else 1 - t)
    return -F.logsigmoid(beta * (lp.chosen_logratios() - f * lp.rejected_logratios()))


dpo_shift.reads = lambda params: (  # type: ignore[attr-defined]  (the progress only for a linear schedule)
    BASE_FIELDS[True] | REFERENCE_FIELDS[True] | option_reads(params, True)
    | (frozenset({"training_progress"}) if params["schedule"] != "fixed" else frozenset())
)
dpo_shift.state = lambda params: (TrainingProgress,) if params["schedule"] != "fixed" else ()  # type: ignore


def _dpo_shift_check(params: dict, where: str) -> None:
    if params["schedule"] != "fixed" and params["f_lambda_min"] > params["f_lambda"]:
        raise ValueError(f"{where}: f_lambda_min ({params['f_lambda_min']}) must not exceed f_lambda "
                         f"({params['f_lambda']}), the schedule's largest value")


dpo_shift.check_params = _dpo_shift_check  # type: ignore[attr-defined]


@register(
    "focalpo",
    paper="Liu et al. 2025, 'FocalPO: Enhancing Preference Optimizing by Focusing on Correct Preference Rankings', "
    "arXiv 2501.06645",
    formula="-p^gamma log p, p = sigmoid(beta h) (DPO's loss times p^gamma)",
    needs_reference=True,
)
def focalpo(lp: PairLogps, *, beta: Positive = 0.1, gamma: NonNegative = 0.05, detach_weight: bool = False) -> Tensor:
    """FocalPO: DPO's loss L(beta h) = -log p scaled by p^gamma, the model's own probability of the right ranking.

    Focal loss with the factor turned around: (1 - p)^gamma would down-weight well-ranked pairs; p^gamma down-weights
    misranked ones (p small) instead. gamma = 0 is DPO. The factor carries gradient by default, so the gradient in
    beta h is -p^gamma (1 - p)(1 + gamma log p); detach_weight=true treats p^gamma as a constant weight.
    Source: the abstract, the authors' README (their repository holds no code) and a secondary summary; the paper's
    equations, whether its factor is detached and its fixed gamma were not readable here, so gamma = 0.05 is a
    placeholder to check. Not in TRL.
    """
    log_p = F.logsigmoid(beta * lp.margins())  # (B,)
    weight = torch.exp(gamma * log_p)  # p^gamma
    return -(weight.detach() if detach_weight else weight) * log_p


def _alpha_reward(avg: Tensor, alpha: float) -> Tensor:
    """(1 - pi(y)^(-alpha/|y|)) / alpha = -expm1(-alpha avg(y)) / alpha, avg(y) at alpha = 0 (its limit); shape (B,)."""
    if alpha == 0.0:
        return avg
    return -torch.expm1((-alpha * avg).clamp(max=_MAX_EXP)) / alpha


@register(
    "alphapo",
    paper="Gupta et al. 2025, 'AlphaPO: Reward Shape Matters for LLM Alignment', arXiv 2501.03884",
    formula="L(beta (r(y_w) - r(y_l)) - gamma), r(y) = (1 - exp(-alpha avg(y))) / alpha, gamma = gamma_beta_ratio beta",
    needs_reference=False,
    aggregation="mean",
    reward="beta * (1 - pi(y)^(-alpha/|y|)) / alpha (no reference); shared metrics use scale 1",
    reward_scale=None,
)
def alphapo(lp: PairLogps, *, beta: Positive = 2.0, gamma_beta_ratio: NonNegative = 0.5, alpha: float = 0.25) -> Tensor:
    """AlphaPO: SimPO with the reward reshaped by alpha; alpha -> 0 recovers SimPO's avg(y) (exactly 0: SimPO).

    r(y) = (1 - pi(y)^(-alpha/|y|)) / alpha, pi(y)^(1/|y|) the per-token geometric mean probability. alpha > 0 flattens
    the reward of unlikely responses (less push on them), alpha < 0 steepens it. Same as TRL's CPO trainer with
    loss_type=alphapo (simpo on averaged log-probs, cpo_alpha = 0, its absolute simpo_gamma = gamma_beta_ratio * beta).
    Deviation: the exponent -alpha avg(y) is capped at 80 (finite in float32; no gradient past the cap). beta and
    gamma_beta_ratio default to SimPO's; alpha = 0.25 is a placeholder (the paper's tuned values were not readable).
    """
    r_w = _alpha_reward(lp.policy_chosen_logps / lp.chosen_lengths.clamp(min=1), alpha)  # (B,)
    r_l = _alpha_reward(lp.policy_rejected_logps / lp.rejected_lengths.clamp(min=1), alpha)
    return -F.logsigmoid(beta * (r_w - r_l) - gamma_beta_ratio * beta)


@register(
    "dr_dpo",
    paper="Wu et al. 2024, 'Towards Robust Alignment of Language Models: Distributionally Robustifying Direct "
    "Preference Optimization', arXiv 2407.07880 (Dr. DPO)",
    formula="-beta' log mean_batch exp(-L(beta h) / beta'), the batch value repeated per row",
    needs_reference=True,
)
def dr_dpo(lp: PairLogps, *, beta: Positive = 0.1, beta_prime: Positive = 1.0) -> Tensor:
    """Dr. DPO: a soft minimum over the batch of DPO's pair losses, down-weighting the pairs with large losses.

    Pairs with large losses (likely mislabeled) weigh less: the gradient weights pair i by softmax(-L/beta')_i instead
    of 1/B. beta' -> inf is DPO's batch mean, beta' -> 0 the batch's smallest loss.
    The loss is not a sum over pairs: every row holds the batch value (their mean is it, and so is its gradient), so
    the per-pair WPO weights cannot apply (`sorts_batch`). The batch is what the loss sees (one step's batch on one
    device), as in the authors' code (trainers.py, mode_loss=DrDPO; beta' = mode_weight, 1.0 in its README).
    Not in TRL.
    """
    losses = -F.logsigmoid(beta * lp.margins())  # (B,)
    n = losses.numel()
    batch = -beta_prime * (torch.logsumexp(-losses / beta_prime, dim=0) - math.log(n))  # scalar
    return batch.expand(n)


dr_dpo.sorts_batch = True  # type: ignore[attr-defined]  (its rows are copies of one batch value, not pairs)
