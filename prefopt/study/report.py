"""`python -m prefopt report results/<grid> [--kl 0.5 1 2] [--no-plots]`: summary, ranking and plots of a grid.

Reads the tables the grid wrote (runs.parquet or runs.csv, summary.csv, history.csv) and writes, beside them:

- frontier.csv: the task's exact optimal frontier (b, kl, reward), so notebooks need nothing from training code;
- best_of_n.csv: best-of-N sampling from the base, exactly (n, kl, reward, frontier_gap): the baseline that trains
  nothing;
- targets.csv: each setting's analytic target where its loss has one (`prefopt.gold.targets`: DPO's population
  optimum with clean labels is pi_ref exp(R / (T beta)), the frontier point at b = T beta (T: the label
  temperature); IPO's and, with the scenario's labeler folded in, cDPO's, robust DPO's and DPO's with flipped or
  length-biased labels; where the reference moves by rule or the pairs come from the policy, RLOO's on the gold
  reward, b = beta, on-policy DPO's, b = T beta, and DPO's after k hard resets, b = T beta / k), with the target's
  own gap to the frontier, next to where its runs landed;
- matched_kl.csv: each curve's gold reward and frontier gap at target KLs, with 95% intervals across seeds, and
  its difference to the best curve there, paired by seed;
- ranking.csv: the curves ranked by their gap to the frontier at matched KL (`prefopt.study.ranking`);
- frontier.png, frontier_gap.png, beta_sweeps.png, curves.png, and diagnostics.png (why a loss loses: support,
  length, entropy, squeezing and log-ratio drift against KL) (`prefopt.study.plots`).

It prints the summary (mean ± 95% CI across seeds), the matched-KL table and the ranking. Preference accuracy is
shown but never ranks (docs/gold_task.md, 'Preference accuracy does not rank losses'). A grid without gold metrics
(another dataset) gets the summary only.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from prefopt.study import ranking as rk
from prefopt.study.calibration import outcome_view
from prefopt.study.scenarios import read_scenario
from prefopt.study.verdicts import VERDICTS_FILE, verdicts
from prefopt.study.tables import write_csv

FRONTIER_B = np.geomspace(0.002, 500.0, 300)  # from (almost) the maximal reward to (almost) the base


def read_tables(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(runs, summary, history) of a results folder."""
    parquet = folder / "runs.parquet"
    if not parquet.is_file() and not (folder / "runs.csv").is_file():
        raise SystemExit(f"error: {folder}: no runs.csv, not a grid's results folder "
                         "(python -m prefopt grid writes one)")
    runs = pd.read_parquet(parquet) if parquet.is_file() else pd.read_csv(folder / "runs.csv")
    summary = pd.read_csv(folder / "summary.csv")
    history_path = folder / "history.csv"
    history = pd.read_csv(history_path) if history_path.is_file() and history_path.stat().st_size > 1 else pd.DataFrame()
    return runs, summary, history


def frontier_table() -> pd.DataFrame:
    from prefopt.gold.task import base_mean_reward, frontier_curve

    kl, reward = frontier_curve(FRONTIER_B)
    rows = pd.DataFrame({"b": FRONTIER_B, "kl": kl, "reward": reward})
    base = pd.DataFrame({"b": [math.inf], "kl": [0.0], "reward": [base_mean_reward()]})
    return pd.concat([rows, base], ignore_index=True).sort_values("kl", ignore_index=True)


BEST_OF_N = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)


def best_of_n_table() -> pd.DataFrame:
    """Best-of-N sampling from the base, exactly (`prefopt.gold.task.best_of_n_curve`): the no-training baseline,
    with its gap to the frontier at its own KL."""
    from prefopt.gold.task import best_of_n_curve, frontier_reward_at_kl

    kl, reward = best_of_n_curve(BEST_OF_N)
    gap = [frontier_reward_at_kl(k) - r if k > 0 else 0.0 for k, r in zip(kl, reward)]
    return pd.DataFrame({"n": BEST_OF_N, "kl": kl, "reward": reward, "frontier_gap": gap})


