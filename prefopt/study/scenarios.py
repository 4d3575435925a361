"""Scenarios: the claim made for a loss, tested where the truth is known, with the prediction written before the runs.

A scenario is a calibrating grid (`calibrate:`, matched KL) with a `scenario:` block:

    scenario:
      claim: DPO suffers as labels get noisy; robust DPO and cDPO resist
      source: Chowdhury et al. 2024, arXiv 2403.00409
      knob: data.gold.label_flip          # the built-in task's setting that the variants vary
      metric: val/gold/frontier_gap       # compared at each KL target; lower is better unless higher_is_better
      predictions:                        # variant labels, at every KL target:
        - {better: robust_eps0.2, worse: dpo_eps0.2}       # the first beats the second
        - {same: [robust_eps0.2, dpo_eps0], margin: 0.05}  # their difference lies within +-0.05

The grid command writes the block to `<results>/scenario.json` before the first run (this module: the block's
checks); `python -m prefopt report <results>` then writes `verdicts.csv` (`prefopt.study.verdicts`): per prediction and reached KL target, the paired difference worse - better of
the metric (sign-adjusted so that positive favours `better`) over the seeds both ran at their calibrated values
(same seed = same pairs and evaluation samples), its 95% t interval, and the verdict: **confirmed** (interval above
0; for `same`: inside +-margin), **refuted** (below 0; for `same`: wholly outside +-margin) or **unresolved**
(`seeds_to_resolve`: how many seeds an interval of the observed spread would need to decide, at the observed effect). Nothing is selected after the runs: a plain paired
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
        raise ScenarioError(f"{where}: scenario.predictions must be a non-empty list of {{better, worse}} or "
                            "{same, margin} mappings")
    checked = [_prediction(p, f"{where}: scenario.predictions[{i}]", labels) for i, p in enumerate(predictions)]
    return {"claim": raw["claim"], "source": raw["source"], "knob": raw["knob"], "metric": raw.get("metric", GAP),
            "higher_is_better": bool(raw.get("higher_is_better", False)),
            "predictions": checked}


def _prediction(p: Any, where: str, labels: Sequence[str]) -> dict[str, Any]:
    """{better: a, worse: b} (a beats b), or {same: [a, b], margin: m} (their difference lies within +-m)."""
    if isinstance(p, Mapping) and set(p) == {"better", "worse"}:
        names, out = [p["better"], p["worse"]], {"better": p["better"], "worse": p["worse"]}
    elif isinstance(p, Mapping) and set(p) == {"same", "margin"} and isinstance(p["same"], list) and len(p["same"]) == 2 \
            and isinstance(p["margin"], (int, float)) and p["margin"] > 0:
        names, out = list(p["same"]), {"same": list(p["same"]), "margin": float(p["margin"])}
    else:
        raise ScenarioError(f"{where} must be {{better: <variant>, worse: <variant>}} or {{same: [<variant>, <variant>], "
                            "margin: <positive number>}")
    missing = [n for n in names if n not in labels]
    if missing:
        raise ScenarioError(f"{where} names {missing}, not variants of this grid ({', '.join(labels)})")
    return out


def read_scenario(folder: Path) -> dict[str, Any] | None:
    path = folder / SCENARIO_FILE
    return json.loads(path.read_text()) if path.is_file() else None
