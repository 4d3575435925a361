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


def seeds_to_resolve(mean: float, sd: float, n: int) -> float:
    """The fewest seeds whose 95% t interval, at this mean and spread, excludes 0 (inf for a zero effect)."""
    if not math.isfinite(mean) or not math.isfinite(sd) or mean == 0:
        return math.inf
    for m in range(max(n, 2), MAX_SEEDS + 1):
        if t_quantile(m) * sd / math.sqrt(m) < abs(mean):
            return m
    return math.inf


def verdicts(runs: pd.DataFrame, calibration: pd.DataFrame, scenario: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (prediction, reached KL target): the paired effect, its interval and the verdict."""
    metric, sign = scenario["metric"], 1.0 if scenario["higher_is_better"] else -1.0
    at = target_runs(runs, calibration)
    rows = []
    for p in scenario["predictions"]:
        for target in sorted({t for t, _ in at}):
            row = {"better": p["better"], "worse": p["worse"], "target_kl": target, "metric": metric}
            if (target, p["better"]) not in at or (target, p["worse"]) not in at:
                rows.append({**row, "verdict": "not reached"})  # a variant's calibration missed this target
                continue
            better = at[target, p["better"]].set_index("seed")[metric]
            worse = at[target, p["worse"]].set_index("seed")[metric]
            d = (sign * (better - worse)).dropna()  # positive: `better` is better, paired by seed
            n = len(d)
            mean = float(d.mean()) if n else math.nan
            sd = float(d.std(ddof=1)) if n > 1 else math.nan
            half = t_quantile(n) * sd / math.sqrt(n) if n > 1 else math.nan
            lo, hi = mean - half, mean + half
            verdict = "confirmed" if lo > 0 else "refuted" if hi < 0 else "unresolved"
            rows.append({**row, "seeds": n, "effect": mean, "lo": lo, "hi": hi, "verdict": verdict,
                         "seeds_to_resolve": seeds_to_resolve(mean, sd, n) if verdict == "unresolved" else n,
                         "better_kl": float(at[target, p["better"]][KL].mean()),
                         "worse_kl": float(at[target, p["worse"]][KL].mean())})
    return pd.DataFrame(rows)


def markdown(folders: Sequence[Path]) -> str:
    """Every scenario's verdicts as one Markdown table (what results/scenarios/README.md shows)."""
    lines = ["| scenario | claim (source) | prediction | KL | effect [95% CI] | seeds | verdict |",
             "|---|---|---|---|---|---|---|"]
    for folder in folders:
        scenario, table = read_scenario(folder), folder / VERDICTS_FILE
        if scenario is None or not table.is_file():
            continue
        for _, r in pd.read_csv(table).iterrows():
            effect = "" if r["verdict"] == "not reached" else f"{r['effect']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
            more = f" ({r['seeds_to_resolve']:.0f} seeds would resolve it)" if r["verdict"] == "unresolved" and \
                math.isfinite(r["seeds_to_resolve"]) else ""
            lines.append(f"| {folder.name} | {scenario['claim']} ({scenario['source']}) | {r['better']} beats "
                         f"{r['worse']} | {r['target_kl']:g} | {effect} | {r.get('seeds', '')} | {r['verdict']}{more} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m prefopt.study.verdicts results/scenarios`: print every scenario's verdict table (Markdown)."""
    root = Path((argv if argv is not None else sys.argv[1:] or ["results/scenarios"])[0])
    sys.stdout.write(markdown(sorted(p for p in root.iterdir() if (p / SCENARIO_FILE).is_file())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
