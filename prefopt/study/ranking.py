"""Rank losses by gold reward at matched KL and by the gap to the exact frontier, with confidence intervals.

Preference accuracy does not rank losses on the built-in task (docs/gold_task.md, 'Preference accuracy does not rank
losses'), and the same numeric beta means different things across losses (there, 'The same beta means different
things across losses'), so losses are compared where they stand at the *same* KL:

- A curve is one loss setting swept along its hyperparameters (a grid variant, with everything else but the seed
  fixed): for each seed, its runs are points (sampled KL, gold reward), linearly interpolated along KL. No
  extrapolation: a target KL outside a seed's range gives no value for that seed.
- At each target KL, the reward of each seed's curve; mean, s.d. and a 95% t interval across seeds. The gap to the
  frontier there is frontier(KL) - reward: at matched KL it ranks exactly as the reward does.
- The overall score of a curve is its mean gap over 5 KLs spread (geometrically) across the range every curve and
  every seed covers (a curve whose KL never meets the others' is left out and listed unranked). Seeds redraw the
  pairs, and a seed's pairs are the same for every loss, so differences to the best curve are paired by seed.
- The best gap over a curve's settings (the setting with the smallest mean gap) is reported with its interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from prefopt.study.tables import add_curves, group_columns, t_quantile

KL, REWARD, GAP = "val/gold/sampled_kl", "val/gold/gold_reward", "val/gold/frontier_gap"
ACCURACY, MARGIN = "val/accuracy", "val/margin_nats"
NICE_KLS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MIN_RANGE_RATIO = 1.5  # a matched-KL range narrower than this factor (hi / lo) compares too little
Frontier = Callable[[float], float]


def default_frontier() -> Frontier:
    from prefopt.gold.task import frontier_reward_at_kl

    return frontier_reward_at_kl


def with_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """The ok runs that have gold metrics, with their `curve` label (added if the table has none)."""
    runs = runs if "curve" in runs else add_curves(runs)
    return runs[(runs["status"] == "ok") & runs[KL].notna() & runs[REWARD].notna()]


def interpolate(x: Sequence[float], y: Sequence[float], targets: Sequence[float]) -> np.ndarray:
    """y at each target x, linear along the points sorted by x; NaN outside [min x, max x]."""
    x, y, t = np.asarray(x, float), np.asarray(y, float), np.asarray(targets, float)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    out = np.interp(t, x, y)
    out[(t < x[0]) | (t > x[-1])] = np.nan
    return out


def per_seed(runs: pd.DataFrame, targets: Sequence[float], frontier: Frontier | None = None) -> pd.DataFrame:
    """Rows (curve, seed, kl, reward, gap): each seed's curve interpolated at each target KL."""
    frontier = frontier or default_frontier()
    best = {k: frontier(k) for k in targets}
    rows = []
    for (curve, seed), g in with_curves(runs).groupby(["curve", "seed"], sort=False):
        rewards = interpolate(g[KL], g[REWARD], targets)
        rows += [{"curve": curve, "seed": seed, "kl": k, "reward": r, "gap": best[k] - r}
                 for k, r in zip(targets, rewards)]
    return pd.DataFrame(rows, columns=["curve", "seed", "kl", "reward", "gap"])


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _stats(x: pd.Series) -> tuple[int, float, float, float]:
    """(n, mean, s.d., 95% t half-width) of the non-NaN values."""
    x = x.dropna().astype(float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    return n, mean, std, t_quantile(n) * std / math.sqrt(n) if n > 1 else math.nan


def matched_kl(runs: pd.DataFrame, targets: Sequence[float], frontier: Frontier | None = None) -> pd.DataFrame:
    """Per (curve, target KL): n seeds, reward and gap mean/s.d./ci95, the rank by reward at that KL, and the
    reward's difference to the best curve there, paired by seed (`behind_best`: best minus this curve)."""
    seeds = per_seed(runs, targets, frontier)
    rows = []
    for (curve, kl), g in seeds.groupby(["curve", "kl"], sort=False):
        n, mean, std, ci = _stats(g["reward"])
        _, gap, _, gap_ci = _stats(g["gap"])
        rows.append({"curve": curve, "kl": kl, "n": n, "reward.mean": mean, "reward.std": std, "reward.ci95": ci,
                     "gap.mean": gap, "gap.ci95": gap_ci})
    columns = ["curve", "kl", "n", "reward.mean", "reward.std", "reward.ci95", "gap.mean", "gap.ci95"]
    out = pd.DataFrame(rows, columns=columns)
    out["rank"] = out.groupby("kl")["reward.mean"].rank(ascending=False, method="min")
    out = out.sort_values(["kl", "rank"], kind="stable").reset_index(drop=True)
    wide = seeds.pivot_table(index=["kl", "seed"], columns="curve", values="reward", dropna=False)
    behind = []
    for curve, kl, rank in zip(out["curve"], out["kl"], out["rank"]):
        leaders = out[(out["kl"] == kl) & (out["rank"] == 1)]["curve"]
        if pd.isna(rank) or leaders.empty:
            behind.append((math.nan, math.nan))
            continue
        at = wide.loc[kl]
        _, mean, _, ci = _stats(at[leaders.iloc[0]] - at[curve])
        behind.append((mean, ci))
    out["behind_best.mean"], out["behind_best.ci95"] = zip(*behind) if behind else ([], [])
    return out


def common_kl_range(runs: pd.DataFrame) -> tuple[float, float, list[str]]:
    """(lo, hi, left out): the KL range every seed of every ranked curve covers, and the curves left out of it.

    The range is [largest minimum, smallest maximum] of the sampled KL over every (curve, seed). A loss whose KL
    never meets the others' cannot be compared with them at matched KL: while the range spans less than a factor
    MIN_RANGE_RATIO, the curve whose removal widens it most is left out (never below two curves).
    """
    spans = with_curves(runs).groupby(["curve", "seed"])[KL].agg(["min", "max"])
    per_curve = spans.groupby("curve").agg(lo=("min", "max"), hi=("max", "min"))  # each curve's all-seed range

    def log_width(names: list[str]) -> float:
        lo, hi = per_curve.loc[names, "lo"].max(), per_curve.loc[names, "hi"].min()
        return math.log(max(hi, 1e-3)) - math.log(max(lo, 1e-3))

    kept = list(per_curve.index)
    while len(kept) > 2 and log_width(kept) < math.log(MIN_RANGE_RATIO):
        kept.remove(max(kept, key=lambda c: log_width([k for k in kept if k != c])))
    lo, hi = float(per_curve.loc[kept, "lo"].max()), float(per_curve.loc[kept, "hi"].min())
    return lo, hi, [c for c in per_curve.index if c not in kept]


def ranking(runs: pd.DataFrame, frontier: Frontier | None = None, points: int = 5) -> pd.DataFrame:
    """One row per curve, best first: mean gap over the common KL range (with a paired difference to the best),
    reward there, the best gap over the curve's settings, the curve's KL span and its accuracy (not ranked on)."""
    curves = with_curves(runs)
    lo, hi, left_out = common_kl_range(runs) if len(curves) else (math.nan, math.nan, [])
    if not (lo > 0 and hi > lo):  # no KL range that every kept curve covers (two disjoint curves): nothing ranked
        lo, hi, left_out = math.nan, math.nan, list(curves["curve"].unique())
    targets = list(np.geomspace(lo, hi, points)) if lo > 0 else []
    ranked = curves[~curves["curve"].isin(left_out)]
    scores = per_seed(ranked, targets, frontier).groupby(["curve", "seed"])[["gap", "reward"]].mean()
    settings = [c for c in group_columns(runs) if c.startswith("loss.")]
    rows = []
    for curve, g in curves.groupby("curve", sort=False):
        row: dict[str, object] = {"curve": curve, "loss": g["loss"].iloc[0], "seeds": g["seed"].nunique(),
                                  "ranked": curve not in left_out}
        s = scores.loc[curve] if curve in scores.index.get_level_values(0) else pd.DataFrame(columns=["gap", "reward"])
        row["matched_kl_lo"], row["matched_kl_hi"] = lo, hi
        _, row["matched_gap.mean"], _, row["matched_gap.ci95"] = _stats(s["gap"])
        _, row["matched_reward.mean"], _, row["matched_reward.ci95"] = _stats(s["reward"])
        by_setting = g.groupby(settings, dropna=False, sort=False) if settings else [((), g)]
        best = min(by_setting, key=lambda item: item[1][GAP].mean())
        _, row["best_gap.mean"], _, row["best_gap.ci95"] = _stats(best[1][GAP])
        varying = [c for c in settings if g[c].nunique() > 1]
        row["best_gap.setting"] = " ".join(f"{c[5:]}={_fmt(best[1][c].iloc[0])}" for c in varying)
        row["best_gap.kl"] = float(best[1][KL].mean())
        cols = [KL, ACCURACY]
        means = g.groupby(settings, dropna=False)[cols].mean() if settings else g[cols].mean().to_frame().T
        row["kl.min"], row["kl.max"] = float(means[KL].min()), float(means[KL].max())
        row["accuracy.min"], row["accuracy.max"] = float(means[ACCURACY].min()), float(means[ACCURACY].max())
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out = out.sort_values(["matched_gap.mean", "best_gap.mean"], na_position="last", kind="stable")
    out = out.reset_index(drop=True)
    out.insert(0, "rank", [i + 1 if ok else math.nan for i, ok in enumerate(out["ranked"])])
    leader = out["curve"].iloc[0]
    diffs = []
    for curve in out["curve"]:  # paired by seed: a seed's pairs are the same for every loss
        if curve not in scores.index.get_level_values(0) or leader not in scores.index.get_level_values(0):
            diffs.append((math.nan, math.nan))
            continue
        d = (scores.loc[curve]["gap"] - scores.loc[leader]["gap"]).dropna()
        _, mean, _, ci = _stats(d)
        diffs.append((mean, ci))
    out["gap_vs_best.mean"], out["gap_vs_best.ci95"] = zip(*diffs)
    return out
