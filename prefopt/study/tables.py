"""Tables derived from a grid's run folders: `runs.csv`/`runs.parquet`, `summary.csv` and `history.csv`.

Each run folder (`results/<grid>/runs/<run>/`) holds the grid's `run.json` (what the grid assigned), the run's own
`metrics.json` and resolved `config.yaml`, and `error.txt` if it failed. The tables are rebuilt from those files
after every run, and every table is written atomically (a temporary file, then `os.replace`), so a grid killed at
any moment leaves each table either complete or as it was.

Columns of runs.csv: run, curve (`add_curves`), variant, status (ok, failed, unfinished), loss,
`loss.<hyperparameter>` for every hyperparameter, seed, every other key the grid assigns (dotted), a few resolved
settings (`RESOLVED`), git_commit, data_hash, run_time_s, load_start (the 1-minute load average when the run
started: timings on a busy machine are noisy), wall_time_s, train_pairs_per_s, train_loss, step, error, the final
validation metrics by name (`val/gold/gold_reward`) and those at the best monitored value as `best/<name>`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from prefopt.files import remove_stale_temporaries, write_atomic, write_json  # noqa: F401  (re-exported)
from prefopt.study.grid import lookup

# Settings of the resolved config copied into every row, whether or not the grid sweeps them.
RESOLVED = ("model.model", "data.dataset", "trainer.max_steps", "data.batch_size",
            "model.optimizer.init_args.lr", "data.gold.label_temperature", "data.max_train_pairs")
RUN_FILE, METRICS_FILE, ERROR_FILE, CONFIG_FILE = "run.json", "metrics.json", "error.txt", "config.yaml"


def write_csv(df: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- run status
def run_status(run_dir: Path, spec: Mapping[str, Any] | None = None) -> str:
    """ok (metrics.json says finished), failed (error.txt), unfinished (started, not ended), or pending.

    With `spec` (the run.json the grid would write now), a run started with different arguments is `stale`.
    """
    recorded = _read_json(run_dir / RUN_FILE)
    if recorded is None:
        return "pending"
    if spec is not None and portable_args(recorded) != portable_args(spec):
        return "stale"
    if (run_dir / ERROR_FILE).is_file():
        return "failed"
    metrics = _read_json(run_dir / METRICS_FILE)
    return "ok" if metrics and metrics.get("finished") else "unfinished"


def portable_args(spec: Mapping[str, Any]) -> list[str]:
    """A run.json's `args` with the base config paths inside its checkout (`root`) made relative to it, so that a
    grid rerun from a clone or a moved checkout still recognizes its finished runs; and its loss with every
    hyperparameter filled in, so that a hyperparameter added to a loss later, at a default that keeps the old
    computation (ORPO's `nll`, say), does not make the runs recorded before it stale."""
    root = spec.get("root")
    out = []
    for arg in spec.get("args") or []:
        if root and arg.startswith("--config=") and Path(arg[9:]).is_relative_to(root):
            arg = "--config=" + Path(arg[9:]).relative_to(root).as_posix()
        elif arg.startswith(LOSS_ARG):
            arg = LOSS_ARG + _complete_loss(arg[len(LOSS_ARG):])
        out.append(arg)
    return out


LOSS_ARG = "--model.loss="


def _complete_loss(text: str) -> str:
    """A loss's JSON with its current defaults filled in (as it was, if it no longer validates)."""
    from prefopt.losses import LossConfig

    try:
        return json.dumps(LossConfig.from_value(json.loads(text)).to_dict(), sort_keys=True)
    except (ValueError, TypeError):
        return text


# ---------------------------------------------------------------------------------------------- rows
def _flatten(value: Any) -> Any:
    """A cell value: lists and mappings (a composite loss's terms) as JSON text."""
    return json.dumps(value) if isinstance(value, (list, Mapping)) else value


def run_row(run_dir: Path) -> dict[str, Any]:
    """One row of runs.csv from a run folder's files."""
    spec = _read_json(run_dir / RUN_FILE) or {}
    row: dict[str, Any] = {"run": run_dir.name, "variant": spec.get("variant"), "status": run_status(run_dir)}
    loss = spec.get("loss") or {}
    row["loss"] = loss.get("name")
    row.update({f"loss.{k}": _flatten(v) for k, v in loss.items() if k != "name"})
    row["seed"] = spec.get("seed")
    row["along"] = " ".join(spec.get("along") or []) or None
    row.update({k: _flatten(v) for k, v in (spec.get("assigned") or {}).items()
                if not k.startswith("model.loss") and k != "seed_everything"})
    config_path = run_dir / CONFIG_FILE
    try:  # a config.yaml cut short (a full disk, a hand edit) costs its row the resolved settings, not the table
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, yaml.YAMLError):
        config = {}
    for key in RESOLVED:
        row.setdefault(key, _flatten(lookup(config or {}, key)))
    metrics = _read_json(run_dir / METRICS_FILE) or {}
    row.update(git_commit=spec.get("git_commit"), data_hash=metrics.get("data_hash"), run_time_s=spec.get("run_time_s"),
               load_start=spec.get("load_start"))
    for key in ("wall_time_s", "train_pairs_per_s", "train_loss", "step"):
        row[key] = metrics.get(key)
    error = run_dir / ERROR_FILE
    row["error"] = error.read_text()[-2000:] if error.is_file() else None
    row.update(metrics.get("final") or {})
    row.update({f"best/{k}": v for k, v in (metrics.get("best") or {}).items()})
    return row


