"""Run a calibrating grid: search each variant's knob to the KL targets on the calibration seed, then run every seed
at the values found (the search itself: `prefopt.study.calibration`).

Layout of the results folder:
- `calibration/runs/<variant>_<knob><value>_seed<calibration seed>/`: every search run, a real run kept whole;
- `calibration.json`: the settings, and per variant its knob (key, direction, start), its search path (each run's
  value, KL and name, in order) and per target the outcome (reached, unreachable, unresolved or budget; the chosen
  value and its KL); `calibration.csv` is the same outcome as a table;
- `runs/`, `ranking.csv`, ...: the evaluation runs at the chosen values on the evaluation seeds, and their tables
  (`prefopt.study.tables`), as for any grid.
Search rounds run one proposal per variant at a time, in parallel across variants. A killed or repeated command
replays each search from the runs on disk (the search is deterministic), so it resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from prefopt.study.calibration import Knob, Point, outcome, propose
from prefopt.study.grid import LOSS_KEY, SEED_KEY, Grid, GridError, Run, base_values, expand, lookup, merge_loss
from prefopt.study.runner import GridRunner
from prefopt.study.worker import WorkerPool
from prefopt.study.tables import METRICS_FILE, write_atomic


def knob_for(grid: Grid, index: int) -> Knob:
    """Variant `index`'s searched setting: its `strength` key, or its loss's `strength` metadata."""
    from prefopt.losses import LOSSES

    variant, given = grid.variants[index], grid.knobs[index] if grid.knobs else {}
    base = base_values(grid)
    fixed = {**grid.fixed, **{k: v for k, v in variant.items() if k != "name"}}
    loss = merge_loss(lookup(base, LOSS_KEY), {k: v for k, v in fixed.items() if not isinstance(v, list)})
    spec = LOSSES[loss["name"]]
    where = f"{grid.path}: variants[{index}] ({variant.get('name') or loss['name']})"
    if "strength" in given:
        key, direction = str(given["strength"]), given.get("strength_direction")
        if direction not in (1, -1):
            raise GridError(f"{where}: strength {key} needs strength_direction: 1 (larger values, larger KL) or -1")
    elif spec.strength is not None:
        key, direction = f"{LOSS_KEY}.{spec.strength[0]}", given.get("strength_direction", spec.strength[1])
    else:
        raise GridError(f"{where}: loss {loss['name']!r} has no strength hyperparameter to search; name a setting "
                        "with strength: <dotted key> (e.g. trainer.max_steps) and strength_direction: 1 or -1")
    if isinstance(variant.get(key), list):
        raise GridError(f"{where}: {key} is searched by the calibration; give one start value, not a list")
    if key.startswith(LOSS_KEY + "."):
        hyper = {h.name: h for h in spec.all_hyperparameters}.get(key[len(LOSS_KEY) + 1 :])
        if hyper is None or hyper.type not in (int, float):
            raise GridError(f"{where}: {key} is not a numeric hyperparameter of loss {loss['name']!r}")
        start, rng = loss[hyper.name], hyper.range
        bounds = {} if rng is None else {k: v for k, v in dict(
            low=rng.low, high=rng.high, low_inclusive=rng.low_inclusive, high_inclusive=rng.high_inclusive).items()
            if v is not None}
        return Knob(key, direction, float(start), integer=hyper.type is int, **bounds)
    start = fixed.get(key, lookup(base, key))
    if not isinstance(start, (int, float)) or isinstance(start, bool) or start <= 0:
        raise GridError(f"{where}: strength {key} needs a positive start value (in the variant or the base config), "
                        f"got {start!r}")
    return Knob(key, direction, float(start), integer=isinstance(start, int))


def _one_run(grid: Grid, index: int, knob: Knob, values: list[float], seeds: list[int]) -> list[Run]:
    """The variant's runs at these knob values and seeds (names, loss validation and all, as `expand` makes them)."""
    cast = [int(v) if knob.integer else v for v in values]
    variant = {**grid.variants[index], knob.key: cast}
    runs = expand(dataclasses.replace(grid, axes={SEED_KEY: seeds}, variants=(variant,), calibrate=None, knobs=()))
    along = () if knob.key.startswith(LOSS_KEY + ".") else (knob.key,)  # a loss hyperparameter varies along anyway
    return [dataclasses.replace(r, along=along) for r in runs]


