"""Policy-gradient losses with a KL penalty: the RL baseline that the preference losses are compared against.

RLOO (Ahmadian et al. 2024, 'Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
in LLMs', arXiv 2402.14740): the sequence-level reward with its KL penalty, r_i = R(x, y_i) - beta (log pi(y_i | x) -
log pi_ref(y_i | x)), is held constant; each response's baseline is the mean of the other K - 1 responses' r, so
the advantage is A_i = r_i - mean_{j != i} r_j = K / (K - 1) (r_i - mean_j r_j); the loss is -A_i log pi(y_i | x).
Its expected gradient is that of E_pi[R] - beta KL(pi || pi_ref) (the penalty's score-function term is exactly the
KL's gradient, since E_pi[grad log pi] = 0), whose maximizer is pi_ref exp(R / beta) / Z: on the built-in task, the
frontier point at b = beta (tests/test_rl.py trains a bandit to it).

`rloo` is the pure function of K responses per prompt, each (B, K); the registered loss `rloo` reads them off a record
of on-policy rounds (`data.online` with `responses_per_prompt: K`): the pair's two responses and the K - 2 further
ones, their rewards as the record's scores. It is registered `on_policy` (the estimator is unbiased only for samples
of the policy being trained: a round per optimizer step) and `labels=False` (it reads rewards, not preferences).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefopt.losses.registry import register
from prefopt.losses.schema import Positive
from prefopt.records import PairLogps


def penalized_rewards(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """r = R - beta (log pi - log pi_ref), per sampled response, without gradient. All (B, K)."""
    return (rewards - beta * (policy_logps - ref_logps)).detach()


def rloo(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, *, beta: float) -> Tensor:
    """RLOO's per-response loss -A_i log pi(y_i | x), (B, K), K >= 2 responses per prompt; see the module docstring."""
    k = policy_logps.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 responses per prompt for its leave-one-out baseline, got {k}")
    r = penalized_rewards(policy_logps, ref_logps, rewards, beta)
    advantage = r - (r.sum(-1, keepdim=True) - r) / (k - 1)
    return -advantage * policy_logps


@register(
    "rloo",
    paper="Ahmadian et al. 2024, 'Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human "
    "Feedback in LLMs', arXiv 2402.14740 (RLOO, Eq. 8, with the KL penalty in the sequence reward as its Sec. 2)",
    formula="mean_i -(r_i - mean_{j != i} r_j) log pi(y_i|x), r_i = R(x, y_i) - beta (logp_i - ref_logp_i), over the "
    "K sampled responses (detached r)",
    needs_reference=True,
    reads=("chosen_scores", "rejected_scores", "policy_extra_logps", "ref_extra_logps", "extra_scores"),
    labels=False,
    on_policy=True,
    options=False,
)
def rloo_loss(lp: PairLogps, *, beta: Positive = 0.1) -> Tensor:
    """RLOO on K responses sampled from the policy, with the reward R as their scores: the RL baseline.

    The K responses are the record's pair and its K - 2 further ones; which is called chosen does not matter. The
    per-prompt loss is the mean over the K responses, so the step size does not grow with K. Maximizes E[R] - beta
    KL(pi || pi_ref): the frontier point at b = beta when R is the task's gold reward.
    """
    if lp.policy_extra_logps is None or lp.ref_extra_logps is None or lp.extra_scores is None:
        raise ValueError("rloo reads further sampled responses per prompt (data.online.responses_per_prompt >= 3)")
    policy = torch.cat([torch.stack([lp.policy_chosen_logps, lp.policy_rejected_logps], -1), lp.policy_extra_logps], -1)
    ref = torch.cat([torch.stack([lp.ref_chosen_logps, lp.ref_rejected_logps], -1), lp.ref_extra_logps], -1)
    rewards = torch.cat([torch.stack([lp.chosen_scores, lp.rejected_scores], -1), lp.extra_scores], -1)
    return rloo(policy, ref, rewards, beta=beta).mean(-1)
