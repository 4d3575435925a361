"""Losses on unpaired (prompt, completion, desirable?) rows: `UnpairedLogps` records, `paired=False`.

Notation: r = logp(y) - ref_logp(y), summed over completion tokens. Every function returns per-row losses,
shape (B,); the batch loss is their mean. Paired data becomes unpaired rows by splitting each pair into a
desirable and an undesirable row; the batches must then mix both labels (docs/loss_pitfalls.md, 'KTO needs mixed
batches').
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefopt.losses.registry import register
from prefopt.losses.schema import NonNegative, Positive
from prefopt.losses.state import global_batch
from prefopt.records import UnpairedLogps

GLOBAL_KL_ROWS = global_batch("policy_kl_logps", "ref_kl_logps")  # z0 is a mean over the global batch


def kto_reference_point(lp: UnpairedLogps) -> Tensor:
    """KTO's z0 = max(0, mean of r over the batch's mismatched (prompt i, completion j) rows), detached; a scalar."""
    if lp.policy_kl_logps is None or lp.ref_kl_logps is None:
        raise ValueError("kto needs policy_kl_logps and ref_kl_logps (mismatched rows) to estimate its reference point")
    return (lp.policy_kl_logps - lp.ref_kl_logps).mean().clamp(min=0).detach()


@register(
    "kto",
    paper="Ethayarajh et al. 2024, 'KTO: Model Alignment as Prospect Theoretic Optimization', arXiv 2402.01306",
    formula="desirable: lambda_D (1 - sigmoid(beta (r - z0))); undesirable: lambda_U (1 - sigmoid(beta (z0 - r))); "
    "z0 = max(0, mean r over mismatched rows), no gradient",
    needs_reference=True,
    paired=False,
    reads=("policy_kl_logps", "ref_kl_logps"),
    state=(GLOBAL_KL_ROWS,),
)
def kto(
    lp: UnpairedLogps,
    *,
    beta: Positive = 0.1,
    desirable_weight: NonNegative = 1.0,
    undesirable_weight: NonNegative = 1.0,
) -> Tensor:
    """Kahneman-Tversky Optimization: a prospect-theoretic value of each row's reward relative to z0.

    z0 estimates KL(pi || pi_ref) from the batch's mismatched pairs (it needs a batch larger than 1), clamped
    at 0 and detached, as in the paper and TRL; like TRL, the mean is over every process's rows (its declared
    state gathers the mismatched rows' log-probs over the ranks). The paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3].
    """
    z0 = kto_reference_point(lp)
    r = lp.logratios()  # (B,)
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(lp.desirable.bool(), desirable_loss, undesirable_loss)


@register(
    "apo_zero_unpaired",
    paper="D'Oosterlinck et al. 2024, 'Anchored Preference Optimization and Contrastive Revisions', arXiv 2408.06266 "
    "(unpaired APO-zero, TRL's KTO trainer loss_type='apo_zero_unpaired')",
    formula="desirable: lambda_D (1 - sigmoid(beta r)); undesirable: lambda_U sigmoid(beta r)",
    needs_reference=True,
    paired=False,
)
def apo_zero_unpaired(
    lp: UnpairedLogps,
    *,
    beta: Positive = 0.1,
    desirable_weight: NonNegative = 1.0,
    undesirable_weight: NonNegative = 1.0,
) -> Tensor:
    """APO-zero on unpaired rows: raise desirable rows' likelihood and lower undesirable rows', anchored at r = 0.

    The paired `apo_zero` is the sum of the two row losses of a pair (with unit weights).
    """
    z = beta * lp.logratios()  # (B,)
    desirable_loss = desirable_weight * (1 - torch.sigmoid(z))
    return torch.where(lp.desirable.bool(), desirable_loss, undesirable_weight * torch.sigmoid(z))
