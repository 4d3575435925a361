"""SFT then preference in one run (`model.sft_steps`), the reference it resets, the weak start (`gold_weak`), and the
gold evaluation's KL axis, which stays the task's reference whatever the run's reference is (scenario S8)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)
from run_helpers import EVERY_STEP, fit, policy_weights


def test_the_sft_stage_is_the_sft_loss_and_the_reference_is_then_the_policy_at_that_step(micro_base, tmp_path):
    """4 steps with sft_steps 4 train exactly as the `sft` loss does; with sft_steps 2 the reference after the run holds
    the policy's weights at step 2 (the checkpoint of that step), and the remaining steps train DPO from there."""
    sft, _ = fit("--model.loss={name: sft}")
    staged, _ = fit("--model.sft_steps=4", "--model.loss={name: dpo, beta: 0.5}")
    for name, value in sft.model.policy.state_dict().items():
        torch.testing.assert_close(staged.model.policy.state_dict()[name], value, rtol=0, atol=0)

    # a warmup longer than the SFT stage (the micro config has none), to see the preference stage warm up again
    cli, _ = fit("--model.sft_steps=2", "--model.loss={name: dpo, beta: 0.5}", EVERY_STEP % (tmp_path / "ckpts"),
                  "--model.warmup_steps=3")
    at2 = policy_weights(next((tmp_path / "ckpts").glob("*step=2.ckpt")))
    reference = cli.model.reference.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in at2.items())
    assert not all(torch.equal(cli.model.policy.state_dict()[k], v) for k, v in at2.items()), "DPO trained after"
    assert all(not p.requires_grad for p in cli.model.reference.parameters())
    # The preference stage started with a fresh optimizer (Adam's count restarted at the switch) and warmed up again.
    adam = torch.load(next((tmp_path / "ckpts").glob("*step=4.ckpt")), weights_only=False)["optimizer_states"][0]
    assert {int(state["step"]) for state in adam["state"].values()} == {2}  # steps 3 and 4 only
    factor = cli.trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert [factor(s) for s in (0, 1, 2, 3, 4, 5)] == [1 / 3, 2 / 3, 1 / 3, 2 / 3, 1, 1]


def test_a_run_resumed_after_the_reset_restores_its_reference_and_ends_like_an_uninterrupted_one(micro_base, tmp_path):
    """The reset reference cannot be reloaded from its source: the checkpoint carries it."""
    _, full = fit("--model.sft_steps=2", "--model.loss={name: dpo, beta: 0.5}", EVERY_STEP % (tmp_path / "ckpts"))
    step3 = next((tmp_path / "ckpts").glob("*step=3.ckpt"))
    assert "reference_state_dict" in torch.load(step3, weights_only=False)
    assert "reference_state_dict" not in torch.load(next((tmp_path / "ckpts").glob("*step=1.ckpt")), weights_only=False)
    _, resumed = fit("--model.sft_steps=2", "--model.loss={name: dpo, beta: 0.5}", f"--ckpt_path={step3}")
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("args, message", [
    ({"lora": {"r": 4}}, "no model.lora"),
    ({"loss": "kto"}, "a paired loss"),
    ({"sft_steps": -1}, "sft_steps must be >= 0"),
])
def test_sft_steps_refuses_what_it_cannot_reset(args, message):
    from prefopt.losses import LossConfig
    from prefopt.train.lora import LoraOptions
    from prefopt.train.module import PreferenceModule

    kwargs = {"sft_steps": 2, **args}
    kwargs["loss"] = LossConfig(kwargs.get("loss", "dpo"))
    if "lora" in kwargs:
        kwargs["lora"] = LoraOptions(**kwargs["lora"])
    with pytest.raises(ValueError, match=message):
        PreferenceModule(**kwargs)


def test_the_weak_start_is_the_references_sft_stopped_early(gold_reference_dir):
    """`gold_weak` resolves to a model further from the base than the reference (KL(base || model) from its build)."""
    from prefopt.gold.build import REFERENCE_META, WEAK_RECIPE, ReferenceRecipe
    from prefopt.train.models import resolve

    weak = Path(resolve("gold_weak"))
    meta, ref = (json.loads((d / REFERENCE_META).read_text()) for d in (weak, gold_reference_dir))
    assert meta["recipe"] == {**ref["recipe"], "steps": WEAK_RECIPE.steps} and WEAK_RECIPE.steps < ReferenceRecipe().steps
    assert meta["kl_base_ref"] > 0.3 > 0.05 > ref["kl_base_ref"]
    assert (weak / "tokenizer.json").read_text() == (gold_reference_dir / "tokenizer.json").read_text()


def test_the_gold_evaluation_measures_kl_from_the_tasks_reference_not_the_runs(gold_reference_dir):
    """A run whose own reference moved (here: a perturbed copy) is still measured on the frontier's axis: the logged
    sampled KL is the one from the task's reference, in the policy's dtype."""
    from prefopt.gold import task
    from prefopt.gold.build import load_reference
    from prefopt.gold.evaluation import GoldTaskEvaluation, evaluate_policy

    anchor, tok = load_reference(gold_reference_dir)
    policy, moved = (load_reference(gold_reference_dir)[0] for _ in range(2))
    with torch.no_grad():
        for model, seed in ((policy, 1), (moved, 2)):
            g = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    logged: dict[str, float] = {}
    module = SimpleNamespace(policy=policy, reference=moved, log=lambda k, v, **_: logged.__setitem__(k, v))
    trainer = SimpleNamespace(sanity_checking=False, datamodule=SimpleNamespace(tokenizer=tok))
    GoldTaskEvaluation(num_samples=64, seed=3).on_validation_epoch_end(trainer, module)
    right = evaluate_policy(policy, anchor, tok, task.TRAIN_TOPICS, num_samples=64, seed=3)
    wrong = evaluate_policy(policy, moved, tok, task.TRAIN_TOPICS, num_samples=64, seed=3)
    assert logged["val/gold/sampled_kl"] == right["sampled_kl"] != wrong["sampled_kl"]
