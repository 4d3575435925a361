"""One run on several processes: DDP (gloo, CPU) and gradient accumulation reproduce the single-process run.

A step's global batch is the same set of pairs however it is split (prefopt's sampler is rank-aware), DDP averages
gradients over ranks, and Lightning scales accumulated losses, so the trajectories must agree to float tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)

from prefopt.cli import main

TESTS = Path(__file__).resolve().parent
RECORD = "--trainer.callbacks+=recorders.LossTrajectory"


def _trajectory(path: Path) -> list[float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in rows]


def _final(log_root: Path, version_dir: str | None = None) -> dict:
    files = sorted(log_root.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text())["final"]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(micro_base, tmp_path, monkeypatch):
    single = tmp_path / "single.jsonl"
    monkeypatch.setenv("LOSS_TRAJECTORY", str(single))
    cli = main(["fit", "--data.batch_size=4", "--trainer.max_steps=6", RECORD])
    expected = _trajectory(single)
    expected_final = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())["final"]

    ddp = tmp_path / "ddp.jsonl"
    env = dict(os.environ, LOSS_TRAJECTORY=str(ddp), PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    args = ["fit", "--data.batch_size=2", "--trainer.max_steps=6", "--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.strategy=ddp", RECORD, f"--trainer.logger.init_args.save_dir={tmp_path / 'ddp_runs'}"]
    done = subprocess.run([sys.executable, "-m", "prefopt", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = _trajectory(ddp)
    assert len(got) == len(expected) == 6
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    got_final = _final(tmp_path / "ddp_runs")
    for key in ("val/loss", "val/margin_nats", "val/kl_per_token", "val/accuracy"):
        assert got_final[key] == pytest.approx(expected_final[key], rel=1e-4, abs=1e-6), key


def test_gradient_accumulation_matches_the_full_batch(micro_base, tmp_path, monkeypatch):
    full, halves = tmp_path / "full.jsonl", tmp_path / "halves.jsonl"
    monkeypatch.setenv("LOSS_TRAJECTORY", str(full))
    a = main(["fit", "--data.batch_size=4", "--trainer.max_steps=4", RECORD])
    monkeypatch.setenv("LOSS_TRAJECTORY", str(halves))
    b = main(["fit", "--data.batch_size=2", "--trainer.accumulate_grad_batches=2", "--trainer.max_steps=4", RECORD])
    full_losses, half_losses = _trajectory(full), _trajectory(halves)
    # The loss of a 4-pair batch is the mean of its two 2-pair halves' losses (every half has 2 pairs here: 18
    # training pairs give 4 full batches before the epoch's remainder). Lightning hands callbacks each half's loss
    # already divided by accumulate_grad_batches, so the two recorded halves add up to the full batch's loss.
    assert len(half_losses) == 2 * len(full_losses)
    paired = [half_losses[2 * i] + half_losses[2 * i + 1] for i in range(len(full_losses))]
    assert paired == pytest.approx(full_losses, rel=1e-5, abs=1e-6)
    for pa, pb in zip(a.model.policy.parameters(), b.model.policy.parameters()):
        assert (pa - pb).abs().max() < 1e-5


def test_kto_under_ddp_takes_its_reference_point_over_all_ranks(micro_base, tmp_path, monkeypatch):
    """KTO's z0 under 2 gloo processes: the mismatched rows of both ranks are gathered (a run, not a hang or crash)."""
    record = tmp_path / "kto.jsonl"
    env = dict(os.environ, LOSS_TRAJECTORY=str(record), PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    args = ["fit", "--model.loss={name: kto}", "--data.batch_size=2", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
            "--trainer.devices=2", "--trainer.strategy=ddp", RECORD, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    done = subprocess.run([sys.executable, "-m", "prefopt", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _trajectory(record)
    assert len(losses) == 2 and all(0 < x < 2 for x in losses)
