"""Test callbacks, importable by class_path from CLI runs (tests/ is on sys.path under pytest and is put on
PYTHONPATH for the subprocess runs)."""

from __future__ import annotations

import json
import os

import lightning as L


class LossTrajectory(L.Callback):
    """Append each training batch's loss, averaged over all ranks, to $LOSS_TRAJECTORY (rank 0 writes)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        if trainer.is_global_zero:
            with open(os.environ["LOSS_TRAJECTORY"], "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "batch": batch_idx, "loss": loss.item()}) + "\n")
