"""Pair losses that need no reference model at training time.

Their own "rewards" (beta * logp, beta * avg, log odds) are not DPO's implicit reward beta * (logp - ref_logp)
(docs/loss_pitfalls.md, 'Reference-free rewards are not DPO's rewards'). The shared metrics scale the
reference-based log-ratio margin by `reward_scale`: `beta` where the loss's beta multiplies summed log-probs
exactly as DPO's does (cpo), and 1 (raw nats) where it does not (simpo's beta multiplies per-token averages, orpo's
lambda weighs a log-odds term, slic and sft have no scale). Notation: logp summed over completion tokens, avg(y) = logp(y)/|y|, L(z) = -log sigmoid(z),
NLL(y) = -logp(y). Every function returns per-pair losses, shape (B,). Empty completions (|y| = 0) would make
averages 0/0 (docs/loss_pitfalls.md, 'Empty completions'): token counts are clamped at 1 wherever they divide.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.options import option_reads
from prefopt.losses.registry import BASE_FIELDS, register
from prefopt.losses.schema import NonNegative, Positive
from prefopt.records import PairLogps


def _avg(logps: Tensor, lengths: Tensor) -> Tensor:
    return logps / lengths.clamp(min=1)


def _avg_margin(lp: PairLogps) -> Tensor:
    """avg(y_w) - avg(y_l): the margin of length-averaged policy log-probs, shape (B,)."""
    return _avg(lp.policy_chosen_logps, lp.chosen_lengths) - _avg(lp.policy_rejected_logps, lp.rejected_lengths)


def chosen_nll(lp: PairLogps, how: Literal["sum", "pair_mean", "batch_mean"]) -> Tensor:
    """The chosen response's NLL per pair, shape (B,), in one of three normalizations.

    sum: -logp(y_w) (a sequence NLL); pair_mean: -logp(y_w)/|y_w|; batch_mean: -logp(y_w) * B / sum_j |y_w,j|,
    whose batch mean is the token-level mean sum_i -logp(y_w,i) / sum_i |y_w,i| (the usual SFT loss; per micro-batch).
    """
    if how == "sum":
        return -lp.policy_chosen_logps
    if how == "pair_mean":
        return -_avg(lp.policy_chosen_logps, lp.chosen_lengths)
    tokens_per_pair = lp.chosen_lengths.sum().clamp(min=1) / lp.chosen_lengths.numel()  # token counts: no gradient
    return -lp.policy_chosen_logps / tokens_per_pair


@register(
    "simpo",
    paper="Meng et al. 2024, 'SimPO: Simple Preference Optimization with a Reference-Free Reward', arXiv 2405.14734",
    formula="L(beta (avg(y_w) - avg(y_l)) - gamma), gamma = gamma_beta_ratio * beta",
    needs_reference=False,
    aggregation="mean",
    reward="beta * avg(y) = beta * logp(y) / |y| (no reference); shared metrics use scale 1",
    reward_scale=None,
)
def simpo(lp: PairLogps, *, beta: Positive = 2.0, gamma_beta_ratio: NonNegative = 0.5) -> Tensor:
    """SimPO: a Bradley-Terry loss on length-normalized policy log-probs with a target margin gamma.

    The margin is given as gamma/beta, as in the SimPO repository and HALOs (published settings: beta in
    [2, 2.5], gamma/beta in [0.3, 0.55]); TRL and Liger take an absolute gamma (simpo_gamma): gamma_beta_ratio =
    gamma / beta converts. Pure SimPO has no NLL term (TRL's CPO trainer keeps cpo_alpha = 1 with
    loss_type=simpo; here that is a composite with `sft`).
    """
    margin = _avg_margin(lp)  # (B,)
    return -F.logsigmoid(beta * margin - gamma_beta_ratio * beta)


def _log1m_exp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(a > -0.6931, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


@register(
    "orpo",
    paper="Hong et al. 2024, 'ORPO: Monolithic Preference Optimization without Reference Model', arXiv 2403.07691",
    formula="NLL(y_w)/|y_w| - lambda log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = p/(1-p), p = exp(avg(y)); "
    "nll=prompt_and_completion: the NLL over prompt and completion tokens, token mean over the batch",
    needs_reference=False,
    aggregation="mean",
    reward="log odds(y) = avg(y) - log(1 - exp(avg(y))) (no reference); shared metrics use scale 1",
    reward_scale=None,
    strength=("lam", 1),  # the odds-ratio term's weight: larger lam, further from the reference
)
def orpo(
    lp: PairLogps, *, lam: NonNegative = 0.1, nll: Literal["completion", "prompt_and_completion"] = "completion"
) -> Tensor:
    """ORPO: supervised fine-tuning on the chosen response plus a log odds-ratio penalty, weighted by lambda.

    nll=completion (the paper's L_SFT): the chosen completion's per-token NLL, per pair. nll=prompt_and_completion
    (the authors' code, whose prompt loss is on unless --disable_prompt_loss, and TRL's ORPO trainer): the NLL of the
    whole chosen sequence, prompt tokens 2..|x| and completion, as one token mean over the batch (per-pair values
    -(logp(x) + logp(y_w)) * B / sum_j (|x_j| - 1 + |y_w,j|)); reads the record's policy_prompt_logps and
    prompt_lengths. The two differ by how likely the model finds the prompts: on the built-in task at initialization
    (its reference, the 4,000 training pairs of seed 0) the prompt's 2 predicted tokens cost 6.77 nats each, so this
    NLL is 3.89 against the paper's 3.25, 0.64 nats higher (the same on a batch of 32). lambda weighs a loss term and
    does not scale a reward, so it is named lam, not beta (TRL calls it beta), and reward_scale is 1.
    Deviation: avg(y) is clamped at -1e-6 in the odds, so a completion of probability 1 gives finite odds.
    """
    avg_w = _avg(lp.policy_chosen_logps, lp.chosen_lengths)  # (B,)
    avg_l = _avg(lp.policy_rejected_logps, lp.rejected_lengths)
    a_w, a_l = avg_w.clamp(max=-1e-6), avg_l.clamp(max=-1e-6)
    log_odds_ratio = (a_w - a_l) - (_log1m_exp(a_w) - _log1m_exp(a_l))
    return _orpo_nll(lp, nll) - lam * F.logsigmoid(log_odds_ratio)


def _orpo_nll(lp: PairLogps, nll: str) -> Tensor:
    if nll == "completion":
        return -_avg(lp.policy_chosen_logps, lp.chosen_lengths)
    if lp.policy_prompt_logps is None or lp.prompt_lengths is None:
        raise ValueError("orpo with nll=prompt_and_completion needs policy_prompt_logps and prompt_lengths")
    tokens_per_pair = (lp.prompt_lengths + lp.chosen_lengths).sum().clamp(min=1) / lp.chosen_lengths.numel()
    return -(lp.policy_prompt_logps + lp.policy_chosen_logps) / tokens_per_pair


ORPO_PROMPT_FIELDS = frozenset({"policy_prompt_logps", "prompt_lengths"})
orpo.reads = lambda params: (BASE_FIELDS[True] | option_reads(params, False)  # type: ignore[attr-defined]
                             | (ORPO_PROMPT_FIELDS if params["nll"] == "prompt_and_completion" else frozenset()))


@register(
    "cpo",
    paper="Xu et al. 2024, 'Contrastive Preference Optimization', arXiv 2401.08417",
    formula="L(beta (logp(y_w) - logp(y_l))) + alpha NLL(y_w); NLL summed (paper) or token mean (nll=token_mean)",
    needs_reference=False,
    aggregation="sum (preference term); NLL: sum (paper) or token mean",
    reward="beta * logp(y) (DPO's reward with a uniform reference)",
)
def cpo(
    lp: PairLogps, *, beta: Positive = 0.1, alpha: NonNegative = 1.0, nll: Literal["sum", "token_mean"] = "sum"
) -> Tensor:
    """Contrastive Preference Optimization: reference-free DPO plus a behaviour-cloning NLL on the chosen response.

    The paper writes the NLL as -log pi(y_w|x), a summed sequence NLL: the default. TRL's CPO trainer (used by the
    authors' code) takes the token-mean cross-entropy over the batch's chosen tokens: nll=token_mean.
    """
    nll_term = chosen_nll(lp, "sum" if nll == "sum" else "batch_mean")  # (B,)
    return -F.logsigmoid(beta * (lp.policy_chosen_logps - lp.policy_rejected_logps)) + alpha * nll_term


@register(
    "tpo",
    paper="Saeidi et al. 2024, 'Triple Preference Optimization: Achieving Better Alignment using a Single Step "
    "Optimization', arXiv 2405.16681 (L_TPO = L_pref + alpha L_BC on a gold response; TPO-L: length-normalized with a "
    "margin gamma)",
    formula="L(beta (logp(y_w) - logp(y_l)) - gamma) + alpha NLL(y_gold); length_normalize: avg in place of logp; NLL "
    "summed (paper) or token mean (nll=token_mean)",
    needs_reference=False,
    aggregation="sum, or mean with length_normalize (preference term); NLL: sum (paper) or token mean",
    reward="beta * logp(y) (no reference; TPO-L: beta * avg(y))",
    reads=frozenset({"policy_extra_logps", "extra_lengths"}),
)
def tpo(
    lp: PairLogps, *, beta: Positive = 0.1, alpha: NonNegative = 1.0, gamma: NonNegative = 0.0,
    length_normalize: bool = False, nll: Literal["sum", "token_mean"] = "sum",
) -> Tensor:
    """Triple Preference Optimization: reference-free DPO on (y_w, y_l) plus behaviour cloning of a gold response.

    Three responses per prompt, y_gold > y_w > y_l: the gold one is the data's further response (`data.extras`; on the
    built-in task the best of several reference samples by gold reward, `data.gold.extra_best_of`); with M further
    responses the NLL is their mean. The paper writes L_BC = -E log pi(y_gold|x), a summed sequence NLL: the default;
    the authors' code takes the token-mean cross-entropy over the batch's gold tokens: nll=token_mean. TPO-L
    (length_normalize, gamma > 0) compares length-averaged log-probs against a margin gamma, as SimPO does. The
    authors' script trains with beta 0.1, alpha 0.5. With alpha = 0, gamma = 0 and sums it is CPO without its NLL.
    """
    if length_normalize:
        margin = _avg_margin(lp)
    else:
        margin = lp.policy_chosen_logps - lp.policy_rejected_logps
    logps, lengths = lp.policy_extra_logps, lp.extra_lengths  # (B, M)
    if logps is None or lengths is None:
        raise ValueError("tpo reads the gold response's log-probs: further responses per prompt (data.extras)")
    if nll == "sum":
        bc = -logps.mean(-1)
    else:  # the mean of -logp over every gold token of the batch, spread over its pairs
        bc = -logps.mean(-1) * lengths.shape[0] / lengths.mean(-1).sum().clamp(min=1)
    return -F.logsigmoid(beta * margin - gamma) + alpha * bc


@register(
    "slic",
    paper="Zhao et al. 2023, 'SLiC-HF: Sequence Likelihood Calibration with Human Feedback', arXiv 2305.10425",
    formula="max(0, delta - logp(y_w) + logp(y_l)) + lambda NLL(y_w)",
    needs_reference=False,
    reward="logp(y) (no reference, no scale)",
    reward_scale=None,
)
def slic(lp: PairLogps, *, delta: Positive = 1.0, lam: NonNegative = 0.1) -> Tensor:
    """SLiC-HF: a rank-calibration hinge on summed log-probs plus a regularizer toward the SFT target.

    The paper regularizes with the NLL of the SFT target y_ref; on pair data the chosen response stands in for it.
    """
    calibration = torch.relu(delta - lp.policy_chosen_logps + lp.policy_rejected_logps)  # (B,)
    return calibration + lam * chosen_nll(lp, "sum")


@register(
    "sft",
    paper="supervised fine-tuning baseline (maximum likelihood on the chosen responses)",
    formula="NLL(y_w), token mean over the batch (token_mean=batch) or per pair (token_mean=pair)",
    needs_reference=False,
    aggregation="mean",
    reward="none (no preference term)",
    reward_scale=None,
)
def sft(lp: PairLogps, *, token_mean: Literal["batch", "pair"] = "batch") -> Tensor:
    """Negative log-likelihood of the chosen responses; the rejected ones are ignored.

    token_mean=batch: the per-pair values are -logp(y_w) * B / sum|y_w|, so their mean is the usual token-level
    mean sum(-logp(y_w)) / sum(|y_w|) of the (micro-)batch; token_mean=pair: each pair's own mean -logp(y_w)/|y_w|.
    """
    return chosen_nll(lp, "batch_mean" if token_mean == "batch" else "pair_mean")


@register(
    "simper",
    paper="Xiao et al. 2025, 'SimPER: A Minimalist Approach to Preference Alignment without Hyperparameters', "
    "arXiv 2502.00883 (the SimPER objective)",
    formula="-exp(avg(y_w)) + exp(avg(y_l)): the inverse perplexities of the two responses",
    needs_reference=False,
    aggregation="mean",
    reward="exp(avg(y)), the response's inverse perplexity (no reference, no scale)",
    reward_scale=None,
)
def simper(lp: PairLogps) -> Tensor:
    """SimPER: raise the chosen response's inverse perplexity and lower the rejected one's; no hyperparameters.

    Each term is bounded in (0, 1], so neither response's gradient can grow without limit (the paper relates the
    objective to the total variation distance). There is no finite optimum: it ends at p(y_w) -> 1, p(y_l) -> 0.
    """
    return -torch.exp(_avg(lp.policy_chosen_logps, lp.chosen_lengths)) + torch.exp(
        _avg(lp.policy_rejected_logps, lp.rejected_lengths))


@register(
    "ipo_ref_free",
    paper="IPO's squared loss (Azar et al. 2023, arXiv 2310.12036, Eq. 17) without a reference, on length-averaged "
    "log-probs, as TRL's CPO trainer has it (loss_type='ipo'; its NLL weight cpo_alpha is `alpha` here)",
    formula="(avg(y_w) - avg(y_l) - 1/(2 beta))^2 + alpha * token-mean NLL(y_w)",
    needs_reference=False,
    aggregation="mean",
    reward="avg(y) (no reference, no scale)",
    reward_scale=None,
)
def ipo_ref_free(lp: PairLogps, *, beta: Positive = 0.1, alpha: NonNegative = 0.0) -> Tensor:
    """Reference-free IPO: the average log-prob margin regressed onto 1/(2 beta) (beta plays IPO's tau).

    With the uniform distribution in the reference's place the IPO target becomes a margin of per-token log-probs,
    which is how TRL's CPO trainer computes it. That trainer also adds cpo_alpha (default 1) times the chosen
    response's token-mean NLL; here `alpha` defaults to 0, the squared loss alone, and alpha = 1 is TRL's setting.
    """
    margin = _avg_margin(lp)  # (B,)
    return (margin - 1 / (2 * beta)) ** 2 + alpha * chosen_nll(lp, "batch_mean")
