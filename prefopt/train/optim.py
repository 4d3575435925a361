"""The optimizer's defaults and description, and the learning-rate schedule (`PreferenceModule.configure_optimizers`)."""

from __future__ import annotations

import functools
import math

import torch


def adamw(params) -> torch.optim.Optimizer:
    """The optimizer when a config names none: AdamW at configs/base.yaml's learning rate."""
    return torch.optim.AdamW(params, lr=5e-4)


def describe_optimizer(factory) -> dict:
    """The optimizer's class path and plain-valued settings, from the factory the CLI builds (a partial)."""
    if isinstance(factory, functools.partial):
        cls = next((a for a in reversed(factory.args) if isinstance(a, type)), factory.func)
        plain = {k: v for k, v in factory.keywords.items() if isinstance(v, (int, float, str, bool)) or v is None}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", **plain}
    return {"class_path": f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"}


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant", restart: int = 0) -> float:
    """The learning rate's multiplier before optimizer step `step` + 1: linear warmup from 0 over `warmup` steps, then
    constant, linear decay to 0, or cosine decay to 0 at step `total`. restart > 0: the warmup starts again at that
    step (the preference stage after an SFT stage of `restart` steps), the decay keeps counting from the run's start."""
    stage = step - restart if 0 < restart <= step else step
    if stage < warmup:
        return (stage + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0
