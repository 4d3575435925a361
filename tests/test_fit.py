"""End-to-end runs of the CLI on a micro model: every registered loss, resume, NaN guard, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from micro_fixtures import micro_base, micro_model, micro_pairs, poison_loss  # noqa: F401  (fixtures)

from prefopt.cli import main
from prefopt.losses import LOSSES, LossConfig

# An on-policy loss (RLOO) trains on the policy's own samples, never on fixed pairs: tests/test_online.py runs it.
LOSS_NAMES = sorted(name for name, spec in LOSSES.items() if not spec.on_policy)
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _fit(*args: str) -> tuple[object, dict]:
    cli = main(["fit", *args])
    log_dir = Path(cli.trainer.log_dir)
    return cli, json.loads((log_dir / "metrics.json").read_text())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_registered_loss_trains_end_to_end(name, micro_base):
    """Each loss with its shipped experiment config (experiments/<name>.yaml) where there is one, else defaults."""
    experiment = EXPERIMENTS / f"{name}.yaml"
    override = f"--config={experiment}" if experiment.exists() else f"--model.loss={{name: {name}}}"
    cli, metrics = _fit(override)
    assert cli.model.loss.name == name
    assert cli.trainer.global_step == 4
    assert metrics["train_loss"] is not None and torch.isfinite(torch.tensor(metrics["train_loss"]))
    final = metrics["final"]
    # The same reference-based metrics for every loss, reference-free and unpaired ones included.
    for key in ("val/margin_nats", "val/accuracy", "val/kl_per_token", "val/chosen_logps", "val/reward_margin"):
        assert key in final and torch.isfinite(torch.tensor(final[key])), key
    assert final["val/kl_per_token"] > 0, "the policy moved away from the reference"
    # The reference never trains and is not part of the checkpoint.
    assert all(not p.requires_grad for p in cli.model.reference.parameters())
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith(("policy.", "loss_state.")) for k in ckpt["state_dict"])


def test_a_scheduled_loss_sees_the_runs_progress(micro_base):
    """The module tells the loss state the optimizer steps done and the run's total before each step: DPO-Shift's
    linear schedule reads t = 3/4 at the last of 4 steps."""
    cli, _ = _fit('--model.loss={name: dpo_shift, schedule: increase_linear, f_lambda: 0.9, f_lambda_min: 0.5}')
    (state,) = cli.model.loss_state
    assert cli.trainer.global_step == 4 and state.progress == 0.75


def test_resumed_run_matches_uninterrupted_run(micro_base, tmp_path):
    """A run killed after step 4 and resumed from its step-4 checkpoint ends exactly like an uninterrupted run.

    The checkpoint is taken mid-epoch (18 training pairs, batch 4), so the data order must resume mid-epoch too.
    """
    every4 = "--trainer.callbacks+={class_path: lightning.pytorch.callbacks.ModelCheckpoint, " \
             "init_args: {every_n_train_steps: 4, save_top_k: -1, dirpath: %s}}"
    cli, full = _fit("--trainer.max_steps=8", every4 % (tmp_path / "ckpts"))
    step4 = next((tmp_path / "ckpts").glob("*step=4.ckpt"))
    _, resumed = _fit("--trainer.max_steps=8", f"--ckpt_path={step4}")
    assert resumed["step"] == full["step"] == 8
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)


def test_gradients_and_optimizer_state_are_freed_at_the_end_after_the_last_checkpoint(micro_base):
    """So that Lightning's teardown does not copy them to the host (7.5 GB at the end of a 0.5B GPU run)."""
    cli, _ = _fit()
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    moments = ckpt["optimizer_states"][0]["state"]
    assert moments and all(v["exp_avg"].abs().sum() > 0 for v in moments.values())  # the checkpoint kept Adam's
    assert all(p.grad is None for p in cli.model.policy.parameters())
    assert all(not optimizer.state for optimizer in cli.trainer.optimizers)


def test_non_finite_loss_stops_the_run_naming_the_step(micro_base, monkeypatch):
    poison_loss(monkeypatch, lambda call: call >= 3)
    with pytest.raises(FloatingPointError, match="training step 2"):
        main(["fit"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.loss={name: dpoo}", "valid names: .*dpo"),
        ("--model.loss={name: dpo, beta: -1}", "outside the valid range"),
        ("--model.loss={name: dpo, beta: 0}", "outside the valid range"),
        ("--model.loss={name: dpo, label_smoothing: 0.5}", "outside the valid range"),
        ("--model.loss={name: dpo, bta: 0.1}", "no hyperparameter bta"),
    ],
)
def test_bad_loss_config_fails_at_parse_time(override, message, micro_base, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr("prefopt.train.module.load_causal_lm", no_model)
    with pytest.raises(SystemExit) as exc:
        main(["fit", override, "--print_config"])
    assert exc.value.code != 0
    import re

    assert re.search(message, capsys.readouterr().err)


def test_cached_reference_logps_give_the_same_loss_as_a_live_reference(micro_base, tmp_path):
    """The reference cache changes no number: the scorer reads the table by example index and field name, and the
    record, the loss and the metrics equal a live reference's to 1e-6."""
    from prefopt.fast.reference_cache import load_or_compute
    from prefopt.train.data import PreferenceDataModule
    from prefopt.train.module import PreferenceModule

    module = PreferenceModule(model=_micro_model_path(micro_base), loss=LossConfig("dpo", beta=0.5, ld_alpha=0.5))
    module.configure_model()
    dm = PreferenceDataModule(dataset=_micro_data_path(micro_base), tokenizer=module.hparams.model, batch_size=4)
    dm.setup("fit")
    table, path, was_cached = load_or_compute(module.reference, dm.train_examples, dm.collate_pairs, tmp_path)
    assert not was_cached and path.is_file() and set(table) == {
        "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_shared_logps", "ref_rejected_shared_logps",
        "ref_chosen_sampled_logps", "ref_rejected_sampled_logps"}  # the sampled sums: SamPO's
    assert load_or_compute(module.reference, dm.train_examples, dm.collate_pairs, tmp_path)[2], "read from the file"
    batch = dm.collate_pairs(dm.train_examples[5:9])  # not the first rows: the index must select them
    assert batch["index"].tolist() == [5, 6, 7, 8] and module.scorer.live_reference
    live = module.scorer.score(module.policy, module.reference, batch)
    loss_live = module.training_step(batch, 0)["loss"]
    module.scorer.use_reference_table(table)
    assert not module.scorer.live_reference
    cached = module.scorer.score(module.policy, None, batch)  # no reference model needed
    produced = [name for name in table if getattr(live, name) is not None]  # dpo reads no down-sampled sums
    assert set(produced) >= {"ref_chosen_logps", "ref_rejected_logps", "ref_chosen_shared_logps"}
    for name in produced:
        torch.testing.assert_close(getattr(cached, name), getattr(live, name), rtol=0, atol=1e-5)
    assert abs(module.training_step(batch, 0)["loss"].item() - loss_live.item()) < 1e-6


def test_a_run_with_the_reference_cache_matches_one_without(micro_base):
    _, with_cache = _fit("--model.scoring.reference_cache=true")
    _, without = _fit("--model.scoring.reference_cache=false")
    for key, value in without["final"].items():
        assert with_cache["final"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _micro_model_path(base: Path) -> str:
    import yaml

    return yaml.safe_load(base.read_text())["model"]["model"]


def _micro_data_path(base: Path) -> str:
    import yaml

    return yaml.safe_load(base.read_text())["data"]["dataset"]
