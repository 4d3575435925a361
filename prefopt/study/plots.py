"""The report's PNG plots, each a function of results tables (DataFrames) and an output path.

- `frontier_plot`: gold reward against sampled KL, one point per setting (mean over seeds, error bars one s.d.
  across seeds on both axes), a line per curve along its hyperparameter, the exact optimal frontier as the limit,
  and each setting's analytic target where its loss has one (hollow marker, dotted to where the runs landed), as in Figure 2 of the
  DPO paper (Rafailov et al. 2023).
- `gap_plot`: the gap to the frontier against the swept hyperparameter, one panel per curve.
- `sweep_plot`: preference accuracy, log-ratio margin and sampled KL against the hyperparameter, per curve.
- `curves_plot`: gold reward, sampled KL and accuracy at every validation step, one panel per curve and metric,
  one colour per hyperparameter value (seeds thin, their mean thick).
- `diagnostics_plot`: the diagnostics of why a loss loses against sampled KL, one colour per curve.
- `at_targets_plot`: a calibrating grid's comparison at its KL targets, a panel per target, the curves sorted by their
  gap to the frontier, marked best, tied with the best or resolved behind it (`prefopt.study.ranking.standing`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from prefopt.study.ranking import ACCURACY, GAP, KL, MARGIN, REWARD, standing_of  # noqa: E402
from prefopt.study.tables import write_atomic  # noqa: E402


def _colors(curves: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    return {c: cmap(i % cmap.N) for i, c in enumerate(curves)}


SETTING_PREFIXES = ("loss.", "model.", "trainer.", "data.")  # a loss hyperparameter, or a config key a grid assigned


def varying_parameters(points: pd.DataFrame) -> list[str]:
    """The setting columns whose values vary among these points: loss hyperparameters first, then config keys (within
    one curve, a key that varies along it, such as a calibrated learning rate)."""
    varying = [c for c in points.columns if c.startswith(SETTING_PREFIXES) and points[c].nunique() > 1]
    return sorted(varying, key=lambda c: not c.startswith("loss."))


def setting_label(column: str) -> str:
    """A setting column as an axis or legend label: beta for loss.beta, lr for model.optimizer.init_args.lr."""
    return column.removeprefix("loss.") if column.startswith("loss.") else column.rsplit(".", 1)[-1]


def swept_parameter(points: pd.DataFrame) -> str | None:
    """The setting column that varies along a curve (a loss hyperparameter first, if several); None for one point."""
    varying = varying_parameters(points)
    return varying[0] if varying else None


def _save(fig: plt.Figure, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    fig.tight_layout(rect=rect)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)
    return path


ZOOM_KL = 2.5  # the right panel of the frontier plot: where the losses can be told apart


def frontier_plot(points: pd.DataFrame, frontier: pd.DataFrame, targets: pd.DataFrame, path: Path,
                  best_of_n: pd.DataFrame | None = None) -> Path:
    """points: the summary with a `curve` column; frontier: (kl, reward); targets: (curve, target_kl, target_reward,
    kl, reward) for the DPO settings; best_of_n: (n, kl, reward). Left: every KL; right: KL up to ZOOM_KL."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    xmax = float(np.nanmax(points[f"{KL}.mean"] + points[f"{KL}.std"].fillna(0))) * 1.1
    colors = _colors(list(points["curve"].unique()))
    for ax, right in zip(axes, (xmax, min(ZOOM_KL, xmax))):
        _frontier_panel(ax, points, frontier, targets, colors, right)
        if best_of_n is not None:
            b = best_of_n[best_of_n["kl"] <= right * 1.05]
            ax.plot(b["kl"], b["reward"], "s--", color="gray", ms=3, lw=1, label="best-of-N from the base (exact)")
    axes[0].set_title("Gold reward against KL (mean over seeds, bars: 1 s.d.; labels: the hyperparameter)", fontsize=9)
    axes[1].set_title(f"the same, KL up to {ZOOM_KL:g}", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _frontier_panel(ax: plt.Axes, points: pd.DataFrame, frontier: pd.DataFrame, targets: pd.DataFrame,
                    colors: dict[str, tuple], xmax: float) -> None:
    f = frontier[(frontier["kl"] <= xmax * 1.05) & np.isfinite(frontier["kl"])].sort_values("kl")
    ax.plot(f["kl"], f["reward"], color="black", lw=1.8, label="exact optimal frontier")
    shown = points[points[f"{KL}.mean"] <= xmax]
    for curve, g in shown.groupby("curve", sort=False):
        g = g.sort_values(f"{KL}.mean")
        ax.errorbar(g[f"{KL}.mean"], g[f"{REWARD}.mean"], xerr=g[f"{KL}.std"], yerr=g[f"{REWARD}.std"], fmt="o-",
                    ms=5, lw=1.2, capsize=2, color=colors[curve], label=curve)
        param = swept_parameter(points[points["curve"] == curve])
        for _, row in g.iterrows() if param else ():
            ax.annotate(f"{row[param]:g}", (row[f"{KL}.mean"], row[f"{REWARD}.mean"]), fontsize=6,
                        xytext=(3, -8), textcoords="offset points", color=colors[curve])
    for _, t in targets[targets["target_kl"] <= xmax].iterrows():
        color = colors.get(t["curve"], "gray")
        ax.plot([t["target_kl"], t["kl"]], [t["target_reward"], t["reward"]], ":", color=color, lw=0.8)
        ax.plot(t["target_kl"], t["target_reward"], "o", mfc="none", color=color, ms=7)
    if len(targets):
        ax.plot([], [], "o", mfc="none", color="gray", label="analytic target (population optimum)")
    ymin = min(f["reward"].min(), shown[f"{REWARD}.mean"].min()) if len(shown) else f["reward"].min()
    ax.set(xlabel="sampled KL(pi || pi_ref), nats per response", ylabel="gold reward", xlim=(0, xmax))
    ax.set_ylim(bottom=ymin - 0.1)
    ax.grid(alpha=0.3)


MAX_COLUMNS = 12  # more curves than this wrap into further blocks of rows (the catalog's 53 losses)


class _Panels:
    """A figure of panels, a row per metric and a column per curve; beyond MAX_COLUMNS curves the columns wrap into
    further blocks of `rows` rows. `ax(i, j)`: metric i's panel of curve j."""

    def __init__(self, n: int, rows: int = 1) -> None:
        self.cols, self.rows = min(n, MAX_COLUMNS), rows
        blocks = -(-n // self.cols)
        self.fig, self._axes = plt.subplots(rows * blocks, self.cols, squeeze=False,
                                            figsize=(3.0 * self.cols + 0.5, 2.7 * rows * blocks))
        for j in range(n, blocks * self.cols):
            for i in range(rows):
                self.ax(i, j).axis("off")

    def ax(self, i: int, j: int) -> plt.Axes:
        return self._axes[(j // self.cols) * self.rows + i][j % self.cols]

    def first_column(self, j: int) -> bool:
        return j % self.cols == 0


def _param_axis(ax: plt.Axes, g: pd.DataFrame, param: str | None) -> np.ndarray:
    if param is None:  # nothing varies along the curve (one setting): no axis to label
        ax.set_xticks([])
        ax.set_xlabel("one setting")
        return np.arange(len(g), dtype=float)
    x = g[param].astype(float).to_numpy()
    if (x > 0).all() and x.max() / x.min() > 5:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # label the swept values only
    ax.set_xticks(x, [f"{v:.3g}" for v in x])
    if len(np.unique(x)) > 3:  # a calibrated sweep's values crowd each other (1.65e-05, 2.56e-05, ...)
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlabel(setting_label(param))
    return x


def gap_plot(points: pd.DataFrame, path: Path) -> Path:
    curves = list(points["curve"].unique())
    colors = _colors(curves)
    panels = _Panels(len(curves))
    for j, curve in enumerate(curves):
        ax, g = panels.ax(0, j), points[points["curve"] == curve]
        param = swept_parameter(g)
        g = g.sort_values(param) if param else g
        x = _param_axis(ax, g, param)
        ax.errorbar(x, g[f"{GAP}.mean"], yerr=g[f"{GAP}.ci95"], fmt="o-", color=colors[curve], capsize=2)
        ax.set_title(curve, fontsize=9)
        ax.grid(alpha=0.3)
        if panels.first_column(j):
            ax.set_ylabel("gap to the frontier (95% CI)")
    return _save(panels.fig, path)


def sweep_plot(points: pd.DataFrame, path: Path) -> Path:
    curves = list(points["curve"].unique())
    colors = _colors(curves)
    metrics = [(ACCURACY, "preference accuracy"), (MARGIN, "margin h (nats)"), (KL, "sampled KL")]
    metrics = [(m, label) for m, label in metrics if f"{m}.mean" in points]
    panels = _Panels(len(curves), rows=len(metrics))
    for j, curve in enumerate(curves):
        g = points[points["curve"] == curve]
        param = swept_parameter(g)
        g = g.sort_values(param) if param else g
        for i, (metric, label) in enumerate(metrics):
            ax = panels.ax(i, j)
            x = _param_axis(ax, g, param)
            ax.errorbar(x, g[f"{metric}.mean"], yerr=g[f"{metric}.ci95"], fmt="o-", color=colors[curve], capsize=2)
            ax.grid(alpha=0.3)
            if panels.first_column(j):
                ax.set_ylabel(label)
            if i == 0:
                ax.set_title(curve, fontsize=9)
    return _save(panels.fig, path)


def _settings(g: pd.DataFrame) -> tuple[list[str], list[tuple]]:
    """The settings that vary within one curve's runs, and their value combinations, sorted."""
    varying = varying_parameters(g)
    combos = {tuple(row) for row in g[varying].itertuples(index=False)}
    values = sorted(combos, key=lambda v: [(isinstance(x, str), x) for x in v])  # numbers by value, then names
    return varying, values


def _value(v: object) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def curves_figure(history: pd.DataFrame, runs: pd.DataFrame) -> plt.Figure:
    """history: (run, step, metrics...); runs: (run, curve, and the loss columns) of the ok runs.

    One column of panels per curve (a row per metric), so each loss's settings can be told apart: one colour per
    value of its swept hyperparameter (viridis, in sorted order), a thin line per seed and a thick one for the mean
    over seeds, and the legend of the values atop each column.
    """
    merged = history.merge(runs, on="run", suffixes=("", "_final"))
    curves = list(runs["curve"].unique())
    metrics = [m for m in (REWARD, KL, ACCURACY) if m in history]
    panels = _Panels(len(curves), rows=len(metrics))
    cmap = plt.get_cmap("viridis")
    for j, curve in enumerate(curves):
        g = merged[merged["curve"] == curve]
        varying, values = _settings(g)
        for k, value in enumerate(values):
            color = cmap(0.9 * k / max(len(values) - 1, 1))  # 0.9: viridis's last yellow is unreadable on white
            setting = g[(g[varying] == pd.Series(value, index=varying)).all(axis=1)] if varying else g
            label = ", ".join(f"{setting_label(c)} {_value(v)}" for c, v in zip(varying, value)) or "all runs"
            for i, metric in enumerate(metrics):
                ax = panels.ax(i, j)
                for _, seed in setting.groupby("run"):
                    seed = seed.sort_values("step")
                    ax.plot(seed["step"], seed[metric], "-", color=color, lw=0.6, alpha=0.35)
                mean = setting.groupby("step")[metric].mean()
                ax.plot(mean.index, mean.to_numpy(), "-", color=color, lw=1.6, label=label if i == 0 else None)
        panels.ax(0, j).set_title(curve, fontsize=9)
        panels.ax(0, j).legend(fontsize=6)
        for i, metric in enumerate(metrics):
            ax = panels.ax(i, j)
            ax.grid(alpha=0.3)
            ax.set_xlabel("step" if i == len(metrics) - 1 else "")
            if panels.first_column(j):
                ax.set_ylabel(metric.removeprefix("val/").removeprefix("gold/"), fontsize=8)
    panels.fig.suptitle("Validation metrics during training, one colour per hyperparameter value: thin lines, each "
                        "seed; thick, their mean", fontsize=9)
    return panels.fig


def curves_plot(history: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path:
    """`curves_figure`, saved to path."""
    return _save(curves_figure(history, runs), path)


# Why a loss loses (`prefopt.gold.evaluation`): (metric, panel title); both log-ratios share the last panel.
DIAGNOSTICS = (("val/gold/outside_support_fraction", "samples outside the base's support"),
               ("val/gold/outside_support_kl_share", "share of the KL spent outside the support"),
               ("val/gold/mean_length", "mean length (words)"), ("val/gold/entropy", "next-token entropy (nats)"),
               ("val/gold/top_token_prob", "probability of the top next token"))
LOGRATIOS = (("val/chosen_logratio", "o"), ("val/rejected_logratio", "v"))


def diagnostics_plot(points: pd.DataFrame, path: Path, base_length: float | None = None) -> Path | None:
    """The diagnostics against sampled KL, one point per setting (mean over seeds, error bars one s.d.), a colour per
    curve: support, length (the base's mean as a dashed line), entropy and squeezing, and the held-out pairs' chosen
    (circles) and rejected (triangles) log-ratios. None when the runs logged none of them."""
    shown = [(m, title) for m, title in DIAGNOSTICS if f"{m}.mean" in points]
    if not shown or f"{KL}.mean" not in points:
        return None
    colors = _colors(list(points["curve"].unique()))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    panels = [*shown, ("logratios", "held-out log-ratios: chosen (o), rejected (v)")]
    for ax, (metric, title) in zip(axes.flat, panels):
        for curve, g in points.groupby("curve", sort=False):
            g = g.sort_values(f"{KL}.mean")
            series = LOGRATIOS if metric == "logratios" else ((metric, "o"),)
            for m, marker in series:
                if f"{m}.mean" in g:
                    ax.errorbar(g[f"{KL}.mean"], g[f"{m}.mean"], yerr=g.get(f"{m}.std"), fmt=marker + "-", ms=4,
                                lw=1, capsize=2, color=colors[curve], label=curve if m == series[0][0] else None)
        if metric == "val/gold/mean_length" and base_length is not None:
            ax.axhline(base_length, color="black", ls="--", lw=0.8, label="base")
        ax.set(title=title, xlabel="sampled KL, nats")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=6)
    return _save(fig, path)


STANDING_STYLE = {"best": ("o", "tab:red", "best"), "tied": ("o", "none", "not told apart from the best (paired 95%)"),
                  "behind": ("s", "tab:blue", "behind the best (paired 95% interval excludes 0)"),
                  "": ("o", "gray", "no paired comparison")}


def at_targets_plot(table: pd.DataFrame, path: Path) -> Path | None:
    """`at_targets_figure` saved to path; None for an empty table."""
    if table.empty:
        return None
    fig = at_targets_figure(table)
    return _save(fig, path, rect=(0, 0.4 / fig.get_figheight(), 1, 1))  # 0.4 inch below the panels: the legend


def at_targets_figure(table: pd.DataFrame) -> plt.Figure:
    """`prefopt.study.ranking.at_targets` as a forest plot: a panel per KL target, a row per curve (sorted, the
    smallest gap on top), its gap to the frontier with the 95% t interval over seeds, the marker saying where the
    paired, selection-aware comparison places it against the best; the dashed line is the best's gap."""
    table = table.assign(standing=standing_of(table))
    targets = sorted(table["target"].unique())
    rows = table.groupby("target").size().max()
    fig, axes = plt.subplots(1, len(targets), figsize=(3.4 * len(targets) + 0.6, 0.2 * rows + 1.4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        g = table[table["target"] == target].sort_values("gap.mean", ascending=False)  # y = 0 is the bottom row
        y = np.arange(len(g))
        for state, (marker, face, label) in STANDING_STYLE.items():
            on = (g["standing"] == state).to_numpy()
            if on.any():
                ax.errorbar(g["gap.mean"][on], y[on], xerr=g["gap.ci95"][on], fmt=marker, ms=4, capsize=1.5, lw=0.8,
                            color="black" if face == "none" else face, mfc=face)
        best = g[g["standing"] == "best"]
        if len(best):
            ax.axvline(float(best["gap.mean"].iloc[0]), color="tab:red", ls="--", lw=0.7)
        tied = int((g["standing"] != "behind").sum())
        ax.set_yticks(y, g["curve"], fontsize=6)
        ax.set_ylim(-0.7, len(g) - 0.3)
        ax.set_title(f"KL {target:g} nats: {tied} of {len(g)} not behind the best", fontsize=8)
        ax.set_xlabel("gap to the frontier (95% CI)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    shown = [STANDING_STYLE[state] for state in STANDING_STYLE if (table["standing"] == state).any()]
    handles = [plt.Line2D([], [], marker=m, ls="", color="black" if f == "none" else f, mfc=f) for m, f, _ in shown]
    fig.legend(handles, [label for _, _, label in shown], loc="lower center", ncol=len(shown), fontsize=7,
               frameon=False)
    return fig
