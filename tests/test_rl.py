"""The RL baseline's loss (prefopt/losses/rl.py): RLOO by hand, and a bandit trained by it lands on the KL-regularized
optimum pi_ref exp(R / beta) / Z."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.losses.rl import rloo

MU = torch.tensor([0.10, 0.20, 0.30, 0.25, 0.15], dtype=torch.float64)  # the reference
R = torch.tensor([0.0, 0.5, 1.0, -0.5, 1.5], dtype=torch.float64)  # the reward


def test_rloo_by_hand():
    """K = 3, beta 0.5: rewards (1, 2, 4), log-ratios (0, 2, -2) give r = (1, 1, 5); leave-one-out baselines (3, 3, 1);
    advantages (-2, -2, 4); the loss is -A * log pi; the gradient flows through log pi only."""
    policy = torch.tensor([[-1.0, -1.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -3.0, -1.0]])
    loss = rloo(policy, ref, torch.tensor([[1.0, 2.0, 4.0]]), beta=0.5)
    assert loss.tolist() == [[-2.0, -2.0, 12.0]]
    loss.sum().backward()
    assert policy.grad.tolist() == [[2.0, 2.0, -4.0]]
    with pytest.raises(ValueError, match="at least 2"):
        rloo(policy[:, :1], ref[:, :1], torch.ones(1, 1), beta=0.5)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_a_bandit_trained_by_rloo_lands_on_the_kl_regularized_optimum(beta):
    """One prompt, five arms, the policy softmax(theta) started at the reference: 64 prompts x 4 samples a step, Adam
    with a decaying learning rate; the last policy is within total variation 0.005 of pi_ref exp(R / beta) / Z."""
    torch.manual_seed(0)
    target = torch.softmax(MU.log() + R / beta, -1)
    theta = MU.log().clone().requires_grad_(True)
    steps = 1500
    opt = torch.optim.Adam([theta], lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        logp = torch.log_softmax(theta, -1)
        arms = torch.multinomial(logp.detach().exp(), 64 * 4, replacement=True, generator=g).view(64, 4)
        loss = rloo(logp[arms], MU.log()[arms], R[arms], beta=beta).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    policy = torch.softmax(theta.detach(), -1)
    tv = 0.5 * (policy - target).abs().sum().item()
    assert tv < 0.005, (policy, target)  # (the issue asks 0.02; it lands within 1e-4 at both betas)
    assert 0.5 * (MU - target).abs().sum().item() > 0.1  # the optimum is far from where training started
