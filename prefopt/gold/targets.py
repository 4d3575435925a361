"""Analytic targets: where a loss's population optimum lands on the gold task, with the labeler folded in.

With pairs of independent base samples (the reference, 0.02 nats from the base) and a policy free to take any form, a
loss that reads only the pair's log-ratio margin d = log pi/pi_ref(y_w) - log pi/pi_ref(y_l) is optimal at
pi* = pi_base exp(u) / Z, where u depends on a response only through what the labeler sees of it: its gold reward R
and, for a length-biased labeler, its length L. The expected loss over ordered pairs of such cells i, j (base
probabilities P_i, P_j; P(i labelled the winner) = p_ij, from `win_probability`) is

    J(u) = sum_ij P_i P_j [p_ij l(u_i - u_j) + (1 - p_ij) l(u_j - u_i)],

and the target is (KL(pi* || pi_base), E_pi*[R]). Two closed forms:
- DPO, l(d) = -log sigmoid(beta d), with clean Bradley-Terry labels at temperature T > 0: u = R / (T beta), the
  frontier point at b = T beta (Rafailov et al. 2023, arXiv 2305.18290, Eq. 4-5);
- IPO (summed log-probs), l(d) = (d - 1/(2 tau))^2: u_i = P(i > mu) / tau = sum_j P_j p_ij / tau for any labeler
  (Azar et al. 2023, arXiv 2310.12036, Eq. 7 and Prop. 4): a tilt by a win rate, not by R, so off the frontier.
Otherwise (flipped or length-biased labels, cDPO's smoothing, robust DPO) J is minimized numerically (Newton's
method in float64), which reproduces both closed forms (tests/test_gold_targets.py). No target is given where none exists:
deterministic labels for DPO (u unbounded), pairs that are not two independent base samples (near-duplicates,
narrowed coverage), losses that read more than the margin, IPO on length-averaged log-probs.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from prefopt.gold.task import compositions, frontier_point

# Labeler settings under which pairs are two independent base samples (the knobs a target can fold in), by their
# `data.gold` key, with their defaults; any other knob on (rejected_edits, excluded_words) means no target.
LABELER = {"label_temperature": 1.0, "label_flip": 0.0, "length_bias": 0.0}
UNFOLDED = {"rejected_edits": 0, "excluded_words": ()}
# Generic loss options that change what the loss reads (LD-DPO's prefix weighting, WPO's weights): a target only at
# these values.
NEUTRAL = {"ld_alpha": 1.0, "wpo": False}


@lru_cache(maxsize=2)
def cells(by_length: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, R, L) of the distinct gold rewards (and lengths, if `by_length`) of base responses, (n,) each; P sums to 1."""
    comp = compositions()
    key = np.stack([np.round(comp.reward, 9), comp.length if by_length else np.zeros_like(comp.length)], axis=1)
    unique, inverse = np.unique(key, axis=0, return_inverse=True)
    prob = np.bincount(inverse.ravel(), weights=np.exp(comp.log_prob), minlength=len(unique))
    return prob / prob.sum(), unique[:, 0], unique[:, 1]


def win_probability(reward: np.ndarray, length: np.ndarray, temperature: float = 1.0, label_flip: float = 0.0,
                    length_bias: float = 0.0) -> np.ndarray:
    """(n, n) P(cell i labelled the winner over cell j) under `prefopt.gold.pairs.Labeler`: Bradley-Terry at T (T = 0:
    the higher reward, ties 50/50); with probability length_bias the longer response when lengths differ; then the
    label flipped with probability label_flip."""
    diff = reward[:, None] - reward[None, :]
    if temperature > 0:
        p = 1.0 / (1.0 + np.exp(-diff / temperature))
    else:
        p = (diff > 0) + 0.5 * (diff == 0)
    longer = np.sign(length[:, None] - length[None, :])
    p = np.where(longer != 0, (1 - length_bias) * p + length_bias * (longer > 0), p)
    return (1 - label_flip) * p + label_flip * (1 - p)


def tilt_point(u: np.ndarray, prob: np.ndarray, reward: np.ndarray) -> tuple[float, float]:
    """(KL, E[R]) of q ∝ P exp(u) over the cells: the policy pi_base exp(u) / Z."""
    logits = np.log(prob) + u
    logq = logits - np.logaddexp.reduce(logits)
    q = np.exp(logq)
    return float(max(q @ (logq - np.log(prob)), 0.0)), float(q @ reward)