def history_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's validation metrics at every validation (metrics.json `history`), one row per step."""
    metrics = _read_json(run_dir / METRICS_FILE) or {}
    return [{"run": run_dir.name, **entry} for entry in metrics.get("history") or []]


# ---------------------------------------------------------------------------------------------- summary
@functools.lru_cache(maxsize=None)
def t_quantile(n: int, level: float = 0.95) -> float:
    """The two-sided `level` Student-t quantile for a mean of n values (n - 1 degrees of freedom); NaN for n < 2.

    Exact, without scipy: bisection on the closed-form CDF for integer degrees of freedom (`_t_central_mass`).
    n = 2, 3, 5, 10, 30 give 12.706, 4.303, 2.776, 2.262, 2.045 at the 95% level.
    """
    if n < 2:
        return math.nan
    df, lo, hi = n - 1, 0.0, math.pi / 2  # bisect on theta = atan(t / sqrt(df)), where the mass is monotone
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central_mass(mid, df) < level else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def t_pvalue(t: float, n: int) -> float:
    """The two-sided p-value of a t statistic for a mean of n values (n - 1 degrees of freedom); NaN for n < 2."""
    if n < 2 or math.isnan(t):
        return math.nan
    return max(0.0, 1.0 - _t_central_mass(math.atan(abs(t) / math.sqrt(n - 1)), n - 1))


def _t_central_mass(theta: float, df: int) -> float:
    """P(|T| < t) for T ~ Student-t with integer df, t = sqrt(df) tan(theta) (Abramowitz and Stegun 26.7.3-4).

    odd df:  (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
    even df: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
    """
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    odd = df % 2
    term, total = 1.0, 1.0
    for k in range(1, (df - 1) // 2 if odd else df // 2):
        term *= (2 * k if odd else 2 * k - 1) / (2 * k + 1 if odd else 2 * k) * cos2
        total += term
    if odd:
        return 2 / math.pi * (theta + (sin * math.cos(theta) * total if df > 1 else 0.0))
    return sin * total


BOOKKEEPING = ("git_commit", "data_hash", "run_time_s", "load_start", "wall_time_s", "train_pairs_per_s",
               "train_loss", "step", "error")


def _is_metric(column: str) -> bool:
    return column.startswith(("val/", "best/", "train/")) or column in BOOKKEEPING


def order_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """run, variant, status, loss, loss.*, seed, assigned keys, resolved settings, bookkeeping, metrics, best/*."""
    cols = list(runs.columns)
    head = [c for c in ("run", "variant", "status", "loss") if c in cols]
    loss = sorted(c for c in cols if c.startswith("loss."))
    seed = ["seed"] if "seed" in cols else []
    resolved = [c for c in RESOLVED if c in cols]
    assigned = [c for c in cols if c not in {*head, *loss, *seed, *resolved} and not _is_metric(c)]
    books = [c for c in BOOKKEEPING if c in cols]
    final = sorted(c for c in cols if c.startswith(("val/", "train/")))
    best = sorted(c for c in cols if c.startswith("best/"))
    return runs[head + loss + seed + assigned + resolved + books + final + best]


def group_columns(runs: pd.DataFrame) -> list[str]:
    """What identifies one (loss, hyperparameters) setting: variant, loss, its hyperparameters, every assigned key
    but the seed, and the resolved settings that differ between runs."""
    keys = [c for c in runs.columns if c not in ("run", "curve", "status", "seed", "along") and not _is_metric(c)]
    return [c for c in keys if c not in RESOLVED or _varies(runs, c)]


def _varies(runs: pd.DataFrame, column: str) -> bool:
    """Whether `column` differs between the complete runs (a run still going has no resolved config yet)."""
    done = runs[runs["status"] == "ok"] if "status" in runs else runs
    return done[column].nunique(dropna=False) > 1


def curve_columns(runs: pd.DataFrame) -> list[str]:
    """What identifies a curve: a setting's columns except those that vary along it: the loss hyperparameters, and the
    keys a run names in `along` (the learning rate a calibrating grid searched for a loss without a strength knob)."""
    along = {k for v in runs.get("along", pd.Series(dtype=object)).dropna() for k in str(v).split()}
    return [c for c in group_columns(runs) if not c.startswith("loss.") and c not in along]


def add_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """runs with a `curve` label after `run`: the variant, plus any other curve column that differs between runs
    (`dpo`, or `dpo lr=0.001`). A curve is one loss setting swept along its hyperparameters, across seeds."""
    keys = [k for k in curve_columns(runs) if k not in ("variant", "loss") and _varies(runs, k)]
    labels = [" ".join([str(row["variant"]), *(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in keys if pd.notna(row[k]))])
              for _, row in runs.iterrows()]
    out = runs.drop(columns=["curve"], errors="ignore")
    out.insert(1, "curve", labels)
    return out


def metric_columns(runs: pd.DataFrame) -> list[str]:
    numeric = runs.select_dtypes("number").columns
    return [c for c in numeric if _is_metric(c)]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1) and 95% t confidence half-width across seeds, per setting (ok runs only).

    Columns: the group columns, n (seeds), seeds, then `<metric>.mean`, `<metric>.std`, `<metric>.ci95`. Vectorized
    over settings and metrics (the grid rewrites this table as its runs finish: a per-cell loop took 18 s at 477 runs).
    """
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    keys, metrics = ["curve", *group_columns(runs)] if "curve" in runs else group_columns(runs), metric_columns(ok)
    stats = [f"{m}.{s}" for m in metrics for s in ("mean", "std", "ci95")]
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "n", "seeds", *stats])
    groups = ok.groupby(keys, dropna=False, sort=False).indices  # {setting: row positions}, in order of appearance
    values = ok[metrics].to_numpy(dtype=float)  # (runs, metrics); NaN: a metric a run does not have
    heads, blocks = [], []
    for setting, rows in groups.items():
        heads.append((*(setting if isinstance(setting, tuple) else (setting,)), len(rows),
                      " ".join(str(v) for v in sorted(ok["seed"].iloc[rows].tolist()))))
        blocks.append(_mean_std_ci95(values[rows]))
    head = pd.DataFrame(heads, columns=[*keys, "n", "seeds"])
    table = pd.DataFrame(np.stack(blocks), columns=stats)  # ok has rows, so at least one setting
    return pd.concat([head, table], axis=1)


def _mean_std_ci95(x: np.ndarray) -> np.ndarray:
    """Per column of x (seeds, metrics), skipping NaN: mean, s.d. (ddof 1) and 95% t half-width, interleaved. Two
    passes in row order, as pandas' Series.mean and .std compute them, so the tables keep their digits."""
    missing = np.isnan(x)
    n = (~missing).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(missing, 0.0, x).sum(0) / n
        std = np.sqrt(np.where(missing, 0.0, (mean - x) ** 2).sum(0) / (n - 1))
        std[n < 2] = np.nan
        half = np.array([t_quantile(int(k)) if k > 1 else np.nan for k in n]) * std / np.sqrt(n)
    return np.stack([mean, std, half], axis=1).reshape(-1)


