"""Scenario verdicts: what a scenario's runs say about the predictions its grid file wrote before them
(`prefopt.study.scenarios`): per prediction and reached KL target, the paired effect, its 95% t interval and
confirmed / refuted / unresolved; and every scenario's verdicts as one Markdown table."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from prefopt.study.ranking import KL, target_runs
from prefopt.study.scenarios import SCENARIO_FILE, read_scenario
from prefopt.study.tables import t_quantile

VERDICTS_FILE = "verdicts.csv"
MAX_SEEDS = 10_000


def seeds_to_resolve(distance: float, sd: float, n: int) -> float:
    """The fewest seeds whose 95% t interval, at this spread, is narrower than `distance` (the observed effect's
    distance to the decision's boundary: 0, or +-margin); inf when the effect sits on the boundary."""
    if not math.isfinite(distance) or not math.isfinite(sd) or distance <= 0:
        return math.inf
    narrow = lambda m: t_quantile(m) * sd / math.sqrt(m) < distance  # noqa: E731  (the half-width falls with m)
    lo, hi = max(n, 2), MAX_SEEDS
    if not narrow(hi):
        return math.inf
    while lo < hi:  # bisection: the first m that is narrow enough (each t quantile costs O(m))
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if narrow(mid) else (mid + 1, hi)
    return lo


def _decide(p: Mapping[str, Any], mean: float, lo: float, hi: float) -> tuple[str, float]:
    """(verdict, distance of the effect to the boundary that decides it) for a prediction and its interval."""
    if "same" in p:
        m = p["margin"]
        verdict = "confirmed" if -m < lo and hi < m else "refuted" if lo > m or hi < -m else "unresolved"
        return verdict, abs(abs(mean) - m)
    return ("confirmed" if lo > 0 else "refuted" if hi < 0 else "unresolved"), abs(mean)


def verdicts(runs: pd.DataFrame, calibration: pd.DataFrame, scenario: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (prediction, reached KL target): the paired effect, its interval and the verdict. The effect is
    better - worse of the metric, signed so that positive favours `better` (for `same`: first - second, unsigned)."""
    metric, sign = scenario["metric"], 1.0 if scenario["higher_is_better"] else -1.0
    at = target_runs(runs, calibration)
    rows = []
    for p in scenario["predictions"]:
        first, second = p["same"] if "same" in p else (p["better"], p["worse"])
        for target in sorted({t for t, _ in at}):
            row = {"prediction": "same" if "same" in p else "better", "first": first, "second": second,
                   "margin": p.get("margin", math.nan), "target_kl": target, "metric": metric}
            if (target, first) not in at or (target, second) not in at:
                rows.append({**row, "verdict": "not reached"})  # a variant's calibration missed this target
                continue
            a, b = (at[target, v].set_index("seed")[metric] for v in (first, second))
            d = ((a - b) * (1.0 if "same" in p else sign)).dropna()  # paired by seed
            n = len(d)
            mean = float(d.mean()) if n else math.nan
            sd = float(d.std(ddof=1)) if n > 1 else math.nan
            half = t_quantile(n) * sd / math.sqrt(n) if n > 1 else math.nan
            verdict, distance = _decide(p, mean, mean - half, mean + half)
            rows.append({**row, "seeds": n, "effect": mean, "lo": mean - half, "hi": mean + half, "verdict": verdict,
                         "seeds_to_resolve": seeds_to_resolve(distance, sd, n) if verdict == "unresolved" else n,
                         "first_kl": float(at[target, first][KL].mean()),
                         "second_kl": float(at[target, second][KL].mean())})
    return pd.DataFrame(rows)


def markdown(folders: Sequence[Path]) -> str:
    """Every scenario's verdicts as one Markdown table (what results/scenarios/README.md shows)."""
    lines = ["| scenario | claim (source) | prediction | KL | effect [95% CI] | seeds | verdict |",
             "|---|---|---|---|---|---|---|"]
    for folder in folders:
        scenario, table = read_scenario(folder), folder / VERDICTS_FILE
        if scenario is None or not table.is_file():
            continue
        for i, (_, r) in enumerate(pd.read_csv(table).iterrows()):
            effect = "" if r["verdict"] == "not reached" else f"{r['effect']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
            more = f" ({r['seeds_to_resolve']:.0f} seeds would resolve it)" if r["verdict"] == "unresolved" and \
                math.isfinite(r["seeds_to_resolve"]) else ""
            said = f"{r['first']} beats {r['second']}" if r["prediction"] == "better" else \
                f"{r['first']} matches {r['second']} within {r['margin']:g}"
            seeds = "" if r["verdict"] == "not reached" else f"{r['seeds']:.0f}"
            claim = f"{scenario['claim']} ({scenario['source']})" if i == 0 else ""  # once per scenario
            lines.append(f"| {folder.name if i == 0 else ''} | {claim} | {said} | {r['target_kl']:g} | "
                         f"{effect} | {seeds} | {r['verdict']}{more} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m prefopt.study.verdicts results/scenarios`: print every scenario's verdict table (Markdown); given
    one scenario's folder (results/online), its table."""
    root = Path((argv if argv is not None else sys.argv[1:] or ["results/scenarios"])[0])
    folders = [root] if (root / SCENARIO_FILE).is_file() else sorted(p for p in root.iterdir()
                                                                     if (p / SCENARIO_FILE).is_file())
    sys.stdout.write(markdown(folders))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
