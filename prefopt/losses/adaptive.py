"""Pair losses whose scale or margin adapts to running statistics of the margins seen in training.

Both come from the same authors and keep the same statistics: exponential moving averages (momentum m, from 0) of a
training batch's mean and standard deviation of a pair margin (`prefopt.losses.state.MarginMoments`, filled into
the record's `margin_ema_*` / `avg_margin_ema_*` fields). Training records update them; validation records only read
them, and validation is never filtered. Notation (docs/loss_pitfalls.md): r_w = logp(y_w) - ref_logp(y_w), r_l
likewise, h = r_w - r_l, L(z) = -log sigmoid(z); per-pair losses, shape (B,), whose batch mean is the loss.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.options import option_reads
from prefopt.losses.registry import BASE_FIELDS, REFERENCE_FIELDS, register
from prefopt.losses.schema import NonNegative, Positive, Range
from prefopt.losses.state import (
    MARGIN_FIELDS, STD_FLOOR, StateFactory, gaussian_pair_filter, margin_moments, pair_margin,
)
from prefopt.records import PairLogps

Momentum = Annotated[float, Range(0.0, 1.0, high_inclusive=False)]
KeptFraction = Annotated[float, Range(0.0, 1.0, low_inclusive=False)]
Seed = Annotated[int, Range(0, None)]


def _beta_dpo_state(params: dict[str, Any]) -> tuple[StateFactory, ...]:
    return (margin_moments(params["momentum"], "sum"), gaussian_pair_filter(params["rho"], params["seed"], "sum"))


@register(
    "beta_dpo",
    paper="Wu et al. 2024, 'beta-DPO: Direct Preference Optimization with Dynamic beta', arXiv 2407.08639 (NeurIPS "
    "2024), Sec. 4.2 and Algorithm 1 (App. A.1)",
    formula="L(beta_batch h) on the kept pairs (mean over them), beta_batch = beta [1 + alpha (mean_kept M - M_0)], "
    "M = beta h, M_0 = EMA of batch means of M; pairs kept by Gaussian weights of M around M_0",
    needs_reference=True,
    reward="beta * (logp - ref_logp) with the base beta; the loss's own scale beta_batch varies per batch",
    reads=("margin_ema_mean", "kept_pairs"),
    state=_beta_dpo_state({"momentum": 0.9, "rho": 0.8, "seed": 0}),
)
def beta_dpo(
    lp: PairLogps,
    *,
    beta: Positive = 0.1,
    alpha: NonNegative = 0.6,
    rho: KeptFraction = 0.8,
    momentum: Momentum = 0.9,
    seed: Seed = 0,
    discrepancy: Literal["reward", "margin"] = "reward",
    beta_min: Positive = 1e-3,
) -> Tensor:
    """beta-DPO: DPO whose beta follows each batch's reward discrepancy, on a Gaussian-filtered subset of the batch.

    Algorithm 1, per training batch: M_i = beta h_i; the running state updates M_0 and sigma (moving averages with
    momentum m of the batch mean and std of M, `MarginMoments`), then keeps floor(rho B) pairs drawn without
    replacement with probability proportional to exp(-(M_i - M_0)^2 / (2 sigma^2)) (`GaussianPairFilter`, seeded by
    `seed` and its draw count: reproducible, and resumable from a checkpoint); beta_batch = beta [1 + alpha (mean of
    M over the kept pairs - M_0)], detached, floored at beta_min (the paper's linear rule can go negative; the
    authors' code floors it at 1e-3). A filtered-out pair's loss is 0 and a kept pair's is scaled by B / k, so the
    batch mean is the kept pairs' mean. Validation keeps every pair and never moves M_0 or sigma.
    discrepancy: "reward" is the paper's M = beta h; "margin" is the authors' code, M = h, where the same alpha moves
    beta_batch 1/beta times more (the paper's alpha of 0.6-1.0 was tuned with that code). The filter is the same for
    both. Other deviations from the authors' code: it also updates the averages on evaluation batches and filters
    them, and it filters and averages M over the gathered global batch; here each rank filters its own rows (the
    averages span all ranks). With ld_alpha < 1 the state sees the unweighted margins. TRL (1.16) has no beta-DPO.
    """
    if lp.margin_ema_mean is None:
        raise ValueError("beta_dpo needs lp.margin_ema_mean, the running mean of h (its MarginMoments state fills it)")
    h = lp.margins()  # (B,)
    kept = torch.ones_like(h) if lp.kept_pairs is None else lp.kept_pairs.to(h.dtype)  # (B,) 1 = kept
    k = kept.sum().clamp(min=1)
    scale = beta if discrepancy == "reward" else 1.0  # M = scale * h
    m_kept = scale * (h.detach() * kept).sum() / k
    beta_batch = (beta * (1 + alpha * (m_kept - scale * lp.margin_ema_mean.detach()))).clamp(min=beta_min).detach()
    return -F.logsigmoid(beta_batch * h) * kept * (h.numel() / k)


def _beta_dpo_check(params: dict[str, Any], where: str) -> None:
    if params["beta_min"] > params["beta"]:
        raise ValueError(f"{where}: beta_min ({params['beta_min']}) must not exceed beta ({params['beta']})")


beta_dpo.check_params = _beta_dpo_check  # type: ignore[attr-defined]
beta_dpo.state = _beta_dpo_state  # type: ignore[attr-defined]  (the state's settings are loss hyperparameters)


@register(
    "alpha_dpo",
    paper="Wu et al. 2024, 'AlphaDPO: Adaptive Reward Margin for Direct Preference Optimization' (first titled "
    "'alpha-DPO: Adaptive Reward Margin is What Direct Preference Optimization Needs'), arXiv 2410.10148 (ICML 2025); "
    "the form of the authors' code (github.com/junkangwu/alpha-DPO, scripts/dpo_trainer.py)",
    formula="L(beta (avg(y_w) - avg(y_l) - gamma_beta_ratio - alpha sg[z])), z = (d - mean) / std, "
    "d = r_w/|y_w| - r_l/|y_l|; mean, std running EMAs (or the batch's)",
    needs_reference=True,
    aggregation="mean",
    reward="beta * avg(y), as SimPO (the reference enters only the detached margin); shared metrics use scale 1",
    reward_scale=None,
    reads=("avg_margin_ema_mean", "avg_margin_ema_std"),
    state=(margin_moments(0.9, "mean"),),
)
def alpha_dpo(
    lp: PairLogps,
    *,
    beta: Positive = 2.5,
    gamma_beta_ratio: NonNegative = 0.6,
    alpha: NonNegative = 0.2,
    normalization: Literal["running", "batch"] = "running",
    momentum: Momentum = 0.9,
) -> Tensor:
    """alpha-DPO: SimPO with a per-pair margin that grows with how far the policy has moved past the reference.

    The implicit reference pi_ref^ ~ U(y|x) (pi / pi_ref)^alpha turns SimPO's margin gamma into gamma plus a term in
    d = r_w/|y_w| - r_l/|y_l|, z-normalized and under stop-gradient; alpha = 0 is SimPO. Source: the paper's final
    loss L(u - sg[gamma + alpha M*]) in outline only (its normalization statistics and the scale of M* could not be
    checked); the terms are computed as the authors' code does: logits beta (avg(y_w) - avg(y_l) - gamma/beta -
    alpha z), so the adaptive term is beta alpha z (if M* is z, the paper's alpha is beta times this one), from
    length-averaged log-probs, with z against moving averages of the batch mean and sample std of d (momentum 0.9,
    from 0, updated before use: `MarginMoments`, running state across batches). normalization=batch uses the
    batch's own mean and std instead (a pure function of each rank's batch). A std of 0 (every d equal, as at
    initialization) gives z = 0. Deviation: their code also moves the averages on evaluation batches. Defaults: their
    Llama-3-8B-Instruct settings (beta 2.5, gamma/beta 0.6, alpha 0.2; Mistral-7B 0.15, 0.05). No TRL loss.
    """
    avg_w = lp.policy_chosen_logps / lp.chosen_lengths.clamp(min=1)
    u = avg_w - lp.policy_rejected_logps / lp.rejected_lengths.clamp(min=1)  # (B,)
    d = pair_margin(lp, "mean")  # (B,) detached
    if normalization == "batch":
        mean = d.mean()
        std = d.std() if d.numel() > 1 else torch.zeros_like(mean)
    else:
        mean, std = lp.avg_margin_ema_mean, lp.avg_margin_ema_std
        if mean is None or std is None:
            raise ValueError("alpha_dpo with normalization=running needs lp.avg_margin_ema_mean and _std (its "
                             "MarginMoments state fills them)")
    z = ((d - mean.detach()) / std.detach().clamp(min=STD_FLOOR)).detach()
    return -F.logsigmoid(beta * (u - gamma_beta_ratio - alpha * z))


def _alpha_dpo_reads(params: dict[str, Any]) -> frozenset[str]:
    fields = BASE_FIELDS[True] | REFERENCE_FIELDS[True] | option_reads(params, True)
    return fields | (frozenset(MARGIN_FIELDS["mean"]) if params["normalization"] == "running" else frozenset())


alpha_dpo.reads = _alpha_dpo_reads  # type: ignore[attr-defined]  (the EMA fields only with normalization=running)
alpha_dpo.state = lambda params: (  # type: ignore[attr-defined]
    (margin_moments(params["momentum"], "mean"),) if params["normalization"] == "running" else ()
)