def loss_targets(runs: pd.DataFrame) -> pd.DataFrame:
    """Per setting (curve, loss hyperparameters, labeler) whose loss has an analytic target on the gold task
    (`prefopt.gold.targets`: DPO, cDPO, robust DPO, IPO; the labeler's temperature, flips and length bias folded
    in): the target's (KL, reward) and its own gap to the frontier, and where the setting's runs landed. Only for
    runs whose reference is the task's (the targets are tilts of the base)."""
    from prefopt.gold.targets import target
    from prefopt.gold.task import frontier_reward_at_kl
    from prefopt.losses import LOSSES

    columns = ["curve", "loss", "beta", "T", "b", "how", "target_kl", "target_reward", "target_gap", "kl", "reward", "n"]
    curves = rk.with_curves(runs)
    if curves.empty or "loss" not in curves or rk.KL not in curves:
        return pd.DataFrame(columns=columns)
    params = [c for c in curves.columns if c.startswith("loss.")]
    data = [c for c in curves.columns if c.startswith("data.gold.")]
    rows = []
    for keys, g in curves.groupby(["curve", "loss", *params, *data], sort=False, dropna=False):
        values = dict(zip(["curve", "loss", *params, *data], keys))
        hyper = {c[5:]: v for c in params if pd.notna(v := values[c])}
        name = LOSSES[values["loss"]].name if values["loss"] in LOSSES else values["loss"]  # cdpo is dpo
        labeler = {c[10:]: values[c] for c in data if _given(values[c])}
        t = float(values["data.gold.label_temperature"]) if _given(values.get("data.gold.label_temperature")) else 1.0
        beta = float(hyper.get("beta", math.nan))
        if _from_task_reference(g):
            found = target(name, hyper, labeler)
            b = t * beta if name == "dpo" and found is not None and found[2] == "closed form" else math.nan
        else:  # the population optimum is a tilt of the run's reference: known where the reference moves by rule
            found, b = _moving_target(g, name, hyper, labeler, t)
        if found is None:
            continue
        kl, reward, how = found
        rows.append({"curve": values["curve"], "loss": values["loss"], "beta": beta, "T": t, "b": b, "how": how,
                     "target_kl": kl, "target_reward": reward, "target_gap": frontier_reward_at_kl(kl) - reward,
                     "kl": g[rk.KL].mean(), "reward": g[rk.REWARD].mean(), "n": len(g)})
    return pd.DataFrame(rows, columns=columns)


# Settings that move the reference during a run, or draw the pairs from the moving policy (a column per key a grid
# assigned, dotted): with any of them on, the population optimum is no tilt of the base.
MOVING = ("model.sft_steps", "model.reference_update", "data.online")


def _off(value: object) -> bool:
    """A moving setting's table cell that leaves the reference where it is (unset, 0 or null)."""
    return not _given(value) or value in (0, "0", "null", "None", False)


def _starts_at_task_reference(runs: pd.DataFrame) -> bool:
    """Whether these runs start from the task's reference as theirs (not a weak start, no SFT stage first)."""
    model = runs["model.model"] if "model.model" in runs else pd.Series(["gold"] * len(runs))
    sft = runs["model.sft_steps"] if "model.sft_steps" in runs else pd.Series([0] * len(runs))
    return bool(model.fillna("gold").eq("gold").all() and sft.map(_off).all())


def _from_task_reference(runs: pd.DataFrame) -> bool:
    """Whether these runs' reference is the task's own throughout (not a weak start, not reset after an SFT stage nor
    updated as TR-DPO's) and their pairs the task's reference samples (not on-policy rounds)."""
    moving = [c for c in runs.columns if c.startswith(MOVING) and not c.endswith(".alpha")]  # alpha alone moves nothing
    return _starts_at_task_reference(runs) and all(runs[c].map(_off).all() for c in moving)


