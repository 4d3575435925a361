"""Callbacks that write each run's results as files: `metrics.json` beside the resolved `config.yaml`.

Results are files and tables are derived from them (shared/STYLE.md): the grid runner and `report` read
`metrics.json`, never TensorBoard events.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from prefopt.tables import write_json


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


class MetricsJson(L.Callback):
    """Write `metrics.json` into the run's log directory after every validation and at the end of fit/validate.

    It holds the latest (`final`) validation metrics, the validation metrics at the best `monitor` value (`best`),
    the last training loss, the step, wall time and training throughput in pairs per second; `history` (the
    validation metrics of every validation, with their step, for curves), `data_hash` (a hash of the tokenized
    training and validation pairs) and `finished` (true only once fit has ended normally: the grid runner's test of
    a complete run).
    """

    def __init__(self, monitor: str = "val/gold/gold_reward", mode: Literal["max", "min"] = "max") -> None:
        self.monitor, self.mode = monitor, mode
        self.best: dict[str, float] = {}
        self.start = time.perf_counter()
        self.train_time = 0.0
        self.pairs = 0
        self._step_start = 0.0
        self.history: list[dict[str, float]] = []
        self.data_hash: str | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()
        datamodule = trainer.datamodule
        if getattr(datamodule, "train_examples", None) and getattr(datamodule, "val_examples", None):
            from prefopt.reference_cache import examples_hash

            self.data_hash = examples_hash(datamodule.train_examples + datamodule.val_examples)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_time += time.perf_counter() - self._step_start
        self.pairs += batch["input_ids"].shape[0] // 2

    def _path(self, trainer: L.Trainer) -> Path | None:
        directory = trainer.log_dir or trainer.default_root_dir
        return None if directory is None else Path(directory) / "metrics.json"

    def _write(self, trainer: L.Trainer, finished: bool = False) -> None:
        path = self._path(trainer)
        if path is None or not trainer.is_global_zero:
            return
        metrics = _floats(trainer.callback_metrics)
        final = {k: v for k, v in metrics.items() if not k.startswith("train/")}
        value = final.get(self.monitor)
        if value is not None and math.isfinite(value):
            better = max if self.mode == "max" else min
            if not self.best or better(value, self.best[self.monitor]) == value:
                self.best = dict(final, step=float(trainer.global_step))
        if not finished and final and not any(h.get("step") == trainer.global_step for h in self.history):
            self.history.append(dict(final, step=float(trainer.global_step)))
        write_json({
            "final": final,
            "best": self.best,
            "monitor": self.monitor,
            "train_loss": metrics.get("train/loss"),
            "step": trainer.global_step,
            "wall_time_s": time.perf_counter() - self.start,
            "train_pairs_per_s": self.pairs / self.train_time if self.train_time > 0 else None,
            "history": self.history,
            "data_hash": self.data_hash,
            "finished": finished,
        }, path)  # fmt: skip

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, finished=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "pairs": self.pairs, "train_time": self.train_time, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.pairs, self.train_time = state["best"], state["pairs"], state["train_time"]
        self.history = list(state.get("history", []))  # absent in checkpoints written before it existed