def _kl(run_dir: Path, metric: str) -> float | None:
    try:
        value = json.loads((run_dir / METRICS_FILE).read_text())["final"].get(metric)
    except (OSError, ValueError, KeyError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


class Calibration:
    """The searches of one calibrating grid, replayed from the runs on disk."""

    def __init__(self, grid: Grid, out: Path) -> None:
        assert grid.calibrate is not None
        self.grid, self.spec, self.out = grid, grid.calibrate, Path(out)
        self.knobs = [knob_for(grid, i) for i in range(len(grid.variants))]
        self.labels = [_one_run(grid, i, k, [k.round(k.start)], [self.spec.seed])[0].variant for i, k in enumerate(self.knobs)]
        self.checker = GridRunner(grid, [], self.out / "calibration", workers=1)  # run statuses, stale args included

    def first_runs(self) -> list[Run]:
        """Each variant's first search run (at its start value): what the grid's pre-flight check parses."""
        return [_one_run(self.grid, i, k, [k.round(k.start)], [self.spec.seed])[0] for i, k in enumerate(self.knobs)]

    def run_dir(self, run: Run) -> Path:
        return self.out / "calibration" / "runs" / run.name

    def replay(self, index: int) -> tuple[list[Point], list[Run], Run | None]:
        """The variant's search so far (points and their runs, in order) and its next run to do (None: done)."""
        knob, points, runs = self.knobs[index], [], []
        while (x := propose(points, knob, self.spec)) is not None:
            run = _one_run(self.grid, index, knob, [x], [self.spec.seed])[0]
            status = self.checker.status(run)
            if status not in ("ok", "failed"):
                return points, runs, run
            points.append(Point(x, _kl(self.run_dir(run), self.spec.metric) if status == "ok" else None, run.name))
            runs.append(run)
        return points, runs, None

    def search(self, workers: int, launcher: Any = None, **how: Any) -> int:
        """Run search rounds until every variant's search is over; 0 if no round stopped early. `how`: the
        GridRunner's `fresh_process` and `pool` (one pool serves every round)."""
        while True:
            states = [self.replay(i) for i in range(len(self.knobs))]
            pending = [s[2] for s in states if s[2] is not None]
            if not pending:
                return 0
            done = [r for s in states for r in s[1]]
            runner = GridRunner(self.grid, done + pending, self.out / "calibration", workers=workers, launcher=launcher,
                                **how)
            if runner.run() not in (0, 1):  # 1: some run failed (a point without KL); anything else: interrupted
                return 130
            if all(self.checker.status(r) not in ("ok", "failed") for r in pending):
                print("calibration: a round made no progress; see the runs' error.txt", file=sys.stderr)
                return 1

    def evaluation_runs(self) -> list[Run]:
        """Every evaluation seed at each variant's chosen values (the reached targets', each value once)."""
        seeds = list(self.grid.axes.get(SEED_KEY) or [lookup(base_values(self.grid), SEED_KEY) or 0])
        runs = []
        for i, knob in enumerate(self.knobs):
            points, _, _ = self.replay(i)
            values = sorted({r["value"] for r in outcome(points, knob, self.spec) if r["status"] == "reached"})
            runs += _one_run(self.grid, i, knob, values, seeds) if values else []
        return sorted(runs, key=lambda r: r.seed)

    def report(self) -> dict[str, Any]:
        """calibration.json's content: settings, each variant's knob, search path and outcome per target."""
        variants = []
        for i, knob in enumerate(self.knobs):
            points, _, pending = self.replay(i)
            variants.append({"variant": self.labels[i], "knob": dataclasses.asdict(knob), "runs": len(points),
                             "finished": pending is None,
                             "path": [dataclasses.asdict(p) for p in points],
                             "targets": outcome(points, knob, self.spec)})
        return {"settings": dataclasses.asdict(self.spec), "variants": variants}

    def write_report(self) -> None:
        import pandas as pd

        report = self.report()
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / "calibration.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
        rows = [{"variant": v["variant"], "search_runs": v["runs"], **t} for v in report["variants"] for t in v["targets"]]
        write_atomic(self.out / "calibration.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))

    def print_plan(self) -> None:
        for i, knob in enumerate(self.knobs):
            points, _, pending = self.replay(i)
            label = self.labels[i]
            path = ", ".join(f"{p.x:g}->{'failed' if p.kl is None else f'{p.kl:.3g}'}" for p in points) or "none yet"
            print(f"{label}: {knob.key} (direction {knob.direction:+d}); search runs {path}; next: "
                  f"{pending.name if pending else 'done'}")
        print(f"calibration: {len(self.knobs)} variants, targets {list(self.spec.kl_targets)}, "
              f"{self.spec.runs_per_loss} search runs at most each, seed {self.spec.seed}; the evaluation runs follow")


def run_calibrated(calibration: Calibration, workers: int, launcher: Any = None, dry_run: bool = False,
                   fresh_process: bool = False) -> int:
    """The whole command for a calibrating grid: search, write the calibration, run the evaluation seeds (every
    round and the evaluation in the same worker processes)."""
    grid, out = calibration.grid, calibration.out
    if dry_run:
        calibration.print_plan()
        return 0
    pool = WorkerPool()
    try:
        code = calibration.search(workers, launcher, fresh_process=fresh_process, pool=pool)
        calibration.write_report()
        if code == 130:
            return code
        evaluation = calibration.evaluation_runs()
        if not evaluation:
            print("calibration: no variant reached a target; see calibration.csv", file=sys.stderr)
            return 1
        runner = GridRunner(grid, evaluation, out, workers=workers, launcher=launcher, fresh_process=fresh_process,
                            pool=pool)
        return max(code, runner.run())
    finally:
        pool.close()
