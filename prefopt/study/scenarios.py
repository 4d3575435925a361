"""Scenarios: the claim made for a loss, tested where the truth is known, with the prediction written before the runs.

A scenario is a calibrating grid (`calibrate:`, matched KL) with a `scenario:` block:

    scenario:
      claim: DPO suffers as labels get noisy; robust DPO and cDPO resist
      source: Chowdhury et al. 2024, arXiv 2403.00409
      knob: data.gold.label_flip          # the built-in task's setting that the variants vary
      metric: val/gold/frontier_gap       # compared at each KL target; lower is better unless higher_is_better
      predictions:                        # each: `better` beats `worse` (variant labels), at every KL target
        - {better: robust_eps0.2, worse: dpo_eps0.2}

The grid command writes the block to `<results>/scenario.json` before the first run (this module: the block's
checks); `python -m prefopt report <results>` then writes `verdicts.csv` (`prefopt.study.verdicts`): per prediction and reached KL target, the paired difference worse - better of
the metric (sign-adjusted so that positive favours `better`) over the seeds both ran at their calibrated values
(same seed = same pairs and evaluation samples), its 95% t interval, and the verdict: **confirmed** (interval above
0), **refuted** (below 0) or **unresolved** (contains 0; `seeds_to_resolve` is how many seeds an interval of the
observed spread would need to exclude 0 at the observed effect). Nothing is selected after the runs: a plain paired
interval is the honest one. `python -m prefopt.study.verdicts results/scenarios` prints every scenario's table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCENARIO_FILE = "scenario.json"
FIELDS = {"claim", "source", "knob", "metric", "higher_is_better", "predictions"}
GAP = "val/gold/frontier_gap"


class ScenarioError(ValueError):
    """A `scenario:` block that cannot be checked: the message names the key."""


def parse_scenario(raw: Any, where: str, labels: Sequence[str]) -> dict[str, Any]:
    """The checked `scenario:` block of a grid file; `labels` are the grid's variant labels."""
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{where}: scenario must be a mapping with keys {sorted(FIELDS)}")
    unknown = set(raw) - FIELDS
    if unknown:
        raise ScenarioError(f"{where}: scenario has unknown keys {sorted(unknown)}; valid keys: {sorted(FIELDS)}")
    for key in ("claim", "source", "knob"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ScenarioError(f"{where}: scenario.{key} must be a non-empty string")
    predictions = raw.get("predictions")
    if not isinstance(predictions, list) or not predictions:
        raise ScenarioError(f"{where}: scenario.predictions must be a non-empty list of {{better, worse}} mappings")
    for i, p in enumerate(predictions):
        if not isinstance(p, Mapping) or set(p) != {"better", "worse"}:
            raise ScenarioError(f"{where}: scenario.predictions[{i}] must be {{better: <variant>, worse: <variant>}}")
        missing = [p[k] for k in ("better", "worse") if p[k] not in labels]
        if missing:
            raise ScenarioError(f"{where}: scenario.predictions[{i}] names {missing}, not variants of this grid "
                                f"({', '.join(labels)})")
    return {"claim": raw["claim"], "source": raw["source"], "knob": raw["knob"], "metric": raw.get("metric", GAP),
            "higher_is_better": bool(raw.get("higher_is_better", False)),
            "predictions": [{"better": p["better"], "worse": p["worse"]} for p in predictions]}


def read_scenario(folder: Path) -> dict[str, Any] | None:
    path = folder / SCENARIO_FILE
    return json.loads(path.read_text()) if path.is_file() else None
