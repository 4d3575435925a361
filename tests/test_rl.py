"""The RL baseline (prefopt/losses/rl.py): RLOO by hand, a bandit trained by it lands on the KL-regularized optimum
pi_ref exp(R / beta) / Z, and the shipped RL run (experiments/online/rloo_gold.yaml) trains on the policy's own
samples scored by the gold reward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from run_helpers import fit

from prefopt.cli import main
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


# ---------------------------------------------------------------- the RL step: RLOO on the policy's own samples
ROOT = Path(__file__).resolve().parents[1]
BASE, RLOO_GOLD = ROOT / "configs" / "base.yaml", ROOT / "experiments" / "online" / "rloo_gold.yaml"


def test_rloo_trains_on_the_policys_samples_scored_by_the_gold_reward(gold_reference_dir):
    """The shipped file, 20 of its 300 steps: a round per step of K = 4 responses to 32 prompts, their scores the gold
    rewards, no label spent; the gold reward rises from the reference's 0.38 (it reached 1.57 at 0.68 nats)."""
    from prefopt.gold import task

    cli, metrics = fit(f"--config={BASE}", f"--config={RLOO_GOLD}", "--trainer.max_steps=20",
                       "--trainer.val_check_interval=20")
    final, dm = metrics["final"], cli.datamodule
    assert final["val/online/round"] == 20 and final["val/online/labels_used"] == 0
    assert final["val/online/samples_drawn"] == final["val/online/reward_queries"] == 20 * 32 * 4
    examples = dm.rounds.examples
    assert len(examples) == 32 and all(len(e["extra_ids"]) == len(e["extra_scores"]) == 2 for e in examples)
    words = {i: w for w, i in dm.tokenizer.get_vocab().items()}
    topics = {tuple(dm.tokenizer(task.prompt_text(t))["input_ids"]): t for t in task.TRAIN_TOPICS}
    for e in examples:
        for ids, score in zip([e["chosen_ids"], e["rejected_ids"], *e["extra_ids"]],
                              [e["chosen_score"], e["rejected_score"], *e["extra_scores"]]):
            said = [words[i] for i in ids if i != dm.tokenizer.eos_token_id]
            assert score == task.gold_reward(topics[tuple(e["prompt_ids"])], said)
    assert final["val/gold/gold_reward"] > 1.0 and "val/loss" not in final  # no RLOO value on fixed pairs


def test_an_on_policy_loss_refuses_pairs_that_are_not_the_policys_own_samples(gold_reference_dir, capsys):
    """Offline pairs, rounds larger than a batch (stale samples) and no further responses: one line each."""
    with pytest.raises(SystemExit):
        main(["fit", f"--config={BASE}", "--model.loss={name: rloo}"])
    assert "trains on samples of the policy being trained: set data.online" in capsys.readouterr().err
    for option, says in (("--data.online.pairs_per_round=64", "64 prompts a round against data.batch_size 32"),
                         ("--data.online.responses_per_prompt=2", "set responses_per_prompt to 3 or more")):
        with pytest.raises(SystemExit):
            main(["fit", f"--config={BASE}", f"--config={RLOO_GOLD}", option, "--trainer.max_steps=2"])
        assert says in capsys.readouterr().err
