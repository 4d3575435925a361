"""Tables, statistics, ranking and the report, on hand-made results whose numbers are worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prefopt.study import ranking as rk
from prefopt.study import report
from prefopt.study.tables import summarize, t_pvalue, t_quantile, write_tables

T_975_2DF = 4.302652729911275  # two-sided 95% Student-t quantile, 2 degrees of freedom (3 seeds)
T_975_4DF = 2.7764451051977987  # 4 degrees of freedom (5 seeds)


def fake_run(runs_dir: Path, variant: str, loss: dict, seed: int, final: dict, status: str = "ok") -> Path:
    """A run folder as a grid leaves it: run.json, config.yaml, metrics.json (finished), or error.txt."""
    params = "_".join(f"{k}{v:g}" for k, v in loss.items() if k != "name")
    run_dir = runs_dir / f"{variant}_{params}_seed{seed}"
    run_dir.mkdir(parents=True)
    assigned = {"seed_everything": seed, **{f"model.loss.{k}": v for k, v in loss.items()}}
    spec = {"name": run_dir.name, "variant": variant, "assigned": assigned, "loss": loss, "seed": seed,
            "args": [], "git_commit": "abc123", "run_time_s": 10.0}
    (run_dir / "run.json").write_text(json.dumps(spec))
    if status == "unfinished":  # started, no config or metrics yet
        return run_dir
    (run_dir / "config.yaml").write_text("data:\n  gold:\n    label_temperature: 1.0\ntrainer:\n  max_steps: 300\n")
    if status == "failed":
        (run_dir / "error.txt").write_text("exit code 1\nboom")
        return run_dir
    history = [{**{k: v * 0.5 for k, v in final.items()}, "step": 100.0}, {**final, "step": 200.0}]
    metrics = {"final": final, "best": final, "history": history, "finished": True, "data_hash": f"d{seed}",
               "wall_time_s": 9.0, "train_pairs_per_s": 100.0, "train_loss": 0.5, "step": 200}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def gold_final(kl: float, reward: float, accuracy: float = 0.7, frontier=None) -> dict:
    frontier_reward = (frontier or rk.default_frontier())(kl)
    return {rk.KL: kl, rk.REWARD: reward, rk.GAP: frontier_reward - reward, rk.ACCURACY: accuracy, rk.MARGIN: 2 * kl}


# ---------------------------------------------------------------------------------------------- summary
def test_summary_mean_std_and_ci_by_hand(tmp_path):
    """Rewards 1, 2, 3 over three seeds: mean 2, s.d. 1, 95% CI half-width t(0.975, 2) / sqrt(3) = 2.4841."""
    runs_dir = tmp_path / "runs"
    dirs = [fake_run(runs_dir, "dpo", {"name": "dpo", "beta": 0.1}, s, {rk.REWARD: r, rk.KL: 1.0})
            for s, r in enumerate([1.0, 2.0, 3.0])]
    dirs.append(fake_run(runs_dir, "dpo", {"name": "dpo", "beta": 0.1}, 3, {}, status="failed"))
    dirs.append(fake_run(runs_dir, "dpo", {"name": "dpo", "beta": 0.1}, 4, {}, status="unfinished"))
    dirs += [fake_run(runs_dir, "ipo", {"name": "ipo", "beta": 0.5, "average_log_probs": True}, s, {rk.REWARD: 5.0})
             for s in (0, 1)]
    runs = write_tables(tmp_path, dirs)
    assert (runs["status"] == "failed").sum() == 1 and "boom" in runs.loc[runs["status"] == "failed", "error"].iloc[0]
    assert (runs["status"] == "unfinished").sum() == 1
    assert set(runs["curve"]) == {"dpo", "ipo"}, "a run still going (no resolved config yet) changes no label"
    summary = pd.read_csv(tmp_path / "summary.csv")
    dpo = summary[summary["variant"] == "dpo"].iloc[0]
    assert dpo["n"] == 3 and dpo["seeds"] == "0 1 2"  # the failed seed 3 is left out
    assert dpo[f"{rk.REWARD}.mean"] == pytest.approx(2.0)
    assert dpo[f"{rk.REWARD}.std"] == pytest.approx(1.0)
    assert dpo[f"{rk.REWARD}.ci95"] == pytest.approx(T_975_2DF / math.sqrt(3))
    ipo = summary[summary["variant"] == "ipo"].iloc[0]  # grouped although dpo has no average_log_probs (NaN)
    assert ipo["n"] == 2 and ipo[f"{rk.REWARD}.std"] == 0.0 and ipo["loss.average_log_probs"]
    assert len(summary) == 2
    # runs.csv: every swept key, every loss hyperparameter, seed, commit, data hash, metrics.
    table = pd.read_csv(tmp_path / "runs.csv")
    for column in ("run", "curve", "variant", "status", "loss", "loss.beta", "loss.average_log_probs", "seed",
                   "git_commit", "data_hash", "data.gold.label_temperature", rk.REWARD, f"best/{rk.REWARD}"):
        assert column in table, column
    assert pd.read_parquet(tmp_path / "runs.parquet").shape == table.shape
    assert set(pd.read_csv(tmp_path / "history.csv")["step"]) == {100.0, 200.0}


def test_summary_matches_a_per_setting_computation_to_the_last_digit():
    """summarize (vectorized) against pandas' own mean and std per setting and metric, NaN skipped, on random
    numbers: equal to the bit, so regenerated tables keep their digits."""
    rng = np.random.default_rng(3)
    rows = [{"run": f"r{i}", "variant": "v", "status": "ok", "loss": "dpo", "loss.beta": float(i % 4), "seed": i,
             "val/a": rng.normal() * 10.0 ** rng.integers(-3, 3), "val/b": rng.normal() if i % 3 else np.nan,
             "val/c": np.nan if i % 4 == 1 else rng.normal()} for i in range(23)]
    runs = pd.DataFrame(rows)
    summary = summarize(runs).set_index("loss.beta")
    for beta, group in runs.groupby("loss.beta"):
        for m in ("val/a", "val/b", "val/c"):
            x = group[m].dropna()
            assert summary.loc[beta, f"{m}.mean"] == float(x.mean()) or (len(x) == 0 and np.isnan(summary.loc[beta, f"{m}.mean"]))
            std = float(x.std(ddof=1)) if len(x) > 1 else math.nan
            assert summary.loc[beta, f"{m}.std"] == std or (np.isnan(std) and np.isnan(summary.loc[beta, f"{m}.std"]))
            if len(x) > 1:
                assert summary.loc[beta, f"{m}.ci95"] == t_quantile(len(x)) * std / math.sqrt(len(x))
    assert list(summary["n"]) == [6, 6, 6, 5] and summary.loc[3.0, "seeds"] == "3 7 11 15 19"


def test_a_single_seed_has_no_interval():
    runs = pd.DataFrame({"run": ["a"], "variant": ["dpo"], "status": ["ok"], "loss": ["dpo"], "loss.beta": [0.1],
                         "seed": [0], rk.REWARD: [1.5]})
    row = summarize(runs).iloc[0]
    assert row["n"] == 1 and row[f"{rk.REWARD}.mean"] == 1.5 and math.isnan(row[f"{rk.REWARD}.ci95"])


# ---------------------------------------------------------------------------------------------- ranking
@pytest.mark.parametrize(
    ("n", "level", "quantile"),
    # Student-t table values (df = n - 1), two-sided: 95% for df 1, 2, 4, 9, 29, 100; 90% and 99% for df 6.
    [(2, 0.95, 12.7062), (3, 0.95, 4.3027), (5, 0.95, 2.7764), (10, 0.95, 2.2622), (30, 0.95, 2.0452),
     (101, 0.95, 1.9840), (7, 0.90, 1.9432), (7, 0.99, 3.7074)],
)
def test_t_quantile_matches_the_student_t_table(n, level, quantile):
    assert t_quantile(n, level) == pytest.approx(quantile, abs=1e-4)


def test_t_quantile_is_nan_for_one_value_and_tends_to_the_normal_quantile():
    assert math.isnan(t_quantile(1))
    z, df = 1.959964, 20000  # z_0.975; for large df, t = z + (z^3 + z) / (4 df) + O(1 / df^2)
    assert t_quantile(df + 1) == pytest.approx(z + (z**3 + z) / (4 * df), abs=1e-6)


def test_interpolate_is_linear_along_kl_and_never_extrapolates():
    out = rk.interpolate([2.0, 0.5, 1.0], [3.0, 1.0, 2.0], [0.75, 1.5, 0.4, 2.5, 2.0])
    assert out[:2] == pytest.approx([1.5, 2.5])
    assert np.isnan(out[2]) and np.isnan(out[3]) and out[4] == 3.0


def _line_frontier(kl: float) -> float:
    return 1.0 + kl  # a stand-in frontier, so every gap is worked out by hand


def hand_runs() -> pd.DataFrame:
    """Two losses, three seeds, two or three settings each.

    a: points (0.5, 1.0 + s) and (2.0, 2.5 + s) for seed s in 0, 0.1, 0.2 (added to the reward), so along KL
       reward = 0.5 + k + s; at KL 1: 1.5 + s, gap 0.5 - s.
    b: points (0.4, 1.0), (1.2, 1.4), (3.0, 2.3) for every seed, plus 0.05 * seed index: between 0.4 and 1.2 the
       slope is 0.5, so at KL 1: 1.3 + 0.05 i, gap 0.7 - 0.05 i.
    """
    rows = []
    for i, s in enumerate((0.0, 0.1, 0.2)):
        for beta, kl, r in ((1.0, 0.5, 1.0), (0.1, 2.0, 2.5)):
            rows.append(("a", "dpo", beta, i, kl, r + s, 0.70))
        for beta, kl, r in ((2.0, 0.4, 1.0), (1.0, 1.2, 1.4), (0.5, 3.0, 2.3)):
            rows.append(("b", "ipo", beta, i, kl, r + 0.05 * i, 0.75))
    runs = pd.DataFrame(rows, columns=["variant", "loss", "loss.beta", "seed", rk.KL, rk.REWARD, rk.ACCURACY])
    runs.insert(0, "run", [f"{v}_{b}_{s}" for v, b, s in zip(runs["variant"], runs["loss.beta"], runs["seed"])])
    runs.insert(2, "status", "ok")
    runs[rk.GAP] = [_line_frontier(k) - r for k, r in zip(runs[rk.KL], runs[rk.REWARD])]
    return runs


def test_matched_kl_interpolates_each_seed_and_ranks_by_reward():
    matched = rk.matched_kl(hand_runs(), [1.0, 2.5], frontier=_line_frontier)
    at1 = matched[matched["kl"] == 1.0].set_index("curve")
    assert at1.loc["a", "reward.mean"] == pytest.approx(1.6)  # 1.5 + mean(0, 0.1, 0.2)
    assert at1.loc["a", "reward.std"] == pytest.approx(0.1)
    assert at1.loc["a", "reward.ci95"] == pytest.approx(T_975_2DF * 0.1 / math.sqrt(3))
    assert at1.loc["b", "reward.mean"] == pytest.approx(1.35)  # 1.3 + mean(0, 0.05, 0.1)
    assert at1.loc["a", "gap.mean"] == pytest.approx(0.4) and at1.loc["b", "gap.mean"] == pytest.approx(0.65)
    assert at1.loc["a", "rank"] == 1 and at1.loc["b", "rank"] == 2
    # Paired by seed: a - b = (1.5 + s) - (1.3 + 0.05 i) = 0.2, 0.25, 0.3: mean 0.25, s.d. 0.05. Every seed favours
    # a, so the bootstrap that repeats the choice of the best finds a ahead in every resample (no bias to correct);
    # with 3 seeds its resamples are too few to show the spread, and the t interval, wider, is the one given.
    half = T_975_2DF * 0.05 / math.sqrt(3)
    assert at1.loc["b", "behind_best.mean"] == pytest.approx(0.25) and at1.loc["a", "behind_best.mean"] == pytest.approx(-0.25)
    assert at1.loc["b", "behind_best.corrected"] == pytest.approx(0.25, abs=1e-3)  # resampling noise only
    b = at1.loc["b"]
    assert b["behind_best.lo"] == pytest.approx(0.25 - half, abs=1e-3) and b["behind_best.hi"] == pytest.approx(0.25 + half, abs=1e-3)
    assert at1.loc["a", "behind_best.hi"] == pytest.approx(-0.25 + half, abs=1e-3) and at1.loc["a", "behind_best.hi"] < 0
    at25 = matched[matched["kl"] == 2.5].set_index("curve")  # beyond a's largest KL (2.0): no value, no rank
    assert at25.loc["a", "n"] == 0 and math.isnan(at25.loc["a", "reward.mean"])
    assert at25.loc["b", "n"] == 3 and at25.loc["b", "rank"] == 1


def test_ranking_uses_the_common_kl_range_and_paired_differences():
    ranked = rk.ranking(hand_runs(), frontier=_line_frontier).set_index("curve")
    # Common range: largest minimum (a: 0.5) to smallest maximum (a: 2.0).
    assert ranked.loc["a", "matched_kl_lo"] == 0.5 and ranked.loc["a", "matched_kl_hi"] == 2.0
    # a: reward 0.5 + k + s everywhere in range, so its gap is 0.5 - s at every KL: mean over seeds 0.4.
    assert ranked.loc["a", "matched_gap.mean"] == pytest.approx(0.4)
    assert ranked.loc["a", "rank"] == 1 and ranked.loc["b", "rank"] == 2
    a_lead = ranked.loc["a", "gap_vs_best_other.mean"]
    assert a_lead < 0 and ranked.loc["b", "gap_vs_best_other.mean"] == pytest.approx(-a_lead)
    assert ranked.loc["a", "gap_vs_best_other.hi"] < 0 < ranked.loc["b", "gap_vs_best_other.lo"]  # every seed agrees
    # Best gap over settings: b at beta 2 (KL 0.4): gap 1.4 - (1.0 + 0.05 i) = 0.4 - 0.05 i, mean 0.35.
    assert ranked.loc["b", "best_gap.mean"] == pytest.approx(0.35) and ranked.loc["b", "best_gap.setting"] == "beta=2"
    assert ranked.loc["a", "best_gap.mean"] == pytest.approx(0.4)  # both of a's settings: 0.5 - s
    assert ranked.loc["b", "accuracy.min"] == pytest.approx(0.75)  # reported, not ranked on


def test_a_curve_whose_kl_never_meets_the_others_is_left_unranked(capsys):
    """c lives at KL 6-9, beyond a (0.5-2) and b (0.4-3): ranking a and b over 0.5-2.0 beats no range at all."""
    far = pd.DataFrame([{"run": f"c_{beta}_{i}", "variant": "c", "status": "ok", "loss": "simpo", "loss.beta": beta,
                         "seed": i, rk.KL: kl, rk.REWARD: 2.0 + i / 10, rk.ACCURACY: 0.7, rk.GAP: 7.0}
                        for i in range(3) for beta, kl in ((1.0, 6.0), (2.0, 9.0))])
    runs = pd.concat([hand_runs(), far], ignore_index=True)
    assert rk.common_kl_range(runs) == (0.5, 2.0, ["c"])
    ranked = rk.ranking(runs, frontier=_line_frontier).set_index("curve")
    assert list(ranked.index) == ["a", "b", "c"] and ranked.loc["a", "rank"] == 1
    assert not ranked.loc["c", "ranked"] and math.isnan(ranked.loc["c", "rank"])
    assert math.isnan(ranked.loc["c", "matched_gap.mean"]) and ranked.loc["c", "best_gap.mean"] == pytest.approx(7.0)
    report.print_ranking(rk.ranking(runs, frontier=_line_frontier))
    printed = capsys.readouterr().out
    assert "over KL 0.50-2.00" in printed and printed.rstrip().endswith("Not ranked (their KL never meets the common range): c")


def test_two_curves_whose_kl_ranges_never_meet_are_both_left_unranked(capsys):
    """a covers KL 0.1-0.5 and b 2-4: no common range, so no matched gap and no rank, not a rank by best gap."""
    runs = pd.DataFrame([{"run": f"{c}_{kl}_{i}", "variant": c, "status": "ok", "loss": c, "loss.beta": kl, "seed": i,
                          rk.KL: kl, rk.REWARD: 1.0, rk.ACCURACY: 0.7, rk.GAP: gap}
                         for c, kls, gap in (("a", (0.1, 0.5), 0.2), ("b", (2.0, 4.0), 0.1))
                         for kl in kls for i in range(3)])
    ranked = rk.ranking(runs, frontier=_line_frontier).set_index("curve")
    assert not ranked["ranked"].any() and ranked["rank"].isna().all()
    assert ranked["matched_gap.mean"].isna().all() and ranked["matched_kl_lo"].isna().all()
    assert ranked.loc["b", "best_gap.mean"] == pytest.approx(0.1)  # still reported, not ranked on
    report.print_ranking(rk.ranking(runs, frontier=_line_frontier))
    printed = capsys.readouterr().out
    assert "none ranked, as no KL range is covered" in printed and "Not ranked" not in printed  # no common range to name


# ---------------------------------------------------------------------------------------------- report
def gold_results(folder: Path) -> Path:
    """A results folder with dpo and ipo curves near the real frontier, three seeds each, one failed run."""
    from prefopt.gold.task import frontier_point

    dirs = []
    for seed in range(3):
        for beta in (0.5, 1.0, 2.0):
            kl, reward = frontier_point(beta * 1.3)
            final = gold_final(kl, reward - 0.1 - 0.02 * seed, accuracy=0.72)
            final |= {"val/gold/mean_length": 8 + kl, "val/gold/outside_support_fraction": 0.02 * kl,
                      "val/chosen_logratio": -0.5 * kl, "val/rejected_logratio": -1.5 * kl}  # diagnostics, dpo only
            loss = {"name": "dpo", "beta": beta, "label_smoothing": 0.0}
            dirs.append(fake_run(folder / "runs", "dpo", loss, seed, final))
        for tau in (0.5, 2.0):
            kl, reward = frontier_point(1.0 / tau)
            final = gold_final(kl, reward - 0.2 + 0.01 * seed, accuracy=0.74)
            dirs.append(fake_run(folder / "runs", "ipo", {"name": "ipo", "beta": tau}, seed, final))
    dirs.append(fake_run(folder / "runs", "ipo", {"name": "ipo", "beta": 1.0}, 0, {}, status="failed"))
    write_tables(folder, dirs)
    return folder


def test_report_writes_tables_and_pngs(tmp_path, capsys):
    from prefopt.gold.task import frontier_point

    folder = gold_results(tmp_path)
    assert report.main([str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "Ranking by the mean gap" in printed and "dpo" in printed and "ipo" in printed
    for png in ("frontier.png", "frontier_gap.png", "beta_sweeps.png", "curves.png", "diagnostics.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    frontier = pd.read_csv(folder / "frontier.csv")
    assert frontier["kl"].is_monotonic_increasing and frontier["reward"].is_monotonic_increasing
    targets = pd.read_csv(folder / "targets.csv")
    dpo, ipo = (targets[targets["loss"] == name].set_index("beta") for name in ("dpo", "ipo"))
    assert sorted(dpo.index) == [0.5, 1.0, 2.0] and set(dpo["how"]) == {"closed form"}  # the frontier at b = T beta
    assert (dpo.loc[1.0, "target_kl"], dpo.loc[1.0, "target_reward"]) == pytest.approx(frontier_point(1.0))
    assert dpo["target_gap"].abs().max() < 1e-6
    assert sorted(ipo.index) == [0.5, 2.0] and (ipo["target_gap"] > 0).all()  # (summed log-probs) below the frontier
    assert len(targets) == 5
    from prefopt.study import plots

    assert plots.diagnostics_plot(pd.DataFrame({"curve": ["x"], f"{rk.KL}.mean": [1.0]}), folder / "none.png") is None
    ranked = pd.read_csv(folder / "ranking.csv")
    assert list(ranked["curve"]) == ["dpo", "ipo"]  # dpo sits 0.1-0.14 below the frontier, ipo 0.19-0.2
    assert set(pd.read_csv(folder / "matched_kl.csv")["curve"]) == {"dpo", "ipo"}


def test_curves_have_a_panel_per_loss_coloured_by_hyperparameter(tmp_path):
    """dpo: 3 betas x 3 seeds; ipo: 2 betas x 3 seeds (its failed beta-1 run left out)."""
    import matplotlib.pyplot as plt

    from prefopt.study import plots

    runs, _, history = report.read_tables(gold_results(tmp_path))
    fig = plots.curves_figure(history, rk.with_curves(runs))
    top = [ax for ax in fig.axes if ax.get_subplotspec().is_first_row()]
    assert [ax.get_title() for ax in top] == ["dpo", "ipo"]  # one column of panels per loss
    assert len(fig.axes) == 3 * len(top)  # a row per metric: gold reward, sampled KL, accuracy
    for ax, labels in zip(top, (["beta 0.5", "beta 1", "beta 2"], ["beta 0.5", "beta 2"])):
        assert ax.get_legend() is not None and [t.get_text() for t in ax.get_legend().get_texts()] == labels
        lines = ax.get_lines()  # a line per seed and one for the mean, in the colour of their setting
        assert len(lines) == 4 * len(labels) and len({line.get_color() for line in lines}) == len(labels)
    plt.close(fig)


def test_report_on_runs_without_gold_metrics_prints_the_summary(tmp_path, capsys):
    dirs = [fake_run(tmp_path / "runs", "dpo", {"name": "dpo", "beta": 0.1}, s, {"val/accuracy": 0.6 + s / 10})
            for s in range(2)]
    write_tables(tmp_path, dirs)
    assert report.main([str(tmp_path)]) == 0
    assert "no gold-task metrics" in capsys.readouterr().out


def _concave_frontier_runs(frontier, kls_by_curve: dict[str, list[float]], seeds: int = 3) -> pd.DataFrame:
    """Runs that lie exactly on `frontier`: their true gap is 0 wherever they are."""
    rows = [{"run": f"{c}_{i}_{s}", "variant": c, "status": "ok", "loss": c, "loss.beta": float(i), "seed": s,
             rk.KL: kl * (1 + 0.01 * s), rk.REWARD: frontier(kl * (1 + 0.01 * s)), rk.ACCURACY: 0.7}
            for c, kls in kls_by_curve.items() for i, kl in enumerate(kls) for s in range(seeds)]
    runs = pd.DataFrame(rows)
    runs[rk.GAP] = 0.0
    return runs


def test_runs_on_the_exact_frontier_have_zero_gap_at_every_kl_however_sparse():
    """The interpolation-bias check: the built-in task's exact frontier is concave, so a chord between sparse runs
    lies below it; the ranking interpolates the gap, so runs on the frontier score exactly 0 and rank as ties."""
    frontier = rk.default_frontier()
    runs = _concave_frontier_runs(frontier, {"sparse": [0.1, 1.0, 8.0], "dense": [0.1, 0.2, 0.5, 1, 2, 4, 8]})
    targets = [0.3, 0.7, 2.0, 5.0]
    matched = rk.matched_kl(runs, targets)
    assert matched["gap.mean"].abs().max() < 1e-12 and set(matched["n"]) == {3}
    chord = rk.interpolate([0.1, 1.0, 8.0], [frontier(k) for k in (0.1, 1.0, 8.0)], [5.0])[0]
    assert frontier(5.0) - chord > 0.05, "interpolating rewards would have charged the sparse curve"
    ranked = rk.ranking(runs)
    assert ranked["matched_gap.mean"].abs().max() < 1e-12
    assert ranked["gap_vs_best_other.mean"].abs().max() < 1e-12


def test_a_kl_is_compared_only_on_the_seeds_that_cover_it_for_every_curve():
    runs = hand_runs()
    # b's seed 2 stops at KL 1.2, so at KL 2.5 b has seeds 0 and 1 only; a third curve c covers every seed there.
    runs = runs[~((runs["variant"] == "b") & (runs["seed"] == 2) & (runs[rk.KL] == 3.0))]
    far = pd.DataFrame([{"run": f"c_{i}_{kl}", "variant": "c", "status": "ok", "loss": "simpo", "loss.beta": kl,
                         "seed": i, rk.KL: kl, rk.REWARD: 1.0 + kl + 0.3 * i, rk.ACCURACY: 0.7, rk.GAP: 0.0}
                        for i in range(3) for kl in (1.0, 4.0)])
    matched = rk.matched_kl(pd.concat([runs, far], ignore_index=True), [2.5], frontier=_line_frontier)
    at = matched.set_index("curve")
    assert at.loc["b", "covered"] == 2 and at.loc["c", "covered"] == 3
    assert at.loc["b", "n"] == at.loc["c", "n"] == 2  # c's seed 2 (its best) does not enter the comparison
    assert at.loc["c", "reward.mean"] == pytest.approx(1.0 + 2.5 + 0.15)  # seeds 0 and 1 only


def test_the_best_setting_interval_repeats_the_selection():
    """Ten settings with the same true gap (0.5) and seed noise: the smallest observed mean is optimistic (the
    winner's curse). The bootstrap that repeats the choice moves the estimate back up, and its interval, shifted up
    against the chosen setting's naive t interval, covers the true 0.5."""
    noise = np.random.default_rng(7).normal(0.0, 0.1, size=(5, 10))
    runs = pd.DataFrame([{"run": f"x_{j}_{i}", "variant": "x", "status": "ok", "loss": "dpo", "loss.beta": float(j),
                          "seed": i, rk.KL: 1.0 + j / 10, rk.REWARD: 1.0, rk.GAP: 0.5 + noise[i, j],
                          rk.ACCURACY: 0.7} for i in range(5) for j in range(10)])
    best = rk.best_setting(runs, ["loss.beta"])
    chosen = noise[:, int(float(best["best_gap.setting"].split("=")[1]))] + 0.5
    half = T_975_4DF * chosen.std(ddof=1) / math.sqrt(5)
    assert best["best_gap.mean"] == pytest.approx(chosen.mean()) == pytest.approx(0.5 + noise.mean(0).min())
    assert best["best_gap.mean"] < best["best_gap.corrected"]
    assert best["best_gap.lo"] > chosen.mean() - half and best["best_gap.hi"] > chosen.mean() + half
    assert best["best_gap.lo"] < 0.5 < best["best_gap.hi"]


def test_a_calibrating_grid_is_compared_at_its_targets_without_interpolation():
    """At each reached target, each loss's runs at the chosen knob value; the gaps are compared paired by seed. Here
    b's gap is a's minus 0.05 on every seed at target 1, so b leads by exactly 0.05; a run at another value is ignored,
    and an unreachable target is not compared."""
    rows = []
    for seed, noise in enumerate((0.0, 0.02, -0.01)):
        for variant, knob, value, gap in (("a", "loss.beta", 0.5, 0.30), ("b", "model.optimizer.init_args.lr", 1e-4, 0.25),
                                          ("a", "loss.beta", 2.0, 0.10)):  # a at another value: not chosen
            rows.append({"run": f"{variant}{value}_{seed}", "variant": variant, "status": "ok", "loss": variant,
                         "seed": seed, "loss.beta": value if knob == "loss.beta" else np.nan,
                         "model.optimizer.init_args.lr": value if knob != "loss.beta" else 5e-4,
                         rk.KL: 1.0 + noise, rk.REWARD: 1.9 - gap - noise, rk.GAP: gap + noise, rk.ACCURACY: 0.7})
    calibration = pd.DataFrame([
        {"variant": "a", "target": 1.0, "status": "reached", "key": "model.loss.beta", "value": 0.5},
        {"variant": "b", "target": 1.0, "status": "reached", "key": "model.optimizer.init_args.lr", "value": 1e-4},
        {"variant": "a", "target": 4.0, "status": "unreachable", "key": "model.loss.beta", "value": 0.5},
    ])
    table = rk.at_targets(pd.DataFrame(rows), calibration).set_index("curve")
    assert list(table["target"]) == [1.0, 1.0] and (table["n"] == 3).all()
    assert table.loc["a", "gap.mean"] == pytest.approx(0.30 + 0.01 / 3)
    assert table.loc["b", "gap_vs_best_other.mean"] == pytest.approx(-0.05)
    assert table.loc["a", "gap_vs_best_other.mean"] == pytest.approx(0.05)
    assert table.loc["a", "gap_vs_best_other.lo"] <= 0.05 <= table.loc["a", "gap_vs_best_other.hi"]
    against = rk.at_targets(pd.DataFrame(rows), calibration, baseline="a").set_index("curve")
    assert against.loc["b", "gap_vs_baseline.mean"] == pytest.approx(-0.05) and against.loc["b", "vs_baseline"] == "better"
    assert pd.isna(against.loc["a", "vs_baseline"])  # the baseline is not compared with itself


def test_standing_says_best_tied_or_behind_at_each_target_and_the_forest_plot_shows_it(tmp_path):
    """At KL 1, b leads; a's paired interval against b excludes 0 (behind), c's includes it (tied). At KL 2 one curve
    has nothing to be paired with: no standing."""
    import matplotlib.pyplot as plt

    from prefopt.study import plots

    table = pd.DataFrame({"target": [1.0, 1.0, 1.0, 2.0], "curve": ["a", "b", "c", "a"],
                          "gap.mean": [0.30, 0.25, 0.27, 0.40], "gap.ci95": [0.02, 0.02, 0.02, 0.03],
                          "gap_vs_best_other.mean": [0.05, -0.02, 0.02, np.nan],
                          "gap_vs_best_other.lo": [0.03, -0.04, -0.01, np.nan],
                          "gap_vs_best_other.hi": [0.07, 0.01, 0.05, np.nan]})
    assert list(rk.standing(table)) == ["behind", "best", "tied", ""]
    read_back = table.assign(standing=["behind", "best", "tied", np.nan])  # at_targets.csv read: "" comes back NaN
    assert list(rk.standing_of(read_back)) == ["behind", "best", "tied", ""]
    assert list(rk.standing_of(read_back.assign(standing="tied"))) == ["tied"] * 4  # the column is read, not redone
    fig = plots.at_targets_figure(table)
    one, two = fig.axes
    assert one.get_title() == "KL 1 nats: 2 of 3 not behind the best" and two.get_title().startswith("KL 2 nats")
    assert [t.get_text() for t in one.get_yticklabels()] == ["a", "c", "b"]  # the smallest gap on top
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["best", "not told apart from the best (paired 95%)"]
    plt.close(fig)
    assert plots.at_targets_plot(table, tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.at_targets_plot(table.iloc[:0], tmp_path / "none.png") is None


def test_t_pvalue_inverts_t_quantile():
    """The t quantile's two-sided p is the level's complement; t = 0 gives 1, an infinite t 0."""
    for n in (2, 3, 5, 10):
        assert t_pvalue(t_quantile(n), n) == pytest.approx(0.05, abs=1e-12)
        assert t_pvalue(-t_quantile(n, 0.99), n) == pytest.approx(0.01, abs=1e-12)
    assert t_pvalue(0.0, 5) == 1.0 and t_pvalue(math.inf, 5) == 0.0 and math.isnan(t_pvalue(1.0, 1))


def test_holm_steps_down_and_stops_at_the_first_failure():
    """p sorted 0.005, 0.01, 0.03, 0.04 against 0.05/4, 0.05/3, 0.05/2, 0.05/1: the first two pass, 0.03 > 0.025
    fails, so 0.04 is not rejected although it is below 0.05. p = 0.02, 0.03: both pass (0.025, then 0.05), where
    Bonferroni (0.025 each) would keep 0.03. NaN (no comparison) is neither counted nor rejected."""
    assert list(rk.holm([0.01, 0.04, 0.03, 0.005])) == [True, False, False, True]
    assert list(rk.holm([0.03, 0.02])) == [True, True]
    assert list(rk.holm([0.03, math.nan, 0.02])) == [True, False, True]
    assert list(rk.holm([0.3, 0.2])) == [False, False]


def test_each_curve_against_the_baseline_is_a_paired_t_interval_with_holm(capsys):
    """Baseline a; b is a - 0.05 on every seed (no spread: p = 0, better); c differs from a by +0.01, -0.01, +0.03
    (mean 0.01, s.d. 0.02 by hand: t = 0.01 / (0.02 / sqrt 3) = 0.866, p ~ 0.48, not resolved)."""
    a = np.array([0.30, 0.32, 0.29])
    wide = pd.DataFrame({"a": a, "b": a - 0.05, "c": a + [0.01, -0.01, 0.03]})
    out = rk.vs_baseline(wide, "a")
    assert set(out) == {"b", "c"}
    assert out["b"]["gap_vs_baseline.mean"] == pytest.approx(-0.05) and out["b"]["vs_baseline"] == "better"
    c = out["c"]
    assert c["gap_vs_baseline.mean"] == pytest.approx(0.01)
    assert c["gap_vs_baseline.hi"] - c["gap_vs_baseline.mean"] == pytest.approx(T_975_2DF * 0.02 / math.sqrt(3))
    assert c["gap_vs_baseline.p"] == pytest.approx(t_pvalue(0.01 / (0.02 / math.sqrt(3)), 3))
    assert 0.4 < c["gap_vs_baseline.p"] < 0.5 and c["vs_baseline"] == "not resolved"
    table = pd.DataFrame({"target": [1.0] * 3, "curve": ["a", "b", "c"], "gap_vs_best_other.mean": [0.05, -0.05, 0.06],
                          "gap_vs_best_other.lo": [0.04, -0.06, -0.01], "gap_vs_best_other.hi": [0.06, -0.04, 0.12],
                          "baseline": [np.nan, "a", "a"], "vs_baseline": [np.nan, "better", "not resolved"]})
    report.print_standings(table)
    assert capsys.readouterr().out.strip() == ("KL 1: best b; not told apart from it: c; behind it: 1 of 3; "
                                               "better than a (Holm): b; worse than a (Holm): none")


def test_the_targets_grid_marks_best_tied_and_the_baseline_verdicts(capsys, tmp_path):
    """One row per curve, one column per target; b leads at KL 1 (*), c is tied (=) and worse than a (-); at KL 2
    only a and b: b leads, a is behind (no mark). Rows in order of mean rank by gap: b (1, 1), c (2), a (3, 2)."""
    table = pd.DataFrame({"target": [1.0, 1.0, 1.0, 2.0, 2.0], "curve": ["a", "b", "c", "a", "b"],
                          "gap.mean": [0.30, 0.25, 0.27, 0.40, 0.35],
                          "standing": ["behind", "best", "tied", "behind", "best"],
                          "baseline": [np.nan, "a", "a", np.nan, "a"],
                          "vs_baseline": [np.nan, "not resolved", "worse", np.nan, "better"]})
    table.to_csv(tmp_path / "at_targets.csv", index=False)
    report.print_at_targets_grid(pd.read_csv(tmp_path / "at_targets.csv"))  # as the notebook reads it back
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "Gap to the frontier at each target (* best, = not told apart from the best, +/- better/worse " \
                       "than a (Holm); blank: target not reached):"
    assert [line.split() for line in lines[-3:]] == [["b", "0.250*", "0.350*+"], ["c", "0.270=-"], ["a", "0.300", "0.400"]]


def test_a_folder_without_tables_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path)])
    assert str(exit_.value) == f"error: {tmp_path}: no runs.csv, not a grid's results folder (python -m prefopt grid " \
                               "writes one)"


