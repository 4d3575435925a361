"""Sources made in code: names a config may give as `model.model` or `data.dataset` instead of a hub name or a path.

Each name maps to "module:function", imported only when a run uses it (a run on a real model never loads the
built-in task). A model's function returns a `save_pretrained` directory; a dataset's returns (train file,
validation file) for a seed and the data's options for that source (`data.gold` for "gold").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

BUILTIN = "gold"  # the built-in task (prefopt/gold/): its reference policy and its preference pairs
WEAK = "gold_weak"  # the built-in task's weak start: its reference's SFT stopped early (scenario S8)
MODELS = {BUILTIN: "prefopt.gold.build:ensure_reference", WEAK: "prefopt.gold.build:ensure_weak_reference"}
DATASETS = {BUILTIN: "prefopt.gold.pairs:pair_files"}


def source(table: dict[str, str], name: str) -> Callable:
    """The function that makes the built-in model or dataset `name` (a key of MODELS or DATASETS)."""
    module, _, function = table[name].partition(":")
    return getattr(importlib.import_module(module), function)
