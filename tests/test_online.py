"""On-policy pairs (`data.online`, prefopt/train/online.py): the labels against the Bradley-Terry probability, each
round drawn from the policy as it was when the round began, resume mid-round, every loss kind, refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)
from run_helpers import EVERY_STEP, fit

from prefopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE, ONLINE = ROOT / "configs" / "base.yaml", ROOT / "experiments" / "online" / "online_dpo.yaml"
# The shipped files shrunk: 6 steps of 32 pairs, rounds of 64 pairs (2 steps each), one validation at the end.
SHRUNK = ("--trainer.max_steps=6", "--trainer.val_check_interval=6", "--data.online.pairs_per_round=64")


def _fit(*args: str) -> tuple[object, dict]:
    return fit(f"--config={BASE}", f"--config={ONLINE}", *args)


@pytest.mark.parametrize("flip", [0.0, 0.3])
def test_a_rounds_labels_follow_the_bradley_terry_probability(flip, gold_reference_dir):
    """4,000 pairs of reference samples: the share whose chosen response has the lower gold reward is, within 0.02,
    sum_i [(1 - eps) sigmoid(-|d_i| / T) + eps sigmoid(|d_i| / T)] / n over the pairs' reward differences d_i."""
    from prefopt.gold.build import load_reference
    from prefopt.gold.pairs import Labeler
    from prefopt.train.builtin import OnlinePairs
    from prefopt.train.online import Rounds

    model, tok = load_reference(gold_reference_dir)
    rounds = Rounds(OnlinePairs(pairs_per_round=4000), Labeler(temperature=1.0, label_flip=flip), seed=0)
    pairs = rounds.next_round(model, tok, max_length=32, scores=True)
    d = [p["chosen_score"] - p["rejected_score"] for p in pairs if p["chosen_score"] != p["rejected_score"]]
    inverted = sum(x < 0 for x in d) / len(d)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = sum((1 - flip) * sig(-abs(x)) + flip * sig(abs(x)) for x in d) / len(d)
    assert len(d) > 3000 and abs(inverted - expected) < 0.02
    assert rounds.labels_used == len(pairs) > 3900 and rounds.samples_drawn == 8000 and rounds.round == 1


def test_each_round_is_drawn_from_the_policy_as_it_was_when_the_round_began(gold_reference_dir, tmp_path):
    """Round 2 (steps 3-4) holds exactly the pairs that the policy of step 2 gives from the round streams' state at step
    2; the reference is read live (the pairs change); the label budget is logged."""
    from prefopt.train.online import Rounds

    cli, metrics = _fit(*SHRUNK, EVERY_STEP % (tmp_path / "ckpts"))
    assert cli.model.scorer.live_reference and cli.datamodule.pairs_change
    final = metrics["final"]
    assert final["val/online/round"] == 3 and final["val/online/samples_drawn"] == 3 * 64 * 2
    assert 3 * 60 <= final["val/online/labels_used"] <= 3 * 64
    step = {s: torch.load(next((tmp_path / "ckpts").glob(f"*step={s}.ckpt")), weights_only=False) for s in (2, 3)}
    at2, at3 = (step[s]["PreferenceDataModule"]["online"] for s in (2, 3))  # (Lightning keys it by the class)
    assert at2["round"] == 1 and at3["round"] == 2 and at2["examples"] != at3["examples"]
    policy = cli.model.policy
    policy.load_state_dict({k.removeprefix("policy."): v for k, v in step[2]["state_dict"].items()
                            if k.startswith("policy.")})
    rounds = Rounds(cli.datamodule.online, cli.datamodule.rounds.labeler, seed=0)
    rounds.load_state_dict(at2)
    assert rounds.next_round(policy, cli.datamodule.tokenizer, 32) == at3["examples"]


def test_a_run_resumed_mid_round_ends_like_an_uninterrupted_one(gold_reference_dir, tmp_path):
    _, full = _fit(*SHRUNK, EVERY_STEP % (tmp_path / "ckpts"))
    step3 = next((tmp_path / "ckpts").glob("*step=3.ckpt"))  # mid-round: round 2 is steps 3-4
    _, resumed = _fit(*SHRUNK, f"--ckpt_path={step3}")
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_an_unpaired_loss_trains_on_the_rounds_pairs_unchanged(gold_reference_dir):
    """KTO reads the round's pairs as rows (chosen desirable, rejected undesirable), as it does offline pairs."""
    cli, metrics = _fit(*SHRUNK, "--model.loss={name: kto}", "--trainer.max_steps=4", "--trainer.val_check_interval=4")
    assert cli.model.loss.name == "kto" and metrics["final"]["val/online/round"] == 2


def test_online_pairs_refuse_what_they_cannot_do(micro_base, gold_reference_dir, capsys):
    """The gold reward on other data than the built-in task's, and no reload per epoch, stop with one line saying
    what to set."""
    from prefopt.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", "--data.online={pairs_per_round: 8}", "--trainer.reload_dataloaders_every_n_epochs=1"])
    assert "(the gold reward is the built-in task's): set data.online.reward" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", f"--config={BASE}", "--data.online={pairs_per_round: 8}", "--trainer.max_steps=2"])
    assert "set trainer.reload_dataloaders_every_n_epochs: 1" in capsys.readouterr().err


def test_a_round_trains_epochs_per_round_epochs(gold_reference_dir):
    """epochs_per_round 2: rounds of 64 pairs (2 steps an epoch) are drawn every other epoch, 4 steps each."""
    cli, metrics = _fit(*SHRUNK, "--data.online.epochs_per_round=2", "--trainer.max_steps=8",
                        "--trainer.val_check_interval=8")
    assert metrics["final"]["val/online/round"] == 2 and cli.datamodule.rounds.epoch == 2
    assert metrics["final"]["val/online/samples_drawn"] == 2 * 64 * 2


def test_the_shipped_iterative_dpo_file_resets_the_reference_as_each_round_begins(gold_reference_dir, tmp_path):
    """experiments/online/iterative_dpo.yaml shrunk to rounds of 64 pairs (2 steps), so the reset's period shrinks to
    2 with them: the reference after the run is the policy of step 4, when round 3 was drawn."""
    from run_helpers import EVERY_STEP, policy_weights

    path = ROOT / "experiments" / "online" / "iterative_dpo.yaml"
    cli, metrics = fit(f"--config={BASE}", f"--config={path}", *SHRUNK, "--model.reference_update.every=2",
                       EVERY_STEP % (tmp_path / "ckpts"))
    assert metrics["final"]["val/online/round"] == 3 and cli.model._moved_at == 4
    step4 = policy_weights(next((tmp_path / "ckpts").glob("*step=4.ckpt")))
    for name, weight in cli.model.reference.named_parameters():
        torch.testing.assert_close(weight, step4[name], rtol=0, atol=0)