def _moving_target(runs: pd.DataFrame, name: str, hyper: dict, labeler: dict, t: float) -> tuple[tuple | None, float]:
    """((KL, reward, how), b) of the frontier point that runs with a moving reference or on-policy pairs head for,
    where it is known on the built-in task (from its reference, clean labels, the gold reward); (None, nan) else.

    - RLOO on the gold reward maximizes E[R] - beta KL: the frontier point at b = beta.
    - DPO's population optimum is pi_ref exp(R / (T beta)) / Z for pairs from any sampler covering the responses, so
      on-policy pairs leave it where it was (b = T beta); a hard reset of the reference every tau steps (iterative DPO,
      TR-DPO's hard variant, sDPO's stages) makes k = ceil(steps / tau) stages, the k-th optimum's reference the
      (k-1)-th: pi_0 exp(k R / (T beta)) / Z, b = T beta / k, reached if every stage converges.
    A soft update (alpha < 1), a learned reward, IPO on on-policy pairs (its optimum depends on the sampler), a weak
    start or an SFT stage has none here."""
    from prefopt.gold.targets import target
    from prefopt.gold.task import frontier_point

    first = runs.iloc[0]
    cell = lambda key: _json_cell(first.get(key)) if key in runs else None  # noqa: E731
    online, update = cell("data.online") or {}, cell("model.reference_update") or {}
    if not _starts_at_task_reference(runs):
        return None, math.nan
    clean = target("dpo", {"beta": 1.0}, labeler)  # "closed form" only for clean Bradley-Terry labels at T > 0
    if online and online.get("reward", "gold") != "gold" or clean is None or clean[2] != "closed form":
        return None, math.nan  # a learned or user reward, or labels whose noise these closed forms leave out
    if name == "rloo" and online:
        return (*frontier_point(hyper["beta"]), "closed form"), hyper["beta"]
    every, alpha = int(update.get("every", 0) or 0), float(update.get("alpha", 1.0))
    if name != "dpo" or hyper.get("label_smoothing", 0) or (every and alpha != 1.0) or not t > 0:
        return None, math.nan
    steps = float(first.get("trainer.max_steps", 300)) if _given(first.get("trainer.max_steps")) else 300.0
    k = math.ceil(steps / every) if every else 1
    b = t * hyper["beta"] / k
    return (*frontier_point(b), "closed form" + (f", {k} stages converged" if k > 1 else "")), b


def _json_cell(value: object) -> dict | None:
    """A dict-valued grid setting as a results table holds it (JSON text), or None where the run did not set it."""
    if not _given(value) or value in ("", "null", "None"):
        return None
    return value if isinstance(value, dict) else json.loads(str(value))


def _given(value: object) -> bool:
    """A table cell that holds a value (not NaN: a key the run did not set)."""
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def _interval(mean: pd.Series, lo: pd.Series, hi: pd.Series, corrected: pd.Series | None = None) -> pd.Series:
    """`mean [lo, hi]` (or `mean (corrected) [lo, hi]`) cells of a selection-aware interval; `-` where undefined."""
    corrected = [math.nan] * len(mean) if corrected is None else corrected
    return pd.Series([
        "-" if pd.isna(m) else f"{m:+.3f}" + (f" ({c:+.3f})" if pd.notna(c) else "")
        + (f" [{a:+.3f}, {b:+.3f}]" if pd.notna(a) else "")
        for m, a, b, c in zip(mean, lo, hi, corrected)], index=mean.index)


def _pm(mean: pd.Series, ci: pd.Series, digits: int = 3) -> pd.Series:
    return [("-" if pd.isna(m) else f"{m:.{digits}f} ± {c:.{digits}f}" if pd.notna(c) else f"{m:.{digits}f}")
            for m, c in zip(mean, ci)]


