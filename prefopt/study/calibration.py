"""Calibration to KL targets: for each loss, find the strength that lands its policy at each target KL.

A grid with a `calibrate` section declares KL targets instead of hyperparameter lists:

    calibrate:
      kl_targets: [0.25, 0.5, 1, 2, 4]   # sampled KL to the reference, nats (the run's `metric`)
      seed: 100                          # the calibration seed: not one of the evaluation seeds (`axes: seed`)
      runs_per_loss: 12                  # the same budget of search runs for every loss (the fairness rule)
      tolerance: 0.15                    # a target is reached when KL / target is within 1 +- 15%
    axes: {seed: [0, 1, 2, 3, 4]}
    variants:
      - {model.loss.name: dpo}                                   # searches beta (the loss's metadata: larger, less KL)
      - {model.loss.name: sft, strength: trainer.max_steps, strength_direction: 1}   # a loss without a knob

The knob is the loss's `strength` metadata (`prefopt.losses.registry`), or the variant's `strength` key (any
dotted config key: the learning rate or the step budget) with its `strength_direction`. The search works in
(log knob, log KL), where KL is near-linear for the losses here: it interpolates between the two runs that bracket a
target, and steps toward a target no run brackets yet along the slope of the nearest two (at most `max_step` times the
knob per step, at first a slope of 1). The declared direction is where the search starts; the runs decide after that:
where a full-size step the declared way left the KL flat or moved it away from a target while the runs at the other
end moved it toward it, the search steps out from that end (a loss whose KL rises with beta over part of its range).
Every search step is a real run on the calibration seed whose metrics are kept. A target is unreachable when the knob
is at its valid range's end, or when a full-size step toward it barely moved the KL and nothing at the other end moves
it the right way (a floor or ceiling, as ORPO's SFT term makes); it is reported with the closest KL reached, never
dropped. A search
that spends its budget first says so. The functions here are pure: `prefopt.study.calibrated` runs them as grid runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

CALIBRATE_KEYS = {"kl_targets", "seed", "runs_per_loss", "tolerance", "metric", "max_step"}
MIN_STEP = math.log(1.25)  # the smallest step in log knob when no run brackets a target
FLAT = 0.02  # a full-size step toward a target that moves log KL by less than this meets a floor or ceiling


class CalibrationError(ValueError):
    """A `calibrate` section that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class CalibrationSpec:
    kl_targets: tuple[float, ...]
    seed: int
    runs_per_loss: int = 12
    tolerance: float = 0.15
    metric: str = "val/gold/sampled_kl"
    max_step: float = 10.0

    def reached(self, kl: float, target: float) -> bool:
        return abs(math.log(kl / target)) <= math.log1p(self.tolerance)