# ---------------------------------------------------------------------------------------------- writing
# A run folder's (row, history rows), kept with the size and modification time of each file they were read from: the
# grid rewrites its tables after every run, and re-reading every folder each time grows with the square of the runs
# (a 1,800-run grid would parse three million config files).
_ROWS: dict[Path, tuple[tuple, dict[str, Any], list[dict[str, Any]]]] = {}
_READ = (RUN_FILE, METRICS_FILE, ERROR_FILE, CONFIG_FILE)


def _stamp(run_dir: Path) -> tuple:
    stamp = []
    for name in _READ:
        try:
            st = os.stat(run_dir / name)
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))  # atomic rewrites get a new inode
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def collect(run_dirs: Iterable[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history) DataFrames of the run folders that exist (a folder's files are read again only once one of
    them has changed)."""
    rows, history = [], []
    for run_dir in run_dirs:
        stamp = _stamp(run_dir)
        if stamp[0] is None:  # no run.json: not started
            continue
        key = run_dir.resolve()
        cached = _ROWS.get(key)
        if cached is None or cached[0] != stamp:
            cached = _ROWS[key] = (stamp, run_row(run_dir), history_rows(run_dir))
        rows.append(dict(cached[1]))
        history += cached[2]
    return (add_curves(order_columns(pd.DataFrame(rows))) if rows else pd.DataFrame()), pd.DataFrame(history)


def write_tables(out: Path, run_dirs: Iterable[Path]) -> pd.DataFrame:
    """Write runs.csv, runs.parquet, summary.csv and history.csv into `out`; returns the runs table."""
    runs, history = collect(run_dirs)
    if runs.empty:
        return runs
    write_csv(runs, out / "runs.csv")
    write_atomic(out / "runs.parquet", lambda tmp: _parquet(runs).to_parquet(tmp, index=False))
    write_csv(summarize(runs), out / "summary.csv")
    write_csv(history, out / "history.csv")
    return runs


def _parquet(runs: pd.DataFrame) -> pd.DataFrame:
    """Parquet needs one type per column: object columns that mix types become strings (None stays null)."""
    out = runs.copy()
    for c in out.columns[out.dtypes == object]:
        kinds = {type(v) for v in out[c].dropna()}
        if len(kinds) > 1:
            out[c] = out[c].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return out
