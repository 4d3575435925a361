"""Scenario verdicts (prefopt/study/scenarios.py): the block's checks, the paired-interval arithmetic on hand-made
tables, and a whole scenario grid of stub runs whose prediction is on disk before its first run."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)
from test_calibration import CALIBRATE
from test_grid import run_grid, stub, write_grid  # noqa: F401  (stub: fixture)

from prefopt.study.grid import GridError, load_grid
from prefopt.study.scenarios import read_scenario
from prefopt.study.verdicts import seeds_to_resolve, verdicts
from prefopt.study.tables import t_quantile

SCENARIO = {"claim": "robust beats dpo", "source": "a paper", "knob": "data.gold.label_flip",
            "predictions": [{"better": "robust", "worse": "dpo"}]}
VARIANTS = [{"model.loss.name": "dpo"}, {"model.loss.name": "robust", "model.loss.label_smoothing": 0.2}]


@pytest.mark.parametrize(("change", "message"), [
    ({"scenario": {**SCENARIO, "claim": ""}}, "scenario.claim must be a non-empty string"),
    ({"scenario": {**SCENARIO, "predictions": [{"better": "robust", "worse": "ipo"}]}},
     r"scenario.predictions\[0\] names \['ipo'\], not variants of this grid \(dpo, robust\)"),
    ({"scenario": {**SCENARIO, "predictions": [{"same": ["robust", "dpo"], "margin": -1}]}},
     r"scenario.predictions\[0\] must be \{better: <variant>, worse: <variant>\} or \{same:"),
    ({"scenario": {**SCENARIO, "verdict": "yes"}}, r"unknown keys \['verdict'\]"),
    ({"calibrate": None}, "a scenario compares at matched KL: it needs calibrate:"),
])
def test_bad_scenarios_are_named(tmp_path, micro_base, change, message):
    spec = {"axes": {"seed": [0, 1]}, "calibrate": CALIBRATE, "variants": VARIANTS, "scenario": SCENARIO, **change}
    with pytest.raises(GridError, match=message):
        load_grid(write_grid(tmp_path, {k: v for k, v in spec.items() if v is not None}))


def test_seeds_to_resolve_is_the_first_n_whose_interval_excludes_zero():
    # effect 1 from its boundary, spread 1: t(5 df) / sqrt(6) = 1.050 > 1 but t(6 df) / sqrt(7) = 0.925 < 1
    assert seeds_to_resolve(1.0, 1.0, 3) == 7
    assert t_quantile(6) / math.sqrt(6) > 1 > t_quantile(7) / math.sqrt(7)
    assert seeds_to_resolve(0.0, 1.0, 5) == math.inf and seeds_to_resolve(1.0, 0.1, 9) == 9


def _table(gaps: dict[str, list[float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs at one calibrated value per variant (beta = 1) on seeds 0.., KL 1, and their frontier gaps."""
    rows = [{"run": f"{v}_{s}", "status": "ok", "variant": v, "curve": v, "seed": s, "loss.beta": 1.0,
             "val/gold/sampled_kl": 1.0, "val/gold/gold_reward": 1.5 - g, "val/gold/frontier_gap": g}
            for v, gs in gaps.items() for s, g in enumerate(gs)]
    calibration = pd.DataFrame([{"variant": v, "target": 1.0, "status": "reached", "key": "model.loss.beta",
                                 "value": 1.0} for v in gaps])
    return pd.DataFrame(rows), calibration


def test_verdicts_are_paired_intervals_of_the_predicted_difference():
    runs, calibration = _table({"dpo": [0.30, 0.32, 0.28, 0.31], "robust": [0.20, 0.21, 0.19, 0.22],
                                "ipo": [0.31, 0.30, 0.27, 0.33], "cdpo": [0.40, 0.41, 0.38, 0.42]})
    calibration.loc[calibration["variant"] == "cdpo", "status"] = "unreachable"
    scenario = {"metric": "val/gold/frontier_gap", "higher_is_better": False, "predictions": [
        {"better": "robust", "worse": "dpo"}, {"better": "dpo", "worse": "robust"}, {"better": "ipo", "worse": "dpo"},
        {"better": "cdpo", "worse": "dpo"}, {"same": ["ipo", "dpo"], "margin": 0.05},
        {"same": ["robust", "dpo"], "margin": 0.05}, {"same": ["robust", "dpo"], "margin": 0.2}]}
    table = verdicts(runs, calibration, scenario)
    same = table[table["prediction"] == "same"].set_index("margin")
    # ipo - dpo = [0.01, -0.02, -0.01, 0.02] within +-0.05: confirmed; robust - dpo ~ -0.1: outside +-0.05, inside 0.2
    assert same["verdict"].tolist() == ["confirmed", "refuted", "confirmed"]
    table = table[table["prediction"] == "better"].set_index(["first", "second"])
    d = [0.10, 0.11, 0.09, 0.09]  # dpo - robust per seed: robust's gap is smaller
    mean, sd = sum(d) / 4, pd.Series(d).std()
    half = t_quantile(4) * sd / 2
    row = table.loc["robust", "dpo"]
    assert row["verdict"] == "confirmed" and row["seeds"] == 4
    assert abs(row["effect"] - mean) < 1e-12 and abs(row["lo"] - (mean - half)) < 1e-12
    assert table.loc["dpo", "robust"]["verdict"] == "refuted"
    ipo = table.loc["ipo", "dpo"]  # dpo - ipo = [-0.01, 0.02, 0.01, -0.02]: mean 0
    assert ipo["verdict"] == "unresolved" and ipo["seeds_to_resolve"] == math.inf
    assert table.loc["cdpo", "dpo"]["verdict"] == "not reached"


def test_a_scenario_grid_writes_its_prediction_first_and_the_report_its_verdicts(tmp_path, stub, micro_base):
    """Stub runs: equal KL curves for both variants, so the effect on the reward is 0: unresolved."""
    scenario = {**SCENARIO, "metric": "val/gold/gold_reward", "higher_is_better": True}
    grid = write_grid(tmp_path, {"name": "sc", "axes": {"seed": [0, 1]}, "calibrate": CALIBRATE, "variants": VARIANTS,
                                 "scenario": scenario})
    out = tmp_path / "out"
    assert run_grid(grid, out, "--workers", "2", "--dry-run") == 0 and not (out / "scenario.json").exists()
    assert run_grid(grid, out, "--workers", "2") == 0
    written = json.loads((out / "scenario.json").read_text())
    assert written["predictions"] == SCENARIO["predictions"] and written["claim"] == SCENARIO["claim"]
    # the report's own tables need the gold task's metrics, which stubs lack: its verdict step on the grid's tables
    table = verdicts(pd.read_csv(out / "runs.csv"), pd.read_csv(out / "calibration.csv"), read_scenario(out))
    assert set(table["target_kl"]) == {1.0, 2.0, 4.0} and set(table["verdict"]) == {"unresolved"}
    assert table["effect"].abs().max() < 1e-12
