"""Preference losses on (prompt, chosen, rejected) pairs that use a frozen reference and act on the margin h.

Notation (docs/loss_pitfalls.md): r_w = logp(y_w) - ref_logp(y_w), r_l likewise, h = r_w - r_l, L(z) = -log sigmoid(z).
Log-probs are summed over completion tokens unless a docstring says otherwise. Every function returns per-pair
losses, shape (B,); the batch loss is their mean. The losses that score r_w and r_l separately are in
`per_response.py`; the generic options (LD-DPO, WPO) are applied around every one of them by `options.py`.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.options import FDivergence, f_logratio
from prefopt.losses.registry import register
from prefopt.losses.schema import NonNegative, Positive, Range
from prefopt.records import PairLogps

Epsilon = Annotated[float, Range(0.0, 0.5, high_inclusive=False)]
OpenEpsilon = Annotated[float, Range(0.0, 0.5, low_inclusive=False, high_inclusive=False)]
OpenUnit = Annotated[float, Range(0.0, 1.0, low_inclusive=False, high_inclusive=False)]


@register(
    "dpo",
    paper="Rafailov et al. 2023, arXiv 2305.18290, Eq. 7; cDPO: Mitchell 2023, 'A note on DPO with noisy preferences'; "
    "f-divergence: Wang et al. 2023, arXiv 2309.16240",
    formula="(1 - eps) L(beta h) + eps L(-beta h); eps = label_smoothing (0: plain DPO); f-DPO replaces r by f'(exp r)",
    needs_reference=True,
    aliases=("cdpo",),
)
def dpo(
    lp: PairLogps,
    *,
    beta: Positive = 0.1,
    label_smoothing: Epsilon = 0.0,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha: OpenUnit = 0.5,
) -> Tensor:
    """Direct Preference Optimization, with conservative (cDPO) label smoothing and f-DPO divergences.

    With eps > 0 the labels are assumed flipped with probability eps; the optimum is then finite,
    beta h* = log((1 - eps) / eps). This is cDPO, not robust DPO (`robust`), which divides by (1 - 2 eps).
    f_divergence (f-DPO): the margin becomes f'(pi/pi_ref)(y_w) - f'(pi/pi_ref)(y_l) with f'(u) from r = log u
    (`options.f_logratio`); reverse_kl is DPO exactly, forward_kl and js are f-DPO's, alpha uses f_alpha in (0, 1).
    """
    margin = lp.margins()  # (B,)
    if f_divergence != "reverse_kl":  # reverse KL's f'(u) is r itself (up to a constant): DPO's margin
        r_w, r_l = lp.chosen_logratios(), lp.rejected_logratios()
        margin = f_logratio(r_w, f_divergence, f_alpha) - f_logratio(r_l, f_divergence, f_alpha)
    z = beta * margin
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@register(
    "robust",
    paper="Chowdhury et al. 2024, 'Provably Robust DPO', arXiv 2403.00409",
    formula="[(1 - eps) L(beta h) - eps L(-beta h)] / (1 - 2 eps)",
    needs_reference=True,
)
def robust(lp: PairLogps, *, beta: Positive = 0.1, label_smoothing: Epsilon = 0.0) -> Tensor:
    """Robust DPO (rDPO): an unbiased estimate of the clean-label DPO loss when labels flip with probability eps.

    Unlike cDPO it has no finite optimum (its derivative in h is negative everywhere) and it may go negative.
    """
    z = beta * lp.margins()  # (B,)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register(
    "ipo",
    paper="Azar et al. 2023, 'A General Theoretical Paradigm to Understand Learning from Human Preferences', "
    "arXiv 2310.12036, Eq. 17",
    formula="(h - 1/(2 tau))^2 with tau = beta; h from summed (paper) or length-averaged log-ratios",
    needs_reference=True,
    aggregation="sum (paper); mean with average_log_probs=true (TRL, HALOs)",
    reward="tau * (logp - ref_logp): IPO's regularized objective gives P(y > mu) = tau * r + const",
)
def ipo(lp: PairLogps, *, beta: Positive = 0.1, average_log_probs: bool = False) -> Tensor:
    """Identity Preference Optimization: regress the margin h onto 1/(2 tau); beta plays tau.

    The paper (and the original DPO repository, OpenRLHF) use summed log-probs: the default. TRL and HALOs
    length-average them (a choice the IPO authors confirmed to TRL, not in the paper): average_log_probs=true.
    """
    h = lp.avg_margins() if average_log_probs else lp.margins()  # (B,)
    return (h - 1 / (2 * beta)) ** 2


@register(
    "hinge",
    paper="Liu et al. 2023, 'Statistical Rejection Sampling Improves Preference Optimization' (RSO), arXiv 2309.06657; "
    "SLiC: Zhao et al. 2023",
    formula="max(0, 1 - beta h)",
    needs_reference=True,
    aliases=("rso",),
)
def hinge(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """Hinge loss on the reference-normalized margin (RSO's loss without its rejection sampling).

    The gradient vanishes once h >= 1/beta: the margin stops growing at 1/beta.
    """
    return torch.relu(1 - beta * lp.margins())


@register(
    "dpo_norm",
    paper="Meng et al. 2024, SimPO paper (arXiv 2405.14734) ablation; Lambert et al. 2024, Tulu 3 "
    "(length-normalized DPO)",
    formula="L(beta (r_w/|y_w| - r_l/|y_l|))",
    needs_reference=True,
    aggregation="mean",
    reward="beta * (logp - ref_logp) / |y|",
)
def dpo_norm(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """Length-normalized DPO: DPO on per-token log-ratios (so beta is on a per-token scale, e.g. 5 in Tulu 3)."""
    return -F.logsigmoid(beta * lp.avg_margins())


@register(
    "rdpo",
    paper="Park et al. 2024, 'Disentangling Length from Quality in DPO' (R-DPO), arXiv 2403.19159",
    formula="L(beta h + alpha (|y_w| - |y_l|)) (paper); L(beta h - alpha (|y_w| - |y_l|)) with length_term=subtract",
    needs_reference=True,
)
def rdpo(
    lp: PairLogps, *, beta: Positive = 0.1, alpha: NonNegative = 0.05, length_term: Literal["add", "subtract"] = "add"
) -> Tensor:
    """Length-regularized DPO (R-DPO): DPO for the objective max E[r - alpha |y|] - beta KL.

    With that penalized reward, Bradley-Terry on r gives r_w - r_l = beta h + alpha (|y_w| - |y_l|): the length
    difference enters with a plus sign, so a longer chosen response already "explains" part of the preference
    and gets less push (the paper's loss). Several implementations subtract the term, which pushes harder on
    longer chosen responses; length_term=subtract reproduces them.
    """
    length_gap = lp.chosen_lengths - lp.rejected_lengths  # (B,)
    sign = 1.0 if length_term == "add" else -1.0
    return -F.logsigmoid(beta * lp.margins() + sign * alpha * length_gap)


@register(
    "dpop",
    paper="Pal et al. 2024, 'Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive', "
    "arXiv 2402.13228",
    formula="L(beta (h - lambda max(0, ref_logp(y_w) - logp(y_w))))",
    needs_reference=True,
)
def dpop(lp: PairLogps, *, beta: Positive = 0.1, lam: NonNegative = 50.0) -> Tensor:
    """DPO-Positive: DPO plus a penalty once the chosen response's likelihood falls below the reference's.

    lam = 50 is a value used in the paper's experiments; lam = 0 is DPO.
    """
    penalty = torch.relu(-lp.chosen_logratios())  # (B,): max(0, ref_logp(y_w) - logp(y_w))
    return -F.logsigmoid(beta * (lp.margins() - lam * penalty))


@register(
    "rpo",
    paper="Pang et al. 2024, 'Iterative Reasoning Preference Optimization', arXiv 2404.19733",
    formula="L(beta h) + alpha NLL(y_w) / |y_w|, NLL(y_w) = -logp(y_w)",
    needs_reference=True,
    aggregation="sum (DPO term); mean (NLL term)",
)
def rpo(lp: PairLogps, *, beta: Positive = 0.1, alpha: NonNegative = 1.0) -> Tensor:
    """DPO plus the chosen response's per-token negative log-likelihood (the paper's "DPO + NLL").

    The NLL is normalized per pair by |y_w| (paper); TRL's rpo_alpha normalizes by the batch's token count.
    """
    nll = -lp.policy_chosen_logps / lp.chosen_lengths.clamp(min=1)  # (B,)
    return -F.logsigmoid(beta * lp.margins()) + alpha * nll


@register(
    "exo",
    paper="Ji et al. 2024, 'Towards Efficient Exact Optimization of Language Model Alignment', "
    "arXiv 2402.00856, Eq. 16",
    formula="s(bh) [log s(bh) - log(1 - eps)] + s(-bh) [log s(-bh) - log eps], s = sigmoid, bh = beta h",
    needs_reference=True,
)
def exo(lp: PairLogps, *, beta: Positive = 0.1, epsilon: OpenEpsilon = 1e-3) -> Tensor:
    """EXO (pairwise): reverse KL from the model's pair distribution softmax(beta r) to the label (1 - eps, eps).

    Mode-seeking, unlike DPO's forward KL. Minimized at beta h = log((1 - eps)/eps), where the loss is 0.
    """
    z = beta * lp.margins()  # (B,)
    p_w, p_l = torch.sigmoid(z), torch.sigmoid(-z)
    log_p_w, log_p_l = F.logsigmoid(z), F.logsigmoid(-z)
    return p_w * (log_p_w - math.log1p(-epsilon)) + p_l * (log_p_l - math.log(epsilon))


@register(
    "discopop",
    paper="Lu et al. 2024, 'Discovering Preference Optimization Algorithms with and for LLMs' (DiscoPOP / LRML), "
    "arXiv 2406.08414",
    formula="(1 - m) L(beta h) + m exp(-beta h), m = sigmoid(beta h / tau)",
    needs_reference=True,
)
def discopop(lp: PairLogps, *, beta: Positive = 0.1, tau: Positive = 0.05) -> Tensor:
    """Log-ratio modulated loss: blends the logistic (DPO) and exponential losses by sigmoid(beta h / tau).

    m exp(-beta h) is computed as exp(-beta h + log m), which stays finite where m underflows (beta h << 0).
    tau = 0.05 is the discovered loss's constant. Its slope at the reference (h = 0) is beta (-3/4 + (1 - ln 2) /
    (4 tau)), positive for tau < 0.102: descent first lowers the margin, into a local minimum at beta h = -0.119
    (tau 0.05), h = -0.119 / beta, a reversed preference (what it does on the built-in task: results/README.md).
    """
    z = beta * lp.margins()  # (B,)
    m = torch.sigmoid(z / tau)
    return -(1 - m) * F.logsigmoid(z) + torch.exp(-z + F.logsigmoid(z / tau))


@register(
    "aot",
    paper="Melnyk et al. 2024, 'Distributional Preference Alignment of LLMs via Optimal Transport', arXiv 2406.05882 "
    "(paired AOT; TRL loss_type='aot')",
    formula="L(beta d_i), d = sort_batch(logp_w - logp_l) - sort_batch(ref_logp_w - ref_logp_l), row i = quantile i",
    needs_reference=True,
)
def aot(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """Paired AOT: the policy's chosen-minus-rejected log-prob margins should stochastically dominate the
    reference's, enforced quantile by quantile (1-D optimal transport = sorting) within the batch.

    Row i of the output is the i-th quantile, not pair i; the batch mean is the loss. This is TRL's `aot`; the
    unpaired variant (the AOT paper's "unpaired" setting, TRL's `aot_pair`, later `aot_unpaired`) is `aot_unpaired`.
    """
    policy_sorted, _ = torch.sort(lp.policy_chosen_logps - lp.policy_rejected_logps)  # (B,)
    ref_sorted, _ = torch.sort(lp.ref_chosen_logps - lp.ref_rejected_logps)  # (B,)
    return -F.logsigmoid(beta * (policy_sorted - ref_sorted))


@register(
    "aot_unpaired",
    paper="Melnyk et al. 2024, arXiv 2406.05882 (unpaired AOT; TRL loss_type='aot_pair', renamed 'aot_unpaired')",
    formula="L(beta d_i), d = sort_batch(r_w) - sort_batch(r_l), row i = quantile i",
    needs_reference=True,
)
def aot_unpaired(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """Unpaired AOT: the distribution of chosen log-ratios should stochastically dominate that of rejected ones.

    It reads chosen and rejected rows from a pair record but never uses the pairing: r_w and r_l are sorted
    separately and matched by quantile. Row i of the output is the i-th quantile.
    """
    chosen_sorted, _ = torch.sort(lp.chosen_logratios())  # (B,)
    rejected_sorted, _ = torch.sort(lp.rejected_logratios())  # (B,)
    return -F.logsigmoid(beta * (chosen_sorted - rejected_sorted))


aot.sorts_batch = True  # type: ignore[attr-defined]  (WPO's per-pair weights do not apply to quantile rows)
aot_unpaired.sorts_batch = True  # type: ignore[attr-defined]
