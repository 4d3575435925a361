"""The benchmark's step clock as a Lightning callback (a module of its own, so that the CLI can name it)."""

from __future__ import annotations

import lightning as L

from contenders import Window


class Clock(L.Callback):
    def __init__(self, warmup: int = 3, steps: int = 10) -> None:
        self.warmup, self.steps = warmup, steps
        self.window: Window | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        keys = ("prompt_ids", "chosen_ids", "rejected_ids")
        examples = [{k: e[k] for k in keys} for e in trainer.datamodule.train_examples]
        self.window = Window(self.warmup, examples, self.steps, cuda=pl_module.device.type == "cuda")
        self.window.attach(pl_module.policy, "policy")
        self.window.attach(pl_module.reference, "reference")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.window.step_end()
