"""The shipped path, as a user runs it: configs/base.yaml, the shipped experiment and grid files, sizes shrunk only.

The end-to-end commands run as subprocesses (`python -m prefopt ...`) in a temporary folder, so the runs they write
to the base config's relative `runs/` stay out of the checkout; the rest call the CLI in-process, some on the micro
model (tests/micro_fixtures.py) where only the mechanism is tested. What a test changes besides sizes is said where
it does. The README's own commands are run as written by tests/test_readme.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
DPO = str(ROOT / "experiments" / "dpo.yaml")
GRID = str(ROOT / "experiments" / "grids" / "default.yaml")
STEPS = 60  # base.yaml checkpoints every 50 steps: a kill after step 50 resumes mid-run, before the last validation


def prefopt(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "prefopt", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefopt", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the process ended before the condition held"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_a_killed_default_fit_resumes_from_its_mid_run_checkpoint_to_the_same_metrics(gold_reference_dir, tmp_path):
    """kill -9 after the step-50 checkpoint, resume with --ckpt_path: the same final metrics as one run (1e-6)."""
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    out = prefopt("fit", "--config", DPO, f"--trainer.max_steps={STEPS}", cwd=tmp_path / "full")
    assert f"final metrics at step {STEPS}:" in out.stdout and "val/gold/gold_reward" in out.stdout
    full = json.loads((tmp_path / "full" / "runs" / "dpo_seed0" / "version_0" / "metrics.json").read_text())
    assert full["finished"] and [h["step"] for h in full["history"]] == [STEPS], "a last validation, off-interval"
    finished = tmp_path / "full" / "runs" / "dpo_seed0" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt_step(finished) == STEPS, "last.ckpt holds the final step, off the every-50 interval too"

    run = tmp_path / "killed" / "runs" / "dpo_seed0" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    process = start("fit", "--config", DPO, f"--trainer.max_steps={STEPS}", cwd=tmp_path / "killed")
    wait_for(last.is_file, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert ckpt_step(last) == 50, "a checkpoint from mid-run"
    assert not json.loads((run / "metrics.json").read_text())["finished"] if (run / "metrics.json").exists() else True
    prefopt("fit", "--config", DPO, f"--trainer.max_steps={STEPS}", f"--ckpt_path={last}", cwd=tmp_path / "killed")
    resumed = json.loads((run.parent / "version_1" / "metrics.json").read_text())
    assert resumed["finished"] and resumed["step"] == full["step"] == STEPS
    assert set(resumed["final"]) == set(full["final"])
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_a_killed_shipped_grid_continues_its_unfinished_runs_from_their_checkpoints(gold_reference_dir, tmp_path):
    """The shipped grid file with the shipped base (no setting replaced): kill -9 mid-run, rerun, runs resume.

    250 steps, not STEPS: the kill waits for both runs' first checkpoint (step 50), and at 60 steps the run that
    started first could finish in the seconds the other took to reach it (then nothing of it was left to resume)."""
    steps_total = 250
    out = tmp_path / "results"
    args = ("grid", "--config", GRID, "--runs", "dpo_beta0.5_seed0,ipo_beta1_seed0", "--set",
            f"trainer.max_steps={steps_total}", "--workers", "2", "--out", str(out))
    names = ("dpo_beta0.5_seed0", "ipo_beta1_seed0")
    lasts = [out / "runs" / name / "checkpoints" / "last.ckpt" for name in names]
    process = start(*args, cwd=tmp_path)
    wait_for(lambda: all(p.is_file() for p in lasts), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(1.0)  # the runs die with the grid (PR_SET_PDEATHSIG)
    steps = {name: ckpt_step(p) for name, p in zip(names, lasts)}
    assert all(0 < s < steps_total for s in steps.values()), steps

    result = prefopt(*args, cwd=tmp_path)
    assert "finished: 2 ok, 0 failed" in result.stderr
    for name in names:
        spec = json.loads((out / "runs" / name / "run.json").read_text())
        metrics = json.loads((out / "runs" / name / "metrics.json").read_text())
        assert spec["resumed_from_step"] == steps[name], "continued from the checkpoint's step, not from 0"
        assert metrics["finished"] and metrics["step"] == steps_total and "val/gold/gold_reward" in metrics["final"]
    import pandas as pd

    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["status"]) == {"ok"} and runs["val/gold/sampled_kl"].notna().all()


def test_a_bad_data_file_fails_in_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    from prefopt.cli import main

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    runs = tmp_path / "runs"  # the base's relative runs/, made absolute: the tests share one working folder
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DPO, f"--data.dataset={bad}", f"--trainer.logger.init_args.save_dir={runs}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl" in err and "rejected" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"], "no runs/ folder left behind"


# ---------------------------------------------------------------------------------------------- in-process, parse only
def _print_config(capsys, *args: str) -> dict:
    import yaml

    from prefopt.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DPO, *args, "--print_config"])
    assert not exit_.value.code
    return yaml.safe_load(capsys.readouterr().out)


def test_dotted_loss_keys_update_the_loss_on_the_command_line(capsys):
    loss = _print_config(capsys, "--model.loss.beta=0.5")["model"]["loss"]
    assert loss["name"] == "dpo" and loss["beta"] == 0.5 and loss["label_smoothing"] == 0.0
    loss = _print_config(capsys, "--model.loss.label_smoothing", "0.1", "--model.loss.beta=2")["model"]["loss"]
    assert (loss["beta"], loss["label_smoothing"]) == (2.0, 0.1)
    loss = _print_config(capsys, "--model.loss.name=ipo")["model"]["loss"]
    assert loss["name"] == "ipo" and "label_smoothing" not in loss, "a new loss starts from its own defaults"
    loss = _print_config(capsys, "--model.loss.beta=0.5", "--model.loss={name: kto}")["model"]["loss"]
    assert loss["name"] == "kto" and loss["beta"] == 0.1, "a later whole loss wins"


def test_a_bad_dotted_loss_key_fails_at_parse_time(capsys):
    from prefopt.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DPO, "--model.loss.bta=0.5", "--print_config"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: --model.loss: loss 'dpo' has no hyperparameter bta" in err and len(err.splitlines()) <= 3


@pytest.mark.parametrize(("dataset", "model", "online", "expected"), [
    ("gold", "gold", None, "dpo_beta0.5_seed3"),
    ("data/my_pairs.jsonl", "gold", None, "my_pairs_dpo_beta0.5_seed3"),
    ("trl-lib/ultrafeedback_binarized", "Qwen/Qwen2.5-0.5B", None,
     "ultrafeedback_binarized_Qwen2.5-0.5B_dpo_beta0.5_seed3"),
    ("gold", "gold", {"pairs_per_round": 512}, "online_dpo_beta0.5_seed3"),  # on-policy pairs, the gold labeler
    ("gold", "gold", {"reward": "reward_model"}, "online_reward_model_dpo_beta0.5_seed3"),
    ("data/my_pairs.jsonl", "gold", {"reward": "rms/my_rm/"}, "my_pairs_online_my_rm_dpo_beta0.5_seed3"),
])
def test_run_names_tell_own_data_and_models_apart(dataset, model, online, expected):
    from prefopt.cli import run_name
    from prefopt.losses import LossConfig

    assert run_name(LossConfig("dpo", beta=0.5), 3, dataset, model, online) == expected


def test_the_tests_do_not_write_into_the_checkout():
    assert Path.cwd().resolve() != ROOT and ROOT not in Path.cwd().resolve().parents


def test_the_progress_bar_draws_only_on_a_terminal(monkeypatch):
    from prefopt.train.callbacks import ProgressBar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert ProgressBar().is_disabled
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert ProgressBar().is_enabled


def test_enable_progress_bar_false_beside_the_base_configs_bar_trains(micro_base_with_bar):
    """Lightning refuses a progress-bar callback beside enable_progress_bar=false; the CLI lets the flag win."""
    from prefopt.cli import main

    cli = main(["fit", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 4 and cli.trainer.progress_bar_callback is None


@pytest.fixture()
def micro_base_with_bar(micro_base):
    # The micro base (tests/micro_fixtures.py) with the shipped base's progress-bar callback added.
    import yaml

    config = yaml.safe_load(micro_base.read_text())
    config["trainer"].pop("enable_progress_bar")
    config["trainer"]["callbacks"].append({"class_path": "prefopt.train.callbacks.ProgressBar"})
    micro_base.write_text(yaml.safe_dump(config))
    return micro_base


@pytest.mark.parametrize("args", [["--model.scoring.share_prompt=true"], ["--model.scoring.share_prompt=false"],
                                  ["--model.loss={name: kto}"]])
def test_pairs_per_second_counts_pairs_in_every_layout(micro_base, args):
    """Prompt-shared rows (one per pair), two rows per pair, and unpaired rows (two per pair): the same count."""
    from prefopt.train.callbacks import MetricsJson
    from prefopt.cli import main

    cli = main(["fit", "--trainer.max_steps=3", *args])
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, MetricsJson))
    assert writer.pairs == 3 * 4, "3 steps of batch 4 pairs"
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["train_pairs_per_s"] == pytest.approx(writer.pairs / writer.train_time)


def test_hparams_carry_the_loss_and_the_optimizer(micro_base):
    import yaml

    from prefopt.cli import main

    cli = main(["fit", "--trainer.max_steps=1", "--model.loss.beta=0.3"])
    hparams = yaml.safe_load((Path(cli.trainer.log_dir) / "hparams.yaml").read_text())
    assert hparams["loss"]["name"] == "dpo" and hparams["loss"]["beta"] == 0.3
    assert hparams["optimizer"]["class_path"] == "torch.optim.AdamW"  # the CLI records the optimizer's config
    assert hparams["optimizer"]["init_args"]["lr"] == 1e-3


def test_tensorboard_steps_match_metrics_json(micro_base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prefopt.cli import main

    cli = main(["fit", "--trainer.max_steps=5"])  # validates at 2 and 4 (micro base), and at the last step, 5
    log_dir = Path(cli.trainer.log_dir)
    history = [h["step"] for h in json.loads((log_dir / "metrics.json").read_text())["history"]]
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert history == [2, 4, 5]
    assert [e.step for e in events.Scalars("val/accuracy")] == history


def test_a_run_shorter_than_the_validation_interval_still_ends_with_final_metrics(micro_base):
    from prefopt.cli import main

    cli = main(["fit", "--trainer.max_steps=1"])  # the micro base validates every 2 steps
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["finished"] and metrics["step"] == 1 and "val/accuracy" in metrics["final"]
    assert [h["step"] for h in metrics["history"]] == [1]