def summary_view(points: pd.DataFrame) -> pd.DataFrame:
    """The printed summary: one row per setting, mean ± 95% CI across seeds of the headline metrics."""
    view = pd.DataFrame({"curve": points["curve"]})
    settings = [c for c in points.columns if c not in ("curve", "variant", "loss", "n", "seeds")
                and not c.endswith((".mean", ".std", ".ci95"))]
    swept = [c for c in settings if points.groupby("curve")[c].nunique().max() > 1]  # what varies along a curve
    for c in swept:  # loss hyperparameters, and a knob such as a calibrated learning rate
        view[c.removeprefix("loss.") if c.startswith("loss.") else c.rsplit(".", 1)[-1]] = points[c]
    view["n"] = points["n"]
    for metric, label, digits in ((rk.KL, "KL", 2), (rk.REWARD, "gold reward", 3), (rk.GAP, "frontier gap", 3),
                                  (rk.ACCURACY, "accuracy", 3), (rk.MARGIN, "margin (nats)", 2)):
        if f"{metric}.mean" in points:
            view[label] = _pm(points[f"{metric}.mean"], points[f"{metric}.ci95"], digits)
    return view


def print_report(out: Path, points: pd.DataFrame, matched: pd.DataFrame, ranked: pd.DataFrame) -> None:
    """The summary, the matched-KL tables and the ranking, as text."""
    curves = points["curve"].unique()
    print(f"Summary of {out} (mean ± 95% CI across seeds; KL: sampled KL(pi || pi_ref) in nats)\n")
    print(summary_view(points).to_string(index=False))
    if len(matched):
        frontier = rk.default_frontier()
        cells = matched.assign(cell=_pm(matched["reward.mean"], matched["reward.ci95"]))
        table = cells.pivot(index="curve", columns="kl", values="cell").reindex(curves)
        limit = pd.DataFrame([{k: f"{frontier(k):.3f}" for k in table.columns}], index=["(frontier)"])
        print("\nGold reward at matched KL (interpolated along each curve, per seed; ± 95% CI):\n")
        print(pd.concat([table, limit]).fillna("-").to_string())
        behind = matched.assign(cell=_interval(matched["behind_best.mean"], matched["behind_best.lo"],
                                               matched["behind_best.hi"]))
        print("\nBehind the best other curve at that KL (its reward minus this curve's, paired by seed on the seeds "
              "that cover the KL for every curve; negative: this curve leads; 95% interval of a bootstrap that "
              "repeats the choice of the best):\n")
        print(behind.pivot(index="curve", columns="kl", values="cell").reindex(curves).fillna("-").to_string())
    if len(ranked):
        print_ranking(ranked)


def print_at_targets(table: pd.DataFrame) -> None:
    """A calibrating grid's comparison at its KL targets (`prefopt.study.ranking.at_targets`)."""
    if table.empty:
        return
    print("\nAt the calibration's KL targets (each loss at the knob value found for it; gap to the frontier, lower is "
          "better; vs best other: paired by seed, selection-aware 95% interval):\n")
    view = pd.DataFrame({
        "target": table["target"], "curve": table["curve"], "knob": table["knob"].str.rsplit(".", n=1).str[-1] + "="
        + table["value"].map("{:g}".format), "KL": _pm(table["kl.mean"], table["kl.ci95"], 2),
        "gold reward": _pm(table["reward.mean"], table["reward.ci95"]), "gap": _pm(table["gap.mean"], table["gap.ci95"]),
        "standing": rk.standing_of(table),
        "gap vs best other": _interval(*(_column(table, f"gap_vs_best_other.{k}") for k in ("mean", "lo", "hi"))),
    })
    name = _baseline(table)
    if name is not None:
        view[f"gap vs {name} (Holm)"] = (_interval(*(_column(table, f"gap_vs_baseline.{k}") for k in ("mean", "lo", "hi")))
                                         + " " + table["vs_baseline"].fillna("").astype(str)).str.strip()
    print(view.to_string(index=False))
    print_standings(table)


