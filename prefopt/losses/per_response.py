"""Pair losses with a reference that score the chosen and the rejected log-ratio separately (not only h).

These losses anchor each response's log-ratio r against 0 (or a running reward shift), so they can raise or
lower the absolute likelihood of the chosen response, which the margin-only losses in `paired.py` cannot.
Notation (docs/loss_pitfalls.md): r_w = logp(y_w) - ref_logp(y_w), r_l likewise, L(z) = -log sigmoid(z); log-probs
summed over completion tokens. Every function returns per-pair losses, shape (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.registry import register
from prefopt.losses.schema import Positive
from prefopt.losses.state import RunningLogratioMean
from prefopt.records import PairLogps


@register(
    "nca",
    paper="Chen et al. 2024, 'Noise Contrastive Alignment of Language Models with Explicit Rewards', arXiv 2402.05369 "
    "(NCA, pairwise case K = 2)",
    formula="L(beta r_w) + 1/2 L(-beta r_w) + 1/2 L(-beta r_l)",
    needs_reference=True,
)
def nca(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """Noise Contrastive Alignment for preference pairs: classify the chosen response as "data" against the
    reference, and each of the K = 2 responses (weight 1/K) as "noise".

    It optimizes absolute rather than relative likelihoods: the chosen log-ratio is kept from falling.
    """
    z_w, z_l = beta * lp.chosen_logratios(), beta * lp.rejected_logratios()  # (B,)
    return -F.logsigmoid(z_w) - 0.5 * F.logsigmoid(-z_w) - 0.5 * F.logsigmoid(-z_l)


@register(
    "bco",
    paper="Jung et al. 2024, 'Binary Classifier Optimization for Large Language Model Alignment', arXiv 2404.04656 "
    "(paired form, TRL's 'bco_pair')",
    formula="L(beta r_w - delta) + L(-(beta r_l - delta)), delta = beta * running mean of r (detached)",
    needs_reference=True,
    reward="beta * (logp - ref_logp); the classifier's logit is this reward minus delta",
    reads=("running_logratio_mean",),
    state=(RunningLogratioMean,),
)
def bco(lp: PairLogps, *, beta: Positive = 0.1, reward_shift: bool = True) -> Tensor:
    """Binary Classifier Optimization: a logistic classifier with logit beta r - delta, chosen = 1, rejected = 0.

    delta, the paper's reward shift, is the running mean of the rewards beta r of all responses seen so far
    (its declared state, `RunningLogratioMean`, keeps the mean of r over all ranks: lp.running_logratio_mean), detached. reward_shift=false sets
    delta = 0. (The paper's underlying-distribution-matching importance weights need an extra classifier on
    prompt embeddings and are not implemented.)
    """
    delta = torch.zeros(())
    if reward_shift:
        if lp.running_logratio_mean is None:
            raise ValueError("bco with reward_shift=true needs lp.running_logratio_mean")
        delta = beta * lp.running_logratio_mean.detach()
    z_w, z_l = beta * lp.chosen_logratios() - delta, beta * lp.rejected_logratios() - delta  # (B,)
    return -F.logsigmoid(z_w) - F.logsigmoid(-z_l)


@register(
    "sppo",
    paper="Wu et al. 2024, 'Self-Play Preference Optimization for Language Model Alignment', arXiv 2405.00675, "
    "Eq. 4.7 (hard labels)",
    formula="(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2",
    needs_reference=True,
    reward="beta * (logp - ref_logp): SPPO's target is r = eta (P(y > pi_t) - 1/2) with eta = 1/beta",
)
def sppo(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """SPPO with hard win probabilities: P(y_w > pi_t) = 1 and P(y_l > pi_t) = 0, eta = 1/beta.

    The reference plays the previous iterate pi_t. Each log-ratio is regressed onto +-eta/2 separately, so the
    chosen response's likelihood is pushed up and the rejected one's down, not just their difference.
    """
    return (lp.chosen_logratios() - 0.5 / beta) ** 2 + (lp.rejected_logratios() + 0.5 / beta) ** 2


@register(
    "apo_zero",
    paper="D'Oosterlinck et al. 2024, 'Anchored Preference Optimization and Contrastive Revisions', "
    "arXiv 2408.06266, Eq. 7",
    formula="(1 - sigmoid(beta r_w)) + sigmoid(beta r_l)",
    needs_reference=True,
)
def apo_zero(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """APO-zero: raise the chosen likelihood and lower the rejected one, each anchored at r = 0.

    For data whose chosen answers are better than the model's own outputs.
    """
    return 1 - torch.sigmoid(beta * lp.chosen_logratios()) + torch.sigmoid(beta * lp.rejected_logratios())


@register(
    "apo_down",
    paper="D'Oosterlinck et al. 2024, arXiv 2408.06266",
    formula="sigmoid(beta r_w) + (1 - sigmoid(beta h))",
    needs_reference=True,
)
def apo_down(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """APO-down: lower both likelihoods, the rejected one more (the margin term).

    For data whose chosen answers are worse than the model's own outputs.
    """
    return torch.sigmoid(beta * lp.chosen_logratios()) + 1 - torch.sigmoid(beta * lp.margins())
