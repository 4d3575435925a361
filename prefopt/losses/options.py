"""Options that modify many losses, applied generically rather than copied into each loss.

- LD-DPO (Liu et al. 2024, 'Length Desensitization in Direct Preference Optimization', arXiv 2409.06411):
  `ld_alpha` in [0, 1] scales the log-probs of the tokens of the longer response past the shorter one's length,
  in the policy and the reference alike: logp'(y) = shared(y) + ld_alpha * (logp(y) - shared(y)), where
  shared(y) sums the first min(|y_w|, |y_l|) tokens. ld_alpha = 1 is the plain loss. Extension beyond the paper
  (which treats DPO only): the token counts become the matching weighted counts
  |y|' = min(|y_w|, |y_l|) + ld_alpha * (|y| - min), so a loss that averages log-probs (SimPO, ORPO, ...)
  divides the weighted sum by the sum of the token weights.
- WPO (Zhou et al. 2024, 'WPO: Enhancing RLHF with Weighted Preference Optimization', arXiv 2406.11827): `wpo`
  multiplies each pair's loss by a detached weight of the policy's own probabilities of both responses, computed on
  the unmodified record. `wpo: v1` (or `true`, the v1 setting's old spelling): the paper's first version,
  w = exp(avg_logp(y_w) + avg_logp(y_l)), the product of per-token geometric-mean probabilities (<= 1).
  `wpo: aligned`: the later versions' sampling-aligned weight (Eq. 2 there, as TRL cites it; the authors' code):
  each token's log-prob minus log sum_v pi(v | x, y_<t)^2, i.e. its probability relative to the expected
  probability E_{v~pi}[pi(v)] of a token the policy samples itself, averaged over the response,
  w = min(1, exp(aligned_avg(y_w) + aligned_avg(y_l))). The clamp at 1 is the authors' code (scripts/run_wpo.py,
  `torch.clamp(..., max=1)`); TRL 1.16's `use_weighting` computes the same aligned averages but does not clamp (a
  token likelier than a typical sample has a positive aligned log-prob, so its weights may exceed 1). The aligned
  sums are the record's `policy_*_aligned_logps` (the scorer computes them from the policy's logits, detached).
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
WpoMode = Literal[False, True, "v1", "aligned"]  # True = "v1" (configs written before the aligned weight)
ALIGNED_FIELDS = ("policy_chosen_aligned_logps", "policy_rejected_aligned_logps")
_MAX_EXP = 80.0  # exp(80) ~ 5.5e34 < float32 max: caps f'(u) = -1/u for huge negative log-ratios instead of inf


def pair_options(*, ld_alpha: UnitInterval = 1.0, wpo: WpoMode = False) -> None:
    """The schema of the generic options: each paired loss accepts these keyword hyperparameters.

    ld_alpha: LD-DPO weight of the longer response's tokens past the shorter one's length (1: plain loss).
    wpo: weight each pair by the policy's detached probabilities of both responses: false (off), v1 (length-normalized
        probabilities; true is v1) or aligned (sampling-aligned, clamped at 1).
    """


PAIR_OPTIONS = hyperparameters(pair_options)


def check_pair_options(fn: Callable[..., Tensor], params: dict[str, Any], where: str) -> None:
    """Reject option combinations that have no meaning for `fn`, and numbers standing in for wpo's choices."""
    wpo = params.get("wpo", False)
    if not isinstance(wpo, (bool, str)):  # 1 == True and 0 == False would pass the choices
        raise ValueError(f"{where}: wpo is one of false, true, 'v1', 'aligned', got {wpo!r}")
    if wpo and getattr(fn, "sorts_batch", False):
        raise ValueError(f"{where}: wpo weights pairs, but this loss sorts the batch, so its rows are not pairs")


def option_reads(params: dict[str, Any], with_reference: bool) -> frozenset[str]:
    """The record fields the options read beyond the loss's own: LD-DPO (ld_alpha < 1) the shared-prefix sums, the
    aligned WPO weight the aligned sums."""
    fields = set(ALIGNED_FIELDS) if params.get("wpo") == "aligned" else set()
    if params.get("ld_alpha", 1.0) != 1.0:
        fields |= {"policy_chosen_shared_logps", "policy_rejected_shared_logps"}
        fields |= {"ref_chosen_shared_logps", "ref_rejected_shared_logps"} if with_reference else set()
    return frozenset(fields)


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


def wpo_weights(lp: PairLogps, mode: WpoMode = "v1") -> Tensor:
    """WPO pair weights in (0, 1], detached; shape (B,). v1: exp(avg_logp(y_w) + avg_logp(y_l)); aligned:
    min(1, exp(aligned_avg(y_w) + aligned_avg(y_l))), aligned_avg = the record's aligned sum / |y|."""
    chosen, rejected = lp.policy_chosen_logps, lp.policy_rejected_logps
    if mode == "aligned":
        chosen, rejected = lp.policy_chosen_aligned_logps, lp.policy_rejected_aligned_logps
        if chosen is None or rejected is None:
            raise ValueError("wpo: aligned needs policy_chosen_aligned_logps and policy_rejected_aligned_logps")
    weights = torch.exp(chosen / lp.chosen_lengths.clamp(min=1) + rejected / lp.rejected_lengths.clamp(min=1))
    return (weights.clamp(max=1.0) if mode == "aligned" else weights).detach()


def apply_pair_options(
    fn: Callable[..., Tensor], lp: PairLogps, params: dict[str, Any], *, ld_alpha: float, wpo: WpoMode
) -> Tensor:
    """fn(lp) with LD-DPO applied to its input and WPO weights to its per-pair output; shape (B,)."""
    losses = fn(ld_logps(lp, ld_alpha), **params)  # (B,)
    return losses * wpo_weights(lp, "aligned" if wpo == "aligned" else "v1") if wpo else losses


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
