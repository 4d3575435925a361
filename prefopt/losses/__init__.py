"""Preference losses: pure functions of log-prob records, registered with their metadata.

Importing this package registers every loss; `LOSSES` maps each name to its `LossSpec`.
"""

from prefopt.losses import paired  # noqa: F401  (registers the losses)
from prefopt.losses.registry import LOSSES, LossConfig, LossSpec, loss_names, register

__all__ = ["LOSSES", "LossConfig", "LossSpec", "loss_names", "register"]
