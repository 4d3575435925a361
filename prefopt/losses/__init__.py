"""Preference losses: pure functions of log-prob records, registered with their metadata.

Importing this package registers every loss; `LOSSES` maps each name (aliases included) to its `LossSpec`.
The catalog, generated from the registry, is docs/losses.md (`python -m prefopt.losses.docs > docs/losses.md`).
"""

# Importing the loss modules registers their losses.
from prefopt.losses import (  # noqa: F401
    adaptive, composite, margin_functions, paired, per_response, reference_free, reshaped, rl, scored,
    token_level, unpaired,
)
from prefopt.losses.registry import LOSSES, LossConfig, LossSpec, loss_names, register

__all__ = ["LOSSES", "LossConfig", "LossSpec", "loss_names", "register"]