def print_at_targets_grid(table: pd.DataFrame) -> None:
    """The same comparison as one row per curve and one column per target: the gap to the frontier, marked * (the
    best), = (not told apart from it) and +/- (better/worse than the baseline after Holm); curves in order of their
    mean rank by gap over the targets they reached."""
    if table.empty or table["curve"].nunique() < 2:
        return
    cell = (table["gap.mean"].map("{:.3f}".format) + rk.standing_of(table).map({"best": "*", "tied": "="}).fillna("")
            + _column(table, "vs_baseline").map({"better": "+", "worse": "-"}).fillna(""))
    rank = table.groupby("target")["gap.mean"].rank()
    grid = table.assign(cell=cell).pivot(index="curve", columns="target", values="cell").fillna("")
    grid = grid.loc[rank.groupby(table["curve"]).mean().sort_values().index]
    grid.columns = [f"KL {t:g}" for t in grid.columns]
    name = _baseline(table)
    print("\nGap to the frontier at each target (* best, = not told apart from the best"
          + (f", +/- better/worse than {name} (Holm)" if name else "") + "; blank: target not reached):\n")
    print(grid.to_string())


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    return table[name] if name in table else pd.Series(math.nan, index=table.index)


def _baseline(table: pd.DataFrame) -> str | None:
    """The baseline an `at_targets` table compares with, None without one."""
    named = _column(table, "baseline").dropna()
    return str(named.iloc[0]) if len(named) else None


def print_standings(table: pd.DataFrame) -> None:
    """Per target, in one line each: the best curve, how many are not told apart from it, and against the baseline
    the curves Holm's test resolves as better or worse (`prefopt.study.ranking.vs_baseline`)."""
    standing = rk.standing_of(table)
    if not standing.str.len().any():
        return
    print()
    for target, rows in table.assign(standing=standing).groupby("target"):
        best = rows.loc[rows["standing"] == "best", "curve"]
        if best.empty:
            continue
        tied = sorted(rows.loc[rows["standing"] == "tied", "curve"])
        line = (f"KL {target:g}: best {best.iloc[0]}; not told apart from it: {', '.join(tied) or 'none'}; "
                f"behind it: {int((rows['standing'] == 'behind').sum())} of {len(rows)}")
        name = _baseline(rows)
        if name is not None:  # at_targets sets baseline and vs_baseline together
            for verdict in ("better", "worse"):
                names = sorted(rows.loc[rows["vs_baseline"] == verdict, "curve"])
                line += f"; {verdict} than {name} (Holm): {', '.join(names) or 'none'}"
        print(line)


def print_ranking(ranked: pd.DataFrame) -> None:
    """The ranking table (`prefopt.study.ranking.ranking`), with the KL range it is over and the curves left out of it."""
    lo, hi = ranked["matched_kl_lo"].iloc[0], ranked["matched_kl_hi"].iloc[0]
    over = f"over KL {lo:.2f}-{hi:.2f} (the range every ranked curve and seed covers)" if pd.notna(lo) else (
        "at matched KL: none ranked, as no KL range is covered by every seed of two or more curves")
    print(f"\nRanking by the mean gap to the frontier {over}; lower is better:\n")
    view = pd.DataFrame({
        "rank": [f"{r:.0f}" if pd.notna(r) else "-" for r in ranked["rank"]],
        "curve": ranked["curve"],
        "matched gap": _pm(ranked["matched_gap.mean"], ranked["matched_gap.ci95"]),
        "vs best other (paired)": _interval(ranked["gap_vs_best_other.mean"], ranked["gap_vs_best_other.lo"],
                                            ranked["gap_vs_best_other.hi"]),
        "best gap (corrected)": _interval(ranked["best_gap.mean"], ranked["best_gap.lo"], ranked["best_gap.hi"],
                                          ranked["best_gap.corrected"]),
        "at": ranked["best_gap.setting"],
        "KL span": [f"{a:.2f}-{b:.2f}" for a, b in zip(ranked["kl.min"], ranked["kl.max"])],
        "accuracy (not ranked)": [f"{a:.3f}-{b:.3f}" for a, b in zip(ranked["accuracy.min"], ranked["accuracy.max"])],
    })
    print(view.to_string(index=False))
    bent = ranked.loc[ranked["kl_monotone"].eq(False), "curve"].tolist() if "kl_monotone" in ranked else []
    if bent:
        print(f"\nKL is not monotone in the swept setting of: {', '.join(bent)} (compared along KL all the same; "
              "kl_monotone in ranking.csv)")
    left_out = ranked.loc[~ranked["ranked"].astype(bool), "curve"].tolist()
    if left_out and pd.notna(lo):  # with no common range at all, the line above already says why none is ranked
        print(f"\nNot ranked (their KL never meets the common range): {', '.join(left_out)}")


