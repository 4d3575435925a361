"""Losses that read per-token quantities: TDPO's sequential KL between the reference's and the policy's distributions,
and SamPO's log-ratios summed over a down-sample of each response's tokens.

Notation (docs/loss_pitfalls.md): r_w, r_l summed log-ratios, h = r_w - r_l, L(z) = -log sigmoid(z); and
D_w = D_SeqKL(x, y_w; pi_ref || pi) = sum_t KL(pi_ref(.|x, y_w,<t) || pi(.|x, y_w,<t)), D_l likewise: the record's
`chosen_seq_kl` and `rejected_seq_kl`, which the scorer computes from both models' full next-token distributions.
r~_w, r~_l: the log-ratios summed over the tokens of SamPO's down-sample (the record's `*_sampled_logps`).
The generic options apply as to every paired loss; LD-DPO's ld_alpha weights the log-ratio sums, not the KLs.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.registry import register
from prefopt.losses.schema import NonNegative, Positive
from prefopt.records import PairLogps

SEQ_KL = ("chosen_seq_kl", "rejected_seq_kl")
SAMPLED = ("policy_chosen_sampled_logps", "policy_rejected_sampled_logps", "ref_chosen_sampled_logps",
           "ref_rejected_sampled_logps")
TDPO_PAPER = "Zeng et al. 2024, 'Token-level Direct Preference Optimization', arXiv 2404.11999"


def _seq_kl(lp: PairLogps) -> tuple[Tensor, Tensor]:
    if lp.chosen_seq_kl is None or lp.rejected_seq_kl is None:
        raise ValueError("tdpo needs chosen_seq_kl and rejected_seq_kl in the record (a live reference, full logits)")
    return lp.chosen_seq_kl, lp.rejected_seq_kl


@register(
    "tdpo1",
    paper=f"{TDPO_PAPER}: the L_TDPO1 objective, -log sigmoid(u - delta)",
    formula="L(beta h - (beta D_l - beta D_w)), D = sequential KL(pi_ref || pi) over the response's tokens",
    needs_reference=True,
    reads=SEQ_KL,
)
def tdpo1(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """Token-level DPO, first form: DPO's margin minus the difference of the responses' sequential KLs.

    delta = beta (D_l - D_w) enters with its gradient, so TDPO_1 also pulls the policy's next-token distributions
    along the chosen response away from the reference's and along the rejected one toward it. With one-token
    responses to one prompt, D_w = D_l (the same context) and TDPO_1 is DPO exactly. As the authors' code: no
    length averaging, and the KL direction is reference-to-policy.
    """
    d_w, d_l = _seq_kl(lp)
    return -F.logsigmoid(beta * lp.margins() - beta * (d_l - d_w))


@register(
    "tdpo2",
    paper=f"{TDPO_PAPER}: the L_TDPO2 objective, -log sigmoid(u - alpha delta_2) (the form the paper recommends)",
    formula="L(beta h - alpha (beta D_l - sg(beta D_w))), sg = stop-gradient",
    needs_reference=True,
    reads=SEQ_KL,
)
def tdpo2(lp: PairLogps, *, beta: Positive = 0.1, alpha: NonNegative = 0.5) -> Tensor:
    """Token-level DPO, second form: the chosen response's sequential KL is detached and delta is scaled by alpha.

    Only D_l is pushed on (kept small: the rejected response's distributions stay near the reference's), which the
    paper reports controls KL growth better than TDPO_1; alpha = 0 is DPO. alpha defaults to the paper's 0.5.
    """
    d_w, d_l = _seq_kl(lp)
    return -F.logsigmoid(beta * lp.margins() - alpha * (beta * d_l - beta * d_w.detach()))


@register(
    "sampo",
    paper="Lu et al. 2024, 'Eliminating Biased Length Reliance of Direct Preference Optimization via Down-Sampled KL "
    "Divergence', arXiv 2406.10957: DPO's loss on log-ratios summed over T_m = min(|y_w|, |y_l|) tokens per response",
    formula="L(beta (r~_w - r~_l)), r~ = log-ratio summed over a random min(|y_w|, |y_l|) of the response's tokens",
    needs_reference=True,
    aggregation="sum over an equal-size down-sample of each response's tokens",
    reward="beta * (logp - ref_logp) over the down-sampled tokens (shared metrics: full sums)",
    reads=SAMPLED,
)
def sampo(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """SamPO: DPO on log-ratios summed over an equal number of tokens of both responses, so length is no reward.

    The shorter response keeps all its tokens, the longer one a uniform random subset of as many, drawn without
    replacement, as the authors' code (dpo_trainer.py, `torch.multinomial` on the loss mask). Deviation: there the
    subset is drawn afresh at every forward, separately for the policy and the reference; here it is a fixed
    pseudo-random function of the example's index (`prefopt.logps.sampled_mask`), the same tokens for both models,
    so the reference's down-sampled sums can be cached and the log-ratio is exactly 0 at initialization. Within one
    epoch a per-example draw has the distribution of a per-step draw; over several epochs each pair keeps its subset
    (the built-in task's 300 steps of 32 pairs visit each of its 4,000 pairs 2.4 times on average), where the code
    would draw again: a per-step draw is not offered, as the cache could not hold it. Validation pairs carry no index:
    their key is their position in the batch. TRL has no SamPO.
    """
    pcs, prs, rcs, rrs = (getattr(lp, f) for f in SAMPLED)
    if pcs is None or prs is None or rcs is None or rrs is None:
        raise ValueError("sampo needs the *_sampled_logps fields of policy and reference in the record")
    return -F.logsigmoid(beta * ((pcs - rcs) - (prs - rrs)))


def _sampo_check(params: dict[str, Any], where: str) -> None:
    if params.get("ld_alpha", 1.0) != 1.0:
        raise ValueError(f"{where}: ld_alpha weights the full sums, which sampo does not read (its down-sample "
                         "already equalizes the lengths); leave ld_alpha at 1")


sampo.check_params = _sampo_check  # type: ignore[attr-defined]