def parse_spec(raw: Any, where: str, seeds: list[Any]) -> CalibrationSpec:
    """The `calibrate` section of a grid file; `seeds` are the evaluation seeds (which must not hold its seed)."""
    if not isinstance(raw, Mapping):
        raise CalibrationError(f"{where}: calibrate must be a mapping with keys {sorted(CALIBRATE_KEYS)}")
    unknown = set(raw) - CALIBRATE_KEYS
    if unknown:
        raise CalibrationError(f"{where}: calibrate has unknown keys {sorted(unknown)}; valid: {sorted(CALIBRATE_KEYS)}")
    targets = raw.get("kl_targets")
    if not isinstance(targets, list) or not targets or not all(_positive(t) for t in targets):
        raise CalibrationError(f"{where}: calibrate.kl_targets must be a non-empty list of positive numbers, got "
                               f"{targets!r}")
    seed = raw.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CalibrationError(f"{where}: calibrate.seed must be an integer, got {seed!r}")
    if seed in seeds:
        raise CalibrationError(f"{where}: calibrate.seed {seed} is also an evaluation seed (axes.seed): select on "
                               "separate seeds, or the reported intervals carry the selection's luck")
    runs = raw.get("runs_per_loss", CalibrationSpec.runs_per_loss)
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 1:
        raise CalibrationError(f"{where}: calibrate.runs_per_loss must be a positive integer, got {runs!r}")
    tolerance = raw.get("tolerance", CalibrationSpec.tolerance)
    if not _positive(tolerance) or tolerance >= 1:
        raise CalibrationError(f"{where}: calibrate.tolerance must be in (0, 1), got {tolerance!r}")
    max_step = raw.get("max_step", CalibrationSpec.max_step)
    if not _positive(max_step) or max_step <= 1.25:
        raise CalibrationError(f"{where}: calibrate.max_step must be a number above 1.25, got {max_step!r}")
    metric = raw.get("metric", CalibrationSpec.metric)
    if not isinstance(metric, str):
        raise CalibrationError(f"{where}: calibrate.metric must be a metric name, got {metric!r}")
    return CalibrationSpec(tuple(float(t) for t in sorted(targets)), seed, runs, float(tolerance), metric,
                           float(max_step))


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class Knob:
    """The searched setting: a dotted config key, the sign of its effect on the KL, where the search starts, and the
    valid range (open or closed ends); `integer` knobs (the step budget) take whole values."""

    key: str
    direction: int
    start: float
    low: float = 0.0
    high: float = math.inf
    low_inclusive: bool = False
    high_inclusive: bool = False
    integer: bool = False

    def round(self, x: float) -> float:
        """A proposal as a run will use it: 3 significant digits (stable run names), whole for integer knobs."""
        return float(max(1, round(x))) if self.integer else float(f"{x:.3g}")

    def clamp(self, x: float) -> float:
        """x moved inside the valid range: just inside an open end (1% in log), onto a closed one."""
        low = self.low if self.low_inclusive else (self.low * 1.01 if self.low > 0 else 1e-6)
        high = self.high if self.high_inclusive else self.high / 1.01
        return min(max(x, low), high)


@dataclass(frozen=True)
class Point:
    """A search run: its knob value, its KL (None: the run failed or has no such metric), and its name."""

    x: float
    kl: float | None
    run: str = ""


def _usable(points: list[Point]) -> list[Point]:
    return sorted((p for p in points if p.kl is not None and p.kl > 0), key=lambda p: p.x)


def target_status(points: list[Point], target: float, knob: Knob, spec: CalibrationSpec) -> tuple[str, float | None]:
    """("reached", None), ("search", the next knob value to run), or ("unreachable" / "unresolved", None)."""
    ok = _usable(points)
    if any(spec.reached(p.kl, target) for p in ok):
        return "reached", None
    if not ok:
        return ("search", knob.round(knob.start)) if not points else ("unresolved", None)
    tau = math.log(target)
    for a, b in zip(ok, ok[1:]):  # two neighbouring runs on either side of the target: interpolate in log-log
        if (math.log(a.kl) - tau) * (math.log(b.kl) - tau) < 0:
            ua, ub, va, vb = math.log(a.x), math.log(b.x), math.log(a.kl), math.log(b.kl)
            u = ua + (tau - va) * (ub - ua) / (vb - va)
            u = min(max(u, ua + 0.1 * (ub - ua)), ub - 0.1 * (ub - ua))  # safeguard: never at a bracket's end
            return _new(knob.round(math.exp(u)), points)
    # No bracket: every KL is on one side. Step from the run nearest the target, in the direction that moves KL to it.
    up = all(p.kl < target for p in ok)  # the KL must rise
    sign = knob.direction if up else -knob.direction  # +1: larger knob values
    edge, slope = (ok[-1] if sign > 0 else ok[0]), 1.0
    if len(ok) >= 2:
        edge, moved, stepped = _outer_step(ok, sign, up)
        if moved < FLAT and stepped >= 0.99 * math.log(spec.max_step):
            # A full-size step the declared way barely moved the KL, or moved it away: a floor or ceiling, unless the
            # runs at the other end moved it toward the target (the knob acts the other way here): step from there.
            other, moved, stepped = _outer_step(ok, -sign, up)
            if moved < FLAT:
                return "unreachable", None
            sign, edge = -sign, other
        slope = moved / stepped if moved >= FLAT else 0.0  # a short step lost in the noise: take a full-size one
    step = min(max(abs(tau - math.log(edge.kl)) / max(slope, 1e-9), MIN_STEP), math.log(spec.max_step))
    x = knob.round(knob.clamp(math.exp(math.log(edge.x) + sign * step)))
    if x == edge.x:  # the knob's valid range ends here
        return "unreachable", None
    return _new(x, points)