def write_plots(out: Path, runs: pd.DataFrame, points: pd.DataFrame, history: pd.DataFrame, frontier: pd.DataFrame,
                targets: pd.DataFrame, best_of_n: pd.DataFrame | None = None,
                at_targets: pd.DataFrame | None = None) -> list[Path]:
    from prefopt.study import plots

    written = [plots.frontier_plot(points, frontier, targets, out / "frontier.png", best_of_n),
               plots.gap_plot(points, out / "frontier_gap.png"),
               plots.sweep_plot(points, out / "beta_sweeps.png")]
    if not history.empty and rk.REWARD in history and history.groupby("run")["step"].nunique().max() > 1:
        written.append(plots.curves_plot(history, rk.with_curves(runs), out / "curves.png"))
    from prefopt.gold.task import compositions

    comp = compositions()
    diagnostics = plots.diagnostics_plot(points, out / "diagnostics.png", float(np.exp(comp.log_prob) @ comp.length))
    forest = plots.at_targets_plot(at_targets, out / "at_targets.png") if at_targets is not None else None
    return written + [p for p in (diagnostics, forest) if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefopt report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a grid's results folder, e.g. results/default")
    parser.add_argument("--kl", type=float, nargs="+", help="target KLs for the matched-KL table (default: a few "
                        "round values within the KLs the runs reached)")
    parser.add_argument("--baseline", default="dpo", help="the curve every other is compared with at a calibrating "
                        "grid's targets, paired by seed, Holm-corrected (default: dpo, where it is a curve)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    out = args.results
    runs, summary, history = read_tables(out)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 30)
    if rk.KL not in runs or runs[rk.KL].isna().all():
        keys = [c for c in summary.columns if not c.endswith((".mean", ".std", ".ci95"))]
        print(summary[keys + [c for c in summary.columns if c.endswith(".mean")][:8]].to_string(index=False))
        print("\n(no gold-task metrics in these runs: no frontier, ranking or plots)")
        return 0
    observed = rk.with_curves(runs)[rk.KL]
    kls = args.kl or [k for k in rk.NICE_KLS if observed.min() <= k <= observed.max()]
    frontier, best_of_n, targets = frontier_table(), best_of_n_table(), loss_targets(runs)
    matched, ranked = rk.matched_kl(runs, kls), rk.ranking(runs)
    for name, table in (("frontier", frontier), ("best_of_n", best_of_n), ("targets", targets),
                        ("matched_kl", matched), ("ranking", ranked)):
        write_csv(table, out / f"{name}.csv")
    print_report(out, summary, matched, ranked)
    targets_table = None
    if (out / "calibration.csv").is_file():  # a calibrating grid: compare at its targets, where its runs landed
        calibration = pd.read_csv(out / "calibration.csv")
        reached = (calibration["status"] == "reached").sum()
        print(f"\nCalibration on its seed (calibration.csv): {reached} of {len(calibration)} (variant, target) reached; "
              "value chosen (its KL), or why not (the closest KL reached):\n")
        print(outcome_view(calibration).to_string())
        targets_table = rk.at_targets(runs, calibration, args.baseline)
        write_csv(targets_table, out / "at_targets.csv")
        print_at_targets(targets_table)
        print_at_targets_grid(targets_table)
        scenario = read_scenario(out)
        if scenario is not None:  # the predictions written before the runs, and what the runs say
            table = verdicts(runs, calibration, scenario)
            write_csv(table, out / VERDICTS_FILE)
            print(f"\nscenario: {scenario['claim']} ({scenario['source']})")
            print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    if not args.no_plots:
        written = write_plots(out, runs, summary, history, frontier, targets, best_of_n, targets_table)
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
