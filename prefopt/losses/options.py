"""Options that modify many losses, applied generically rather than copied into each loss.

- LD-DPO (Liu et al. 2024, 'Length Desensitization in Direct Preference Optimization', arXiv 2409.06411):
  `ld_alpha` in [0, 1] scales the log-probs of the tokens of the longer response past the shorter one's length,
  in the policy and the reference alike: logp'(y) = shared(y) + ld_alpha * (logp(y) - shared(y)), where
  shared(y) sums the first min(|y_w|, |y_l|) tokens. ld_alpha = 1 is the plain loss. Extension beyond the paper
  (which treats DPO only): the token counts become the matching weighted counts
  |y|' = min(|y_w|, |y_l|) + ld_alpha * (|y| - min), so a loss that averages log-probs (SimPO, ORPO, ...)
  divides the weighted sum by the sum of the token weights.
- WPO (Zhou et al. 2024, 'WPO: Enhancing RLHF with Weighted Preference Optimization', arXiv 2406.11827, v1):
  `wpo: true` multiplies each pair's loss by the detached weight w(x, y_w, y_l) = exp(avg_logp(y_w) +
  avg_logp(y_l)), the product of the policy's own length-normalized (per-token geometric mean) probabilities of
  both responses, computed on the unmodified record. Deviation: the later versions of the paper and its code
  (also TRL's `use_weighting`) "align" each token's log-prob by subtracting log sum_v pi(v | x, y_<t)^2 before
  averaging, and clamp the weight at 1; that needs per-token sums over the vocabulary, which the log-prob
  record does not carry, so the v1 definition is implemented (its weights are <= 1 already).
- f-divergence (Wang et al. 2023, 'Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
  Divergence Constraints', arXiv 2309.16240): `f_logratio` gives f'(pi / pi_ref) expressed from
  r = log(pi / pi_ref), for the losses that offer the option (dpo).

Every function here is pure; `apply_pair_options` is what `LossConfig.__call__` runs for a paired loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from prefopt.losses.schema import UnitInterval, hyperparameters
from prefopt.records import PairLogps

FDivergence = Literal["reverse_kl", "forward_kl", "js", "alpha"]
_MAX_EXP = 80.0  # exp(80) ~ 5.5e34 < float32 max: caps f'(u) = -1/u for huge negative log-ratios instead of inf


def pair_options(*, ld_alpha: UnitInterval = 1.0, wpo: bool = False) -> None:
    """The schema of the generic options: each paired loss accepts these keyword hyperparameters.

    ld_alpha: LD-DPO weight of the longer response's tokens past the shorter one's length (1: plain loss).
    wpo: weight each pair by the policy's detached length-normalized probabilities (WPO v1).
    """


PAIR_OPTIONS = hyperparameters(pair_options)


def check_pair_options(fn: Callable[..., Tensor], params: dict[str, Any], where: str) -> None:
    """Reject option combinations that have no meaning for `fn`."""
    if params.get("wpo") and getattr(fn, "sorts_batch", False):
        raise ValueError(f"{where}: wpo weights pairs, but this loss sorts the batch, so its rows are not pairs")


def option_reads(params: dict[str, Any], with_reference: bool) -> frozenset[str]:
    """The record fields the options read beyond the loss's own: LD-DPO (ld_alpha < 1) the shared-prefix sums."""
    if params.get("ld_alpha", 1.0) == 1.0:
        return frozenset()
    policy = {"policy_chosen_shared_logps", "policy_rejected_shared_logps"}
    return frozenset(policy | ({"ref_chosen_shared_logps", "ref_rejected_shared_logps"} if with_reference else set()))


def ld_logps(lp: PairLogps, ld_alpha: float) -> PairLogps:
    """LD-DPO: the record with the longer response's excess tokens weighted by `ld_alpha`, policy and reference."""
    if ld_alpha == 1.0:
        return lp
    if lp.policy_chosen_shared_logps is None or lp.policy_rejected_shared_logps is None:
        raise ValueError("ld_alpha < 1 needs the *_shared_logps fields of the log-prob record")

    def mix(full: Tensor | None, shared: Tensor | None) -> Tensor | None:
        if full is None:
            return None
        if shared is None:
            raise ValueError("ld_alpha < 1 needs ref_*_shared_logps when reference log-probs are given")
        return shared + ld_alpha * (full - shared)  # (B,)

    shortest = torch.minimum(lp.chosen_lengths, lp.rejected_lengths)  # (B,)
    return lp.replace(
        policy_chosen_logps=mix(lp.policy_chosen_logps, lp.policy_chosen_shared_logps),
        policy_rejected_logps=mix(lp.policy_rejected_logps, lp.policy_rejected_shared_logps),
        ref_chosen_logps=mix(lp.ref_chosen_logps, lp.ref_chosen_shared_logps),
        ref_rejected_logps=mix(lp.ref_rejected_logps, lp.ref_rejected_shared_logps),
        chosen_lengths=shortest + ld_alpha * (lp.chosen_lengths - shortest),
        rejected_lengths=shortest + ld_alpha * (lp.rejected_lengths - shortest),
    )


def wpo_weights(lp: PairLogps) -> Tensor:
    """WPO v1 pair weights exp(avg_logp(y_w) + avg_logp(y_l)) in (0, 1], detached; shape (B,)."""
    avg_w = lp.policy_chosen_logps / lp.chosen_lengths.clamp(min=1)
    avg_l = lp.policy_rejected_logps / lp.rejected_lengths.clamp(min=1)
    return torch.exp(avg_w + avg_l).detach()


def apply_pair_options(
    fn: Callable[..., Tensor], lp: PairLogps, params: dict[str, Any], *, ld_alpha: float, wpo: bool
) -> Tensor:
    """fn(lp) with LD-DPO applied to its input and WPO weights to its per-pair output; shape (B,)."""
    losses = fn(ld_logps(lp, ld_alpha), **params)  # (B,)
    return losses * wpo_weights(lp) if wpo else losses


def f_logratio(r: Tensor, f_divergence: FDivergence, f_alpha: float) -> Tensor:
    """f'(u) at u = pi / pi_ref = exp(r), up to an additive constant (it cancels in a chosen-minus-rejected margin).

    reverse KL  f(u) = u log u                          f'(u) = log u + 1       -> r (DPO exactly)
    forward KL  f(u) = -log u                           f'(u) = -1/u            -> -exp(-r)
    JS          f(u) = u log u - (u+1) log((u+1)/2)     f'(u) = log(2u/(1+u))   -> r - softplus(r)
    alpha       f(u) = (u^(1-a) - (1-a) u - a)/(a(a-1))  f'(u) = (1 - u^-a)/a    -> -expm1(-a r)/a
    """
    if f_divergence == "reverse_kl":
        return r
    if f_divergence == "forward_kl":
        return -torch.exp((-r).clamp(max=_MAX_EXP))
    if f_divergence == "js":
        return r - torch.nn.functional.softplus(r)
    return -torch.expm1((-f_alpha * r).clamp(max=_MAX_EXP)) / f_alpha