def _outer_step(ok: list[Point], sign: int, up: bool) -> tuple[Point, float, float]:
    """The outermost run on the `sign` side (+1: the largest knob value), how far the step out to it from its
    neighbour moved log KL toward the target (`up`: the KL must rise; negative: away from it), and that step's size in
    log knob."""
    edge, inner = (ok[-1], ok[-2]) if sign > 0 else (ok[0], ok[1])
    moved = (math.log(edge.kl) - math.log(inner.kl)) * (1 if up else -1)
    return edge, moved, abs(math.log(edge.x) - math.log(inner.x))


def _new(x: float, points: list[Point]) -> tuple[str, float | None]:
    """A proposal, unless a run at that value exists already (rounding or a failed run): then the search stops."""
    return ("unresolved", None) if any(p.x == x for p in points) else ("search", x)


def propose(points: list[Point], knob: Knob, spec: CalibrationSpec) -> float | None:
    """The next knob value to run on the calibration seed, or None when the search is over (every target reached,
    unreachable or unresolved, or the budget spent). Deterministic: a resumed grid repeats the same search."""
    if len(points) >= spec.runs_per_loss:
        return None
    ok = _usable(points)

    def priority(target: float) -> tuple[int, float]:
        """Bracketed targets first (an interpolation is cheap), then the farthest from every run: a step toward it
        (at most max_step) brackets the nearer ones on the way."""
        logs = [math.log(p.kl / target) for p in ok]
        bracketed = any(a * b < 0 for a, b in zip(logs, logs[1:]))
        return (0 if bracketed else 1, -min(map(abs, logs), default=0.0))

    for target in sorted(spec.kl_targets, key=priority):
        status, x = target_status(points, target, knob, spec)
        if status == "search":
            return x
    return None


def outcome(points: list[Point], knob: Knob, spec: CalibrationSpec) -> list[dict[str, Any]]:
    """Per target: its status (reached, unreachable, unresolved, budget), the chosen knob value (the run whose KL is
    nearest the target in log), that run's KL and name. Unreached targets keep the closest run for the report."""
    ok = _usable(points)
    rows = []
    for target in spec.kl_targets:
        status, _ = target_status(points, target, knob, spec)
        if status == "search":
            status = "budget"
        best = min(ok, key=lambda p: abs(math.log(p.kl / target))) if ok else None
        rows.append({"target": target, "status": status, "key": knob.key, "value": best.x if best else None,
                     "kl": best.kl if best else None, "run": best.run if best else None})
    return rows


def outcome_view(table: "pd.DataFrame") -> "pd.DataFrame":
    """calibration.csv as one row per variant and a column per target: the knob value chosen and its KL on the
    calibration seed where reached, else the status with the closest KL reached (what the report prints)."""
    def cell(row: Any) -> str:
        knob = str(row["key"]).rsplit(".", 1)[-1]
        closest = "" if row["kl"] != row["kl"] else f"{row['kl']:.3g}"  # NaN: no run has a KL
        if row["status"] == "reached":
            return f"{knob}={row['value']:g} ({closest})"
        return f"{row['status']} ({closest or 'no KL'})"

    view = table.assign(cell=[cell(r) for _, r in table.iterrows()])
    order = list(dict.fromkeys(table["variant"]))
    out = view.pivot(index="variant", columns="target", values="cell").reindex(order)
    out.columns = [f"KL {t:g}" for t in out.columns]
    return out.assign(runs=table.groupby("variant")["search_runs"].first().reindex(order))
