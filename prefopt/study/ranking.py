"""Rank losses by gold reward at matched KL and by the gap to the exact frontier, with intervals that do not favour
a loss by accident.

Preference accuracy does not rank losses on the built-in task (docs/gold_task.md, 'Preference accuracy does not rank
losses'), and the same numeric beta means different things across losses (there, 'The same beta means different
things across losses'), so losses are compared where they stand at the *same* KL:

- A curve is one loss setting swept along its hyperparameters (a grid variant, with everything else but the seed
  fixed): for each seed, its runs are points along the sampled KL.
- **The gap is interpolated, not the reward.** Reward is concave in KL, so a chord between two runs lies below the
  curve, the more so where runs are sparse: interpolating rewards would charge a loss for its grid's spacing. The gap
  to the exact frontier, frontier(KL) - reward, is what is interpolated (linearly along KL, never extrapolated), and
  the reward at a target KL is frontier(target) - gap: runs that lie on the frontier give a gap of exactly 0.
- **Common seeds.** Which seeds of a curve reach a KL depends on the outcome; at each target KL, curves are compared
  on the seeds that cover it for every curve compared there (a curve that would leave fewer than two is not
  compared at that KL).
- **Selection-aware intervals.** The leader and each curve's best setting are chosen on the same seeds whose
  interval is reported; those intervals come from a bootstrap over seeds that repeats the selection in every
  resample (the basic bootstrap, which also corrects the selection's bias: `.corrected`). A curve's difference to
  the best *other* curve is negative when it leads; its interval excluding 0 is a lead that survives the selection.
- The overall score of a curve is its mean gap over 5 KLs spread (geometrically) across the range every curve and
  every seed covers (a curve whose KL never meets the others' is left out and listed unranked). Seeds redraw the
  pairs, and a seed's pairs are the same for every loss, so differences between curves are paired by seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from prefopt.study.tables import add_curves, curve_columns, group_columns, t_pvalue, t_quantile

KL, REWARD, GAP = "val/gold/sampled_kl", "val/gold/gold_reward", "val/gold/frontier_gap"
ACCURACY, MARGIN = "val/accuracy", "val/margin_nats"
NICE_KLS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
BOOTSTRAP = 2000  # resamples of the seeds for the selection-aware intervals (fixed generator: tables reproduce)
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
    """Rows (curve, seed, kl, reward, gap): each seed's gap to the frontier interpolated along its runs' KLs at each
    target, and reward = frontier(target) - gap (NaN outside the seed's KL range)."""
    frontier = frontier or default_frontier()
    best = {k: frontier(k) for k in targets}
    rows = []
    for (curve, seed), g in with_curves(runs).groupby(["curve", "seed"], sort=False):
        gaps = interpolate(g[KL], [frontier(k) - r for k, r in zip(g[KL], g[REWARD])], targets)
        rows += [{"curve": curve, "seed": seed, "kl": k, "reward": best[k] - gap, "gap": gap}
                 for k, gap in zip(targets, gaps)]
    return pd.DataFrame(rows, columns=["curve", "seed", "kl", "reward", "gap"])


def best_other(means: np.ndarray) -> np.ndarray:
    """For each column, the index of the smallest of the *other* columns (along the last axis)."""
    order = np.argsort(means, axis=-1, kind="stable")
    first, second = order[..., :1], order[..., 1:2]
    return np.where(np.arange(means.shape[-1]) == first, second, first)


def _pick(x: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """x's values at `columns` along the last axis (indices broadcast over x's leading axes)."""
    return np.take_along_axis(x, np.broadcast_to(columns, x.shape[:-1] + columns.shape[-1:]), axis=-1)


def minus_best_other(x: np.ndarray, on: np.ndarray) -> np.ndarray:
    """Each column of x minus x's column that is the smallest *other* one in the means `on` (negative where a
    column is the smallest): with x = on, each curve against the best of the rest."""
    return x - _pick(x, best_other(on))


def smallest(x: np.ndarray, on: np.ndarray) -> np.ndarray:
    """x's column that is the smallest in the means `on`, kept as a (..., 1) axis: a curve's best setting."""
    return _pick(x, np.argmin(on, axis=-1)[..., None])


def selection_aware(values: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    resamples: int = BOOTSTRAP) -> tuple[np.ndarray, ...]:
    """(observed, bias-corrected, lo, hi) of statistic(means, means) for `values` (seeds, columns), a statistic
    that selects among the columns by their means (`minus_best_other`, `smallest`).

    The basic bootstrap over seeds repeats the selection in every resample: it gives the bias of the selection
    (corrected = 2 observed - mean of the resamples) and its share of the uncertainty. With few seeds a bootstrap
    knows too few distinct resamples to show the seed-to-seed spread, so the interval is the wider, on each side, of
    the bootstrap's and a t interval around the corrected value (Student t over the seeds of statistic(values,
    means): each seed's value with the observed choice held fixed). Fewer than 2 seeds: NaN bounds.
    """
    if len(values) < 2:
        zeros = np.zeros(values.shape[1:])
        nan = np.full(statistic(zeros, zeros).shape, math.nan)
        return (statistic(values.mean(0), values.mean(0)) if len(values) else nan), nan, nan, nan
    n, means = len(values), values.mean(0)
    observed = statistic(means, means)
    rng = np.random.default_rng(0)
    resampled = values[rng.integers(0, n, (resamples, n))].mean(1)  # (resamples, columns)
    boot = statistic(resampled, resampled)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    corrected = 2 * observed - boot.mean(0)
    half = t_quantile(n) * statistic(values, means).std(0, ddof=1) / math.sqrt(n)
    return observed, corrected, np.minimum(2 * observed - high, corrected - half), \
        np.maximum(2 * observed - low, corrected + half)


def compared_on(seeds: pd.DataFrame) -> tuple[list, list]:
    """(curves, seeds) to compare at one target KL: the seeds that cover it for every curve compared, leaving out
    (fewest covered seeds first) any curve that would leave fewer than two such seeds."""
    covered = {c: set(g.loc[g["reward"].notna(), "seed"]) for c, g in seeds.groupby("curve", sort=False)}
    curves = [c for c, s in covered.items() if s]
    while len(curves) > 1 and len(set.intersection(*(covered[c] for c in curves))) < 2:
        curves.remove(min(curves, key=lambda c: len(covered[c])))
    common = set.intersection(*(covered[c] for c in curves)) if curves else set()
    return curves, sorted(common)


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
    """Per (curve, target KL), on the seeds that cover that KL for every curve compared (`compared_on`): n, reward
    and gap mean/s.d./ci95, the rank by reward, and `behind_best`: the best other curve's reward minus this one's,
    paired by seed, with a selection-aware interval (negative: this curve leads)."""
    seeds = per_seed(runs, targets, frontier)
    rows = []
    for kl, at in seeds.groupby("kl", sort=False):
        curves, common = compared_on(at)
        wide = at.pivot_table(index="seed", columns="curve", values="reward", dropna=False).reindex(common)
        behind = {}
        if len(curves) > 1 and len(common) > 1:
            obs, corrected, lo, hi = selection_aware(-wide[curves].to_numpy(), minus_best_other)  # higher is better
            behind = {c: (obs[i], corrected[i], lo[i], hi[i]) for i, c in enumerate(curves)}
        for curve, g in at.groupby("curve", sort=False):
            on = g[g["seed"].isin(common)] if curve in curves else g.iloc[:0]
            n, mean, std, ci = _stats(on["reward"])
            _, gap, _, gap_ci = _stats(on["gap"])
            b = behind.get(curve, (math.nan,) * 4)
            rows.append({"curve": curve, "kl": kl, "n": n, "covered": int(g["reward"].notna().sum()),
                         "reward.mean": mean, "reward.std": std, "reward.ci95": ci, "gap.mean": gap,
                         "gap.ci95": gap_ci, "behind_best.mean": b[0], "behind_best.corrected": b[1],
                         "behind_best.lo": b[2], "behind_best.hi": b[3]})
    out = pd.DataFrame(rows, columns=["curve", "kl", "n", "covered", "reward.mean", "reward.std", "reward.ci95",
                                      "gap.mean", "gap.ci95", "behind_best.mean", "behind_best.corrected",
                                      "behind_best.lo", "behind_best.hi"])
    out.insert(3, "rank", out.groupby("kl")["reward.mean"].rank(ascending=False, method="min"))
    return out.sort_values(["kl", "rank"], kind="stable").reset_index(drop=True)


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
    """One row per curve, best first: mean gap over the common KL range, its difference to the best other curve
    (paired by seed, selection-aware), the best gap over the curve's settings (selection-aware), the curve's KL span
    and its accuracy (not ranked on)."""
    curves = with_curves(runs)
    lo, hi, left_out = common_kl_range(runs) if len(curves) else (math.nan, math.nan, [])
    if not (lo > 0 and hi > lo):  # no KL range that every kept curve covers (two disjoint curves): nothing ranked
        lo, hi, left_out = math.nan, math.nan, list(curves["curve"].unique())
    targets = list(np.geomspace(lo, hi, points)) if lo > 0 else []
    ranked = curves[~curves["curve"].isin(left_out)]
    scores = per_seed(ranked, targets, frontier).groupby(["curve", "seed"])[["gap", "reward"]].mean()
    settings = [c for c in group_columns(runs) if c not in curve_columns(runs)]  # what varies along a curve
    rows = []
    for curve, g in curves.groupby("curve", sort=False):
        row: dict[str, object] = {"curve": curve, "loss": g["loss"].iloc[0], "seeds": g["seed"].nunique(),
                                  "ranked": curve not in left_out}
        s = scores.loc[curve] if curve in scores.index.get_level_values(0) else pd.DataFrame(columns=["gap", "reward"])
        row["matched_kl_lo"], row["matched_kl_hi"] = lo, hi
        _, row["matched_gap.mean"], _, row["matched_gap.ci95"] = _stats(s["gap"])
        _, row["matched_reward.mean"], _, row["matched_reward.ci95"] = _stats(s["reward"])
        row.update(best_setting(g, settings))
        cols = [KL, ACCURACY]
        means = g.groupby(settings, dropna=False)[cols].mean() if settings else g[cols].mean().to_frame().T
        row["kl.min"], row["kl.max"] = float(means[KL].min()), float(means[KL].max())
        row["kl_monotone"] = kl_monotone(g, settings)
        row["accuracy.min"], row["accuracy.max"] = float(means[ACCURACY].min()), float(means[ACCURACY].max())
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out = out.sort_values(["matched_gap.mean", "best_gap.mean"], na_position="last", kind="stable")
    out = out.reset_index(drop=True)
    out.insert(0, "rank", [i + 1 if ok else math.nan for i, ok in enumerate(out["ranked"])])
    # Paired by seed (a seed's pairs are the same for every loss), on the seeds every ranked curve has.
    names = [c for c in out["curve"] if c in scores.index.get_level_values(0)]
    wide = scores["gap"].unstack("curve").reindex(columns=names).dropna() if names else pd.DataFrame()
    versus = {}
    if len(names) > 1 and len(wide) > 1:
        obs, corrected, low, high = selection_aware(wide.to_numpy(), minus_best_other)
        versus = {c: (obs[i], corrected[i], low[i], high[i]) for i, c in enumerate(names)}
    for j, key in enumerate(("mean", "corrected", "lo", "hi")):
        out[f"gap_vs_best_other.{key}"] = [versus.get(c, (math.nan,) * 4)[j] for c in out["curve"]]
    return out


def kl_monotone(g: pd.DataFrame, settings: list[str]) -> bool | None:
    """Whether the curve's mean KL moves one way along the one setting it sweeps (None: it sweeps none or several).
    A non-monotone curve (SimPO's beta, say) is still compared along KL, but its points are not in its knob's order:
    the tables and the report flag it rather than sort it silently."""
    varying = [c for c in settings if g[c].nunique() > 1]
    if len(varying) != 1 or not pd.api.types.is_numeric_dtype(g[varying[0]]):
        return None
    steps = np.diff(g.groupby(varying[0])[KL].mean().sort_index().to_numpy())
    return bool((steps > 0).all() or (steps < 0).all())


def best_setting(g: pd.DataFrame, settings: list[str]) -> dict[str, object]:
    """The curve's setting with the smallest mean gap (`best_gap.*`): its observed mean (optimistic: it is the
    minimum of several noisy means), the bias-corrected value and interval of a bootstrap that repeats the choice
    over the seeds every setting has, the setting's values that vary along the curve and its mean KL."""
    label = pd.Series([" ".join(map(str, row)) for row in g[settings].itertuples(index=False)], index=g.index)
    gaps = g.assign(setting=label).pivot_table(index="seed", columns="setting", values=GAP)
    best = gaps.mean().idxmin()
    _, corrected, low, high = selection_aware(gaps.dropna().to_numpy(), smallest)
    chosen = g[label == best]
    varying = [c for c in settings if g[c].nunique() > 1]
    return {"best_gap.mean": float(gaps[best].mean()), "best_gap.corrected": float(corrected[0]),
            "best_gap.lo": float(low[0]), "best_gap.hi": float(high[0]),
            "best_gap.setting": " ".join(f"{c.rsplit('.', 1)[-1]}={_fmt(chosen[c].iloc[0])}" for c in varying),
            "best_gap.kl": float(chosen[KL].mean())}


def target_runs(runs: pd.DataFrame, calibration: pd.DataFrame) -> dict[tuple[float, str], pd.DataFrame]:
    """A calibrating grid's ok runs at the knob value its calibration chose, by (target, variant): reached targets only."""
    curves, out = with_curves(runs), {}
    for _, c in calibration[calibration["status"] == "reached"].iterrows():
        column = str(c["key"]).replace("model.loss.", "loss.", 1)
        out[float(c["target"]), c["variant"]] = curves[(curves["variant"] == c["variant"])
                                                       & np.isclose(curves[column].astype(float), c["value"])]
    return out


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> np.ndarray:
    """Holm's step-down test: which of m hypotheses are rejected with the family-wise error held at `alpha` (the
    smallest p against alpha / m, the next against alpha / (m - 1), ..., stopping at the first that fails)."""
    p = np.asarray(pvalues, dtype=float)
    rejected = np.zeros(len(p), dtype=bool)
    order = [i for i in np.argsort(p, kind="stable") if not math.isnan(p[i])]
    for rank, i in enumerate(order):
        if p[i] > alpha / (len(order) - rank):
            break
        rejected[i] = True
    return rejected


def vs_baseline(wide: pd.DataFrame, baseline: str) -> dict[str, dict[str, object]]:
    """Each other column's gap minus the baseline's, paired by seed (rows): mean, 95% t interval, two-sided p, and
    `vs_baseline`: "better"/"worse" where Holm's test across these comparisons resolves it at 5%, else "not resolved".
    The baseline is named before the runs (not chosen on them), so a plain paired t interval is unbiased; Holm keeps
    the chance of any false "better"/"worse" among the many comparisons of a catalog at 5%."""
    others = [c for c in wide.columns if c != baseline]
    diffs = wide[others].sub(wide[baseline], axis=0)
    n, out = len(diffs), {}
    mean, sd = diffs.mean(), diffs.std(ddof=1)
    half = t_quantile(n) * sd / math.sqrt(n)
    p = [t_pvalue(float(m / (s / math.sqrt(n))) if s > 0 else (0.0 if m == 0 else math.inf), n)
         for m, s in zip(mean, sd)]
    resolved = holm(p)
    for i, c in enumerate(others):
        verdict = ("worse" if mean[c] > 0 else "better") if resolved[i] else "not resolved"
        out[c] = {"gap_vs_baseline.mean": mean[c], "gap_vs_baseline.lo": mean[c] - half[c],
                  "gap_vs_baseline.hi": mean[c] + half[c], "gap_vs_baseline.p": p[i], "vs_baseline": verdict}
    return out


def at_targets(runs: pd.DataFrame, calibration: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """A calibrating grid's comparison at its KL targets, without interpolation: per (target, curve), the runs at the
    knob value the calibration chose (`calibration.csv`, reached targets only), their KL, reward and frontier gap
    (mean and 95% t half-width over seeds), and `gap_vs_best_other`: this curve's gap minus the best other curve's at
    that target, paired by seed on the seeds all have, with a selection-aware interval (negative: this curve leads).
    `standing` says best, tied or behind (`standing`). With a `baseline` curve (named in advance, e.g. dpo), also
    each curve against it (`vs_baseline`), where it reached the target. The gap, not the reward, is compared: it
    allows for the few percent by which the runs' KLs miss the target."""
    runs_at, rows = target_runs(runs, calibration), []
    for target, chosen in calibration[calibration["status"] == "reached"].groupby("target"):
        gaps, here = {}, {}
        for _, c in chosen.iterrows():
            column = str(c["key"]).replace("model.loss.", "loss.", 1)
            at = runs_at[float(target), c["variant"]]
            gaps[c["variant"]] = at.set_index("seed")[GAP]
            row = here[c["variant"]] = {"target": target, "curve": c["variant"], "knob": column, "value": c["value"]}
            for name, metric in (("kl", KL), ("reward", REWARD), ("gap", GAP)):
                row["n"], row[f"{name}.mean"], _, row[f"{name}.ci95"] = _stats(at[metric])
        wide = pd.DataFrame(gaps).dropna()
        if wide.shape[1] > 1 and len(wide) > 1:
            obs, _, low, high = selection_aware(wide.to_numpy(), minus_best_other)  # the smallest gap is the best
            against = vs_baseline(wide, baseline) if baseline in wide.columns else {}
            for i, name in enumerate(wide.columns):
                here[name].update({"gap_vs_best_other.mean": obs[i], "gap_vs_best_other.lo": low[i],
                                   "gap_vs_best_other.hi": high[i], "seeds_compared": len(wide)})
                if name in against:
                    here[name].update({"baseline": baseline, **against[name]})
        rows += here.values()
    table = pd.DataFrame(rows)
    return table.assign(standing=standing(table)) if len(table) else table


def standing(table: pd.DataFrame) -> pd.Series:
    """Each row of `at_targets` at its target: "best" (the smallest gap on the paired seeds), "tied" (its paired,
    selection-aware interval against the best includes 0: not told apart from it) or "behind" (the interval excludes
    0); "" without a paired comparison (one curve, or one seed)."""
    out = pd.Series("", index=table.index, dtype=object)
    if "gap_vs_best_other.lo" not in table:
        return out
    for _, rows in table.groupby("target"):
        paired = rows[rows["gap_vs_best_other.lo"].notna()]
        if paired.empty:
            continue
        best = paired["gap_vs_best_other.mean"].idxmin()  # the leader on the paired seeds (its value is negative)
        out[paired.index] = np.where(paired["gap_vs_best_other.lo"] > 0, "behind", "tied")
        out[best] = "best"
    return out


def standing_of(table: pd.DataFrame) -> pd.Series:
    """The `standing` column of an `at_targets` table ("" where a CSV read left it empty), or `standing` computed
    for a table without one."""
    return table["standing"].fillna("").astype(str) if "standing" in table else standing(table)
