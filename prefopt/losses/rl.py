"""Policy-gradient losses with a KL penalty: the RL baseline that the preference losses are compared against.

Pure functions of K responses sampled per prompt from the current policy: their summed log-probs under the policy
(with gradient) and under the reference, and their rewards, each (B, K). They are not in the preference registry
(`prefopt.losses.registry`): they need samples of the policy being trained, not a fixed set of pairs.

RLOO (Ahmadian et al. 2024, 'Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
in LLMs', arXiv 2402.14740): the sequence-level reward with its KL penalty, r_i = R(x, y_i) - beta (log pi(y_i | x) -
log pi_ref(y_i | x)), is held constant; each response's baseline is the mean of the other K - 1 responses' r, so
the advantage is A_i = r_i - mean_{j != i} r_j = K / (K - 1) (r_i - mean_j r_j); the loss is -A_i log pi(y_i | x).
Its expected gradient is that of E_pi[R] - beta KL(pi || pi_ref) (the penalty's score-function term is exactly the
KL's gradient, since E_pi[grad log pi] = 0), whose maximizer is pi_ref exp(R / beta) / Z: on the built-in task, the
frontier point at b = beta (tests/test_rl.py trains a bandit to it).
"""

from __future__ import annotations

from torch import Tensor


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