def minimize_pair_loss(loss, prob: np.ndarray, p: np.ndarray, max_steps: int = 100) -> np.ndarray | None:
    """u minimizing J (module docstring) for a margin loss `loss(d) -> per-pair loss` (torch, elementwise): Newton's
    method with a backtracking line search, float64, until the gradient is below 1e-12; None when J has no finite
    minimizer in reach (u runs away, or no descent)."""
    w, pt = torch.as_tensor(prob[:, None] * prob[None, :]), torch.as_tensor(p)
    total = lambda d: pt * loss(d) + (1 - pt) * loss(-d)  # noqa: E731  (per ordered pair, elementwise in d)
    u = torch.zeros(len(prob), dtype=torch.float64)
    gauge = torch.as_tensor(prob)[:, None] * torch.as_tensor(prob)[None, :]  # pins the constant J cannot see

    def value(v: torch.Tensor) -> float:
        return float((w * total(v[:, None] - v[None, :])).sum())

    for _ in range(max_steps):
        d = (u[:, None] - u[None, :]).requires_grad_(True)
        (first,) = torch.autograd.grad(total(d).sum(), d, create_graph=True)  # f'(d) per pair
        (second,) = torch.autograd.grad(first.sum(), d)  # f''(d) per pair
        g = ((w * first).sum(1) - (w * first).sum(0)).detach()
        if float(g.abs().max()) < 1e-12:
            break
        a = w * second.detach()
        a = a + a.T
        a.fill_diagonal_(0)
        hessian = torch.diag(a.sum(1)) - a
        step = torch.linalg.solve(hessian + gauge, -g)
        now, t = value(u), 1.0
        while value(u + t * step) > now + 1e-4 * t * float(g @ step) and t > 1e-10:
            t *= 0.5
        if t <= 1e-10:
            return None
        u = u + t * step
    out = u.numpy()
    out = out - prob @ out  # the gauge: u is defined up to a constant
    return out if np.all(np.isfinite(out)) and np.abs(out).max() < 100 else None


def margin_loss(name: str, params: dict[str, Any]):
    """The per-pair loss as a function of the margin d for the losses that read only it; None for any other.
    `name` is the registered name (not an alias: cdpo is dpo with label_smoothing)."""
    if any(key in params and params[key] != value for key, value in NEUTRAL.items()):
        return None
    beta = float(params.get("beta", 0.1))
    if name == "dpo" and params.get("f_divergence", "reverse_kl") == "reverse_kl":
        s = float(params.get("label_smoothing", 0.0))
        return lambda d: -(1 - s) * F.logsigmoid(beta * d) - s * F.logsigmoid(-beta * d)
    if name == "robust":
        eps = float(params.get("label_smoothing", 0.0))
        return lambda d: (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    if name == "ipo" and not params.get("average_log_probs", False):
        return lambda d: (d - 1 / (2 * beta)) ** 2
    return None


def target(name: str, params: dict[str, Any], data: dict[str, Any]) -> tuple[float, float, str] | None:
    """(target KL, target reward, how: "closed form" or "numeric") of loss `name` with hyperparameters `params` on
    the gold task with `data.gold` settings `data` (absent keys at their defaults); None where there is none."""
    settings = {key: data.get(key, default) for key, default in LABELER.items()}
    if any(_set(data.get(key), default) for key, default in UNFOLDED.items()):
        return None
    loss = margin_loss(name, params)
    if loss is None:
        return None
    t, flip, bias = (float(settings[k]) for k in LABELER)
    beta = float(params.get("beta", 0.1))
    clean = flip == 0 and bias == 0
    if name == "dpo" and clean and float(params.get("label_smoothing", 0.0)) == 0:
        return (*frontier_point(t * beta), "closed form") if t > 0 else None
    prob, reward, length = cells(by_length=bias > 0)
    p = win_probability(reward, length, t, flip, bias)
    if name == "ipo":
        return (*tilt_point(p @ prob / beta, prob, reward), "closed form")
    u = minimize_pair_loss(loss, prob, p)
    return None if u is None else (*tilt_point(u, prob, reward), "numeric")


def _set(value: Any, default: Any) -> bool:
    """Whether a knob read from a results table is on (NaN and empty lists count as unset)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if isinstance(value, str):
        return value not in ("", "[]", "0", "0.0", "()")
    if isinstance(value, (list, tuple)):
        return len(value) > 0
    return value != default
