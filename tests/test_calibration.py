"""Calibration to KL targets: the search (pure, on known KL curves), the grid file's checks, and whole calibrating
grids of stub runs (a stub's KL is 1/beta + 0.1 seed, so every answer is known), with resume."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)
from test_grid import calls, run_grid, stub, write_grid  # noqa: F401  (stub: fixture)

from prefopt.study.calibration import CalibrationSpec, Knob, Point, outcome, outcome_view, propose
from prefopt.study.grid import GridError, load_grid

TARGETS = (0.25, 0.5, 1.0, 2.0, 4.0)


def search(kl, knob: Knob, spec: CalibrationSpec) -> tuple[list[Point], list[dict]]:
    points: list[Point] = []
    while (x := propose(points, knob, spec)) is not None:
        points.append(Point(x, kl(x), f"run{len(points)}"))
    return points, outcome(points, knob, spec)


def test_a_dpo_like_curve_is_matched_at_every_target_within_the_budget():
    spec = CalibrationSpec(TARGETS, seed=100, runs_per_loss=12, tolerance=0.1)
    noise = random.Random(0)
    points, rows = search(lambda b: 0.6 * b ** -1.2 * math.exp(noise.gauss(0, 0.05)), Knob("model.loss.beta", -1, 0.1),
                          spec)
    assert len(points) <= 9 and [r["status"] for r in rows] == ["reached"] * 5
    for row in rows:
        assert abs(math.log(row["kl"] / row["target"])) <= math.log(1.1)
    assert points[0].x == 0.1  # the search starts at the loss's value
    again, _ = search(lambda b: 0.6 * b ** -1.2, Knob("model.loss.beta", -1, 0.1), spec)
    assert [p.x for p in again] == [p.x for p in search(lambda b: 0.6 * b ** -1.2, Knob("model.loss.beta", -1, 0.1),
                                                           spec)[0]]  # deterministic: a resumed grid replays it


def test_a_kl_floor_is_reported_unreachable_with_the_closest_run():
    """ORPO-like: KL grows with lam but never falls below 0.3; targets under it are unreachable, the rest reached."""
    spec = CalibrationSpec(TARGETS, seed=100, runs_per_loss=14)
    points, rows = search(lambda lam: 0.3 + 0.05 * lam, Knob("model.loss.lam", 1, 1.0), spec)
    status = {r["target"]: r["status"] for r in rows}
    assert status[0.25] == "unreachable" and all(status[t] == "reached" for t in (0.5, 1.0, 2.0, 4.0))
    floor = next(r for r in rows if r["target"] == 0.25)
    assert floor["kl"] == min(p.kl for p in points) and floor["value"] == min(p.x for p in points)


def test_the_runs_overrule_a_declared_direction_that_the_kl_contradicts():
    """RPO-like: the KL rises with beta (0.2 + 2 beta) though beta is declared to lower it. The first step goes the
    declared way (beta 0.01: the KL falls toward its floor 0.2); every target above is then reached by stepping out
    from the other end (before, the flat declared side made them all unreachable)."""
    spec = CalibrationSpec(TARGETS, seed=100, runs_per_loss=10)
    points, rows = search(lambda b: 0.2 + 2 * b, Knob("model.loss.beta", -1, 0.1), spec)
    assert [p.x for p in points[:2]] == [0.1, 0.01]  # the declared direction first
    assert [r["status"] for r in rows] == ["reached"] * 5 and len(points) <= 8


def test_a_kl_minimum_is_unreachable_below_from_either_side():
    """U-shaped (0.5 + ln(b)^2, least KL 0.5 at b = 1): the targets above the minimum are reached, 0.25 is reported
    unreachable (both ends move the KL away from it), with the closest run."""
    spec = CalibrationSpec(TARGETS, seed=100, runs_per_loss=12)
    points, rows = search(lambda b: 0.5 + math.log(b) ** 2, Knob("model.loss.beta", -1, 0.1), spec)
    status = {r["target"]: r["status"] for r in rows}
    assert status == {0.25: "unreachable", 0.5: "reached", 1.0: "reached", 2.0: "reached", 4.0: "reached"}
    assert next(r for r in rows if r["target"] == 0.25)["kl"] == min(p.kl for p in points)


def test_the_end_of_a_valid_range_makes_a_target_unreachable():
    knob = Knob("model.loss.label_smoothing", -1, 0.1, low=0.0, high=0.5)  # KL = 0.5 / x: 1 at the bound
    points, rows = search(lambda x: 0.5 / x, knob, CalibrationSpec(TARGETS, seed=1))
    assert all(p.x < 0.5 for p in points)
    assert {r["target"]: r["status"] for r in rows} == {0.25: "unreachable", 0.5: "unreachable", 1.0: "reached",
                                                         2.0: "reached", 4.0: "reached"}


def test_a_spent_budget_and_failed_runs_are_said():
    spec = CalibrationSpec(TARGETS, seed=1, runs_per_loss=2)
    points, rows = search(lambda b: 1 / b, Knob("model.loss.beta", -1, 0.1), spec)
    assert len(points) == 2 and "budget" in {r["status"] for r in rows}
    failed = [Point(0.1, None, "r0")]  # the first run failed: its value would be proposed again, so the search stops
    assert propose(failed, Knob("model.loss.beta", -1, 0.1), spec) is None
    assert {r["status"] for r in outcome(failed, Knob("model.loss.beta", -1, 0.1), spec)} == {"unresolved"}


def test_the_outcome_view_gives_each_variant_a_row_and_says_why_a_target_was_not_reached():
    table = pd.DataFrame([
        {"variant": "dpo", "search_runs": 4, "target": 0.5, "status": "reached", "key": "model.loss.beta", "value": 1.42,
         "kl": 0.4948},
        {"variant": "dpo", "search_runs": 4, "target": 4.0, "status": "reached", "key": "model.loss.beta", "value": 0.2,
         "kl": 4.1},
        {"variant": "orpo", "search_runs": 10, "target": 0.5, "status": "unreachable", "key": "model.loss.lam",
         "value": 0.1, "kl": 0.227},
        {"variant": "orpo", "search_runs": 10, "target": 4.0, "status": "budget", "key": "model.loss.lam", "value": 30.0,
         "kl": 3.1},
    ])
    view = outcome_view(table)
    assert list(view.index) == ["dpo", "orpo"] and list(view.columns) == ["KL 0.5", "KL 4", "runs"]
    assert view.loc["dpo", "KL 0.5"] == "beta=1.42 (0.495)" and view.loc["orpo", "KL 0.5"] == "unreachable (0.227)"
    assert view.loc["orpo", "KL 4"] == "budget (3.1)" and list(view["runs"]) == [4, 10]


# ---------------------------------------------------------------------------------------------- grid files
CALIBRATE = {"kl_targets": [1.0, 2.0, 4.0, 0.5], "seed": 7, "runs_per_loss": 10, "tolerance": 0.05}


@pytest.mark.parametrize(("change", "message"), [
    ({"calibrate": {**CALIBRATE, "seed": 1}}, "calibrate.seed 1 is also an evaluation seed"),
    ({"calibrate": {**CALIBRATE, "kl_targets": [1, -2]}}, "kl_targets must be a non-empty list of positive"),
    ({"calibrate": {**CALIBRATE, "budget": 3}}, r"unknown keys \['budget'\]"),
    ({"axes": {"seed": [0, 1], "model.loss.beta": [0.1]}}, "sweeps only seeds"),
    ({"variants": [{"model.loss.name": "sft"}]}, r"variants\[0\] \(sft\): loss 'sft' has no strength"),
    ({"variants": [{"model.loss.name": "dpo", "model.loss.beta": [0.1, 1]}]}, "give one start value, not a list"),
    ({"variants": [{"model.loss.name": "sft", "strength": "trainer.max_steps"}]}, "needs strength_direction"),
])
def test_bad_calibrating_grids_are_named(tmp_path, micro_base, change, message):
    from prefopt.study.calibrated import Calibration

    spec = {"axes": {"seed": [0, 1]}, "calibrate": CALIBRATE, "variants": [{"model.loss.name": "dpo"}], **change}
    with pytest.raises(GridError, match=message):
        Calibration(load_grid(write_grid(tmp_path, spec)), tmp_path / "out")


def test_strength_keys_belong_to_calibrating_grids(tmp_path, micro_base):
    path = write_grid(tmp_path, {"variants": [{"model.loss.name": "sft", "strength": "trainer.max_steps"}]})
    with pytest.raises(GridError, match="only a calibrating grid"):
        load_grid(path)


# ---------------------------------------------------------------------------------------------- whole grids
def test_a_calibrating_grid_searches_then_runs_every_seed_at_the_values_found(tmp_path, stub, micro_base):
    """Stub KL on the calibration seed 7 is 1/beta + 0.7: beta = 1/(target - 0.7) for 1, 2 and 4 nats; 0.5 lies
    under the floor of 0.7. kto searches beta too (its metadata); `name` labels a second dpo curve."""
    grid = write_grid(tmp_path, {"name": "cal", "axes": {"seed": [0, 1]}, "calibrate": CALIBRATE, "variants": [
        {"model.loss.name": "dpo"}, {"model.loss.name": "kto"},
        {"name": "dpo_ls", "model.loss.name": "dpo", "model.loss.label_smoothing": 0.1, "model.loss.beta": 1.0}]})
    out = tmp_path / "out"
    assert run_grid(grid, out, "--workers", "2") == 0
    report = json.loads((out / "calibration.json").read_text())
    assert [v["variant"] for v in report["variants"]] == ["dpo", "kto", "dpo_ls"]
    for variant in report["variants"]:
        assert variant["runs"] <= 10 and variant["finished"]
        status = {t["target"]: t for t in variant["targets"]}
        assert status[0.5]["status"] == "unreachable" and status[0.5]["kl"] < 0.75  # the closest run is reported
        for target in (1.0, 2.0, 4.0):
            assert status[target]["status"] == "reached"
            assert abs(1 / status[target]["value"] + 0.7 - target) <= 0.05 * target + 0.01
        assert variant["path"][0]["x"] == (1.0 if variant["variant"] == "dpo_ls" else 0.1)  # its start value
    searched = sum(v["runs"] for v in report["variants"])
    assert len(list((out / "calibration" / "runs").iterdir())) == searched
    table = pd.read_csv(out / "calibration.csv")
    assert len(table) == 3 * 4 and set(table["status"]) == {"reached", "unreachable"}
    # every evaluation seed at each reached value, as curves named by variant, tabulated as any grid
    evaluation = sorted(p.name for p in (out / "runs").iterdir())
    assert len(evaluation) == 3 * 3 * 2 and all(n.endswith(("_seed0", "_seed1")) for n in evaluation)
    assert any(n.startswith("dpo_ls_beta") for n in evaluation)
    assert set(pd.read_csv(out / "runs.csv")["curve"]) >= {"dpo", "kto", "dpo_ls"}
    # a second command resumes: nothing runs again
    before = len(calls(stub))
    assert run_grid(grid, out, "--workers", "2") == 0 and len(calls(stub)) == before
    assert before == searched + len(evaluation)


def test_the_catalog_grid_calibrates_every_registered_loss(capsys):
    """experiments/grids/catalog.yaml lists every loss (aliases aside; the on-policy RLOO is experiments/online's),
    once along its own knob, and a few of them a second time along the learning rate (named <loss>_lr: their beta
    did not move their KL into range), and its dry run lists every search.
    --no-check: the pre-flight parse of 50 variants' configs takes about a minute; every loss's config is parsed and
    run by tests/test_fit.py through its experiment file."""
    from prefopt.losses import LOSSES
    from prefopt.study import grid_cli

    grid = load_grid(Path(__file__).resolve().parents[1] / "experiments" / "grids" / "catalog.yaml")
    listed = [v["model.loss.name"] for v in grid.variants]
    assert set(listed) == {spec.name for spec in LOSSES.values() if not spec.on_policy}  # offline pairs
    again = [i for i, v in enumerate(grid.variants) if v.get("name", v["model.loss.name"]) != v["model.loss.name"]]
    assert [grid.variants[i]["name"] for i in again] == [f"{grid.variants[i]['model.loss.name']}_lr" for i in again]
    assert all(grid.knobs[i]["strength"] == "model.optimizer.init_args.lr" for i in again)
    assert len(listed) == len(set(listed)) + len(again)  # no loss a third time, none twice otherwise
    assert grid.calibrate is not None and grid.calibrate.kl_targets == (0.25, 0.5, 1.0, 2.0, 4.0)
    assert grid.calibrate.seed not in grid.axes["seed_everything"] and len(grid.axes["seed_everything"]) == 5
    assert grid_cli.main(["--config", str(grid.path), "--dry-run", "--no-check", "--out", "/nonexistent/catalog"]) == 0
    out = capsys.readouterr().out
    assert "orpo: model.loss.lam (direction +1)" in out and "simpo: model.optimizer.init_args.lr (direction +1)" in out
    assert f"calibration: {len(listed)} variants" in out
