"""In-process fits for the tests of training stages: a checkpoint every step, a fit's metrics, a checkpoint's policy."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prefopt.cli import main

EVERY_STEP = ("--trainer.callbacks+={class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
              "init_args: {every_n_train_steps: 1, save_top_k: -1, dirpath: %s}}")  # % the checkpoints' folder


def fit(*args: str) -> tuple[object, dict]:
    """`python -m prefopt fit ARGS` in this process: the CLI object and the run's metrics.json."""
    cli = main(["fit", *args])
    return cli, json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


def policy_weights(path: Path) -> dict[str, torch.Tensor]:
    """The policy's weights in a checkpoint, by the policy's own parameter names."""
    state = torch.load(path, weights_only=False)["state_dict"]
    return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}


def longer_wins(prompts: list[str], responses: list[str]) -> list[float]:
    """A user reward function (`data.online.reward: run_helpers:longer_wins`): the response's word count."""
    return [float(len(r.split())) for r in responses]
