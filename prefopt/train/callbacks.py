"""Callbacks of a run: `metrics.json` beside the resolved `config.yaml`, and a progress bar for terminals.

Results are files and tables are derived from them: the grid runner and `report` read `metrics.json`, never
TensorBoard events.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from prefopt.files import write_json

# Keys the loggers read as the x-axis, not as metrics.
NOT_METRICS = ("step", "epoch")


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and key not in NOT_METRICS:
            out[key] = float(value)
    return out


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, drawn only when stderr is a terminal: a log file (a grid's run, `nohup`) gets no bar.

    So no setting has to turn it off for non-interactive runs (a forced `enable_progress_bar=false` beside a
    progress-bar callback is an error in Lightning).
    """

    def __init__(self, refresh_rate: int = 10, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if not sys.stderr.isatty():
            self.disable()


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose last.ckpt (`save_last`) also holds the run's final step.

    Lightning writes last.ckpt at the end of training only if it never wrote one: a 60-step run checkpointing every
    50 steps ended with step 50's weights in last.ckpt, which `python -m prefopt export` then read as the trained
    policy. Here the end of training rewrites it whenever its last save was at an earlier step (before the module
    frees the optimizer state: callbacks' `on_train_end` runs first).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skipped if saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class MetricsJson(L.Callback):
    """Write `metrics.json` into the run's log directory after every validation and at the end of fit/validate.

    It holds the latest (`final`) validation metrics, the validation metrics at the best `monitor` value (`best`),
    the last training loss, the step, wall time and training throughput in pairs per second; `history` (the
    validation metrics of every validation, with their step, for curves), `data_hash` (a hash of the tokenized
    training and validation pairs) and `finished` (true only once fit has ended normally: the grid runner's test of
    a complete run).

    Every fit ends with a validation, so `final` always holds the metrics of the last step: when the last step is
    not a validation step (a run shorter than `val_check_interval`, or a step budget that is not a multiple of
    it), the trainer is told to stop at the start of that step, which is Lightning's own trigger for a last
    validation. Steps are optimizer steps done (`trainer.global_step`); validation metrics are logged at that step
    in TensorBoard too. The pair count behind `train_pairs_per_s` is the one each training step returns
    (`outputs["pairs"]`), whatever the batch layout.
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
            from prefopt.fast.reference_cache import examples_hash

            self.data_hash = examples_hash(datamodule.train_examples + datamodule.val_examples)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()
        if _is_last_step(trainer, batch_idx) and _validates(trainer):
            trainer.should_stop = True  # Lightning validates on a step at which the trainer stops

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_time += time.perf_counter() - self._step_start
        pairs = outputs.get("pairs") if isinstance(outputs, dict) else None
        if pairs is None:
            raise KeyError("MetricsJson counts pairs from the training step's output: return {'loss': ..., 'pairs': n}")
        self.pairs += int(pairs)

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
        }, path)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, finished=True)
        path = self._path(trainer)
        if path is not None and trainer.is_global_zero and trainer.state.fn == "fit":
            print(summary_table(_floats(trainer.callback_metrics), trainer.global_step, path), flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "pairs": self.pairs, "train_time": self.train_time, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.pairs, self.train_time = state["best"], state["pairs"], state["train_time"]
        self.history = list(state.get("history", []))  # absent in checkpoints written before it existed


def _is_last_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the optimizer step this batch completes is the fit's last (by max_steps, else by max_epochs)."""
    if trainer.accumulate_grad_batches > 1 and (batch_idx + 1) % trainer.accumulate_grad_batches:
        return False  # not the batch that steps the optimizer
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.global_step + 1 >= trainer.max_steps
    batches = trainer.num_training_batches
    last_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and isinstance(batches, int) and batch_idx + 1 >= batches


def _validates(trainer: L.Trainer) -> bool:
    """Whether this fit validates at all (a validation set and a nonzero limit)."""
    limit = trainer.limit_val_batches
    return bool(limit) and trainer.datamodule is not None and bool(getattr(trainer.datamodule, "val_examples", True))


SUMMARY = ("val/gold/gold_reward", "val/gold/sampled_kl", "val/gold/frontier_gap", "val/gold_heldout/gold_reward",
           "val/kl_per_token", "val/margin_nats", "val/accuracy", "val/loss", "train/loss")


def summary_table(metrics: dict[str, float], step: int, path: Path) -> str:
    """The end-of-fit lines: the main final metrics (those present), and where the results were written."""
    rows = [(k, v) for k, v in ((k, metrics.get(k)) for k in SUMMARY) if v is not None]
    width = max([len(k) for k, _ in rows], default=0)
    lines = [f"final metrics at step {step}:"] + [f"  {k:<{width}}  {v:.4f}" for k, v in rows]
    return "\n".join(lines + [f"written to {path.parent}/ (metrics.json, config.yaml, checkpoints/)"])