def test_panels_wrap_beyond_twelve_curves():
    """The catalog's 53 losses: 12 columns a block, a block of metric rows per 12 curves, the unused panels off."""
    import matplotlib.pyplot as plt

    from prefopt.study import plots

    panels = plots._Panels(30, rows=3)
    assert np.shape(panels._axes) == (9, 12)
    assert panels.ax(2, 13) is panels._axes[5][1] and panels.ax(0, 29) is panels._axes[6][5]
    assert panels.first_column(24) and not panels.first_column(13)
    assert sum(ax.axison for ax in panels.fig.axes) == 3 * 30
    plt.close(panels.fig)


def test_targets_only_for_runs_from_the_tasks_reference():
    """A target is a tilt of the base: a weak start, a reference reset after SFT or updated during the run, or pairs
    drawn from the moving policy have none."""
    assert report._from_task_reference(pd.DataFrame({"model.model": ["gold", float("nan")]}))
    assert report._from_task_reference(pd.DataFrame({"x": [1]}))
    assert not report._from_task_reference(pd.DataFrame({"model.model": ["gold_weak"]}))
    assert not report._from_task_reference(pd.DataFrame({"model.model": ["gold"], "model.sft_steps": [100]}))
    assert report._from_task_reference(pd.DataFrame({"model.sft_steps": [0], "model.reference_update.every": [0],
                                                     "model.reference_update.alpha": [0.6], "data.online": [None]}))
    assert not report._from_task_reference(pd.DataFrame({"model.reference_update.every": [50]}))  # TR-DPO
    assert not report._from_task_reference(pd.DataFrame({"data.online.pairs_per_round": [512]}))  # on-policy pairs


def test_the_online_results_verdicts_are_rederived_from_its_runs_and_shown_in_its_readme():
    """results/online: the verdicts the report derives from the committed runs and calibration are the committed
    verdicts.csv, and its README shows `python -m prefopt.study.verdicts results/online` as that command prints it.
    (The whole report takes minutes there; the README's scenario report command re-derives a scenario's in full.)"""
    from prefopt.study.report import read_tables
    from prefopt.study.scenarios import read_scenario
    from prefopt.study.verdicts import markdown, verdicts

    folder = Path(__file__).resolve().parents[1] / "results" / "online"
    runs, _, _ = read_tables(folder)
    derived = verdicts(runs, pd.read_csv(folder / "calibration.csv"), read_scenario(folder))
    pd.testing.assert_frame_equal(derived, pd.read_csv(folder / "verdicts.csv"), check_exact=False, rtol=1e-6,
                                  check_dtype=False)
    assert markdown([folder]) in (folder / "README.md").read_text()
