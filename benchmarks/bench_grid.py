"""Grid throughput: one grid run the old way and the new way, interleaved, with the ratio and the metric differences.

The old way is a baseline commit's own code (default: `3a82584`, the last commit before the grid-throughput levers),
exported with `git archive` and run as its `python -m prefopt grid` (a fresh `python -m prefopt fit` process per
run); the new way is this checkout's `python -m prefopt grid` (worker processes, and every lever since). Both read the
same grid file, with the same workers, seeds, pairs and cache (`$PREFOPT_CACHE`, warmed first so neither pays for
building the built-in task's pairs or reference log-probs).

The machine's speed drifts by 10-30% over minutes, so the grid is cut into slices (one per seed) and the two ways
alternate, A B B A A B ..., each slice into its own results folder of that way; the ratio is total old wall time over
total new wall time, and each slice's ratio is printed too. Then every run present in both folders is compared:
the largest absolute difference of each metric in `metrics.json` (final and history) and how many runs are
bit-identical.

    python benchmarks/bench_grid.py                                  # the default grid, 69 runs each way (~25 min)
    python benchmarks/bench_grid.py --runs 'dpo_*' --set trainer.max_steps=60   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "3a82584"
KEY_METRICS = ("val/gold/gold_reward", "val/gold/sampled_kl", "val/gold_heldout/gold_reward", "val/accuracy",
               "val/margin_nats", "val/kl_per_token", "val/loss")


def export(rev: str, where: Path) -> Path:
    """The baseline commit's tree in `where` (a plain copy: no worktree left registered in the repository)."""
    if where.is_dir():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def grid_command(tree: Path, grid: Path, out: Path, workers: int, runs: str, sets: list[str]) -> tuple[list[str], dict]:
    command = [sys.executable, "-m", "prefopt", "grid", "--config", str(grid), "--out", str(out), "--workers",
               str(workers), "--runs", runs, *[f"--set={s}" for s in sets]]
    env = dict(os.environ, PYTHONPATH=str(tree))
    return command, env


def timed(command: list[str], env: dict, cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "ab") as out:
        code = subprocess.run(command, env=env, cwd=cwd, stdout=out, stderr=out).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit code {code}); see {log}")
    return seconds


def seeds_of(grid: Path) -> list[int]:
    spec = yaml.safe_load(grid.read_text())
    return list((spec.get("axes") or {}).get("seed") or [0])


def metric_differences(old: Path, new: Path) -> dict:
    """Every run in both folders: the largest |old - new| per metric over final values and the whole history."""
    worst: dict[str, float] = {}
    identical = compared = 0
    for run in sorted(p.name for p in (new / "runs").iterdir() if (old / "runs" / p.name).is_dir()):
        a = json.loads((old / "runs" / run / "metrics.json").read_text())
        b = json.loads((new / "runs" / run / "metrics.json").read_text())
        compared += 1
        same = a["final"] == b["final"] and a["history"] == b["history"]
        identical += same
        rows = [(a["final"], b["final"])] + list(zip(a["history"], b["history"]))
        for x, y in rows:
            for key in set(x) & set(y):
                if key != "step" and isinstance(x[key], (int, float)) and isinstance(y[key], (int, float)):
                    worst[key] = max(worst.get(key, 0.0), abs(x[key] - y[key]))
    return {"runs": compared, "identical": identical, "max_abs_diff": dict(sorted(worst.items()))}


def run_times(folder: Path) -> list[float]:
    return sorted(json.loads(p.read_text()).get("run_time_s", math.nan) for p in (folder / "runs").glob("*/run.json"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="experiments/grids/default.yaml")
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose runner is the old way")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", default="*", help="only these runs (shell patterns as `grid --runs`, without the "
                        "seed: each slice appends _seed<N>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as `grid --set`, both ways")
    parser.add_argument("--out", default="/tmp/bench_grid", help="scratch folder (removed first)")
    parser.add_argument("--json", help="also write the record here")
    args = parser.parse_args(argv)

    grid, out = (ROOT / args.grid).resolve(), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    baseline = export(args.baseline, out / "baseline")
    log = out / "log.txt"
    short = ["trainer.max_steps=1", "trainer.val_check_interval=1"]
    keep = [s for s in args.set if s.partition("=")[0] not in {k.partition("=")[0] for k in short}]
    warm, warm_env = grid_command(ROOT, grid, out / "warmup", args.workers, args.runs, keep + short)
    timed(warm, warm_env, ROOT, log)  # the pairs and reference log-probs of every seed, in the shared cache
    ways = {"old": (baseline, out / "old"), "new": (ROOT, out / "new")}
    slices = []
    for k, seed in enumerate(seeds_of(grid)):
        pattern = ",".join(f"{p}_seed{seed}" for p in args.runs.split(","))
        times = {}
        for way in (("old", "new") if k % 2 == 0 else ("new", "old")):
            tree, folder = ways[way]
            command, env = grid_command(tree, grid, folder, args.workers, pattern, args.set)
            times[way] = timed(command, env, tree, log)
            print(f"seed {seed}: {way} {times[way]:.1f} s", file=sys.stderr, flush=True)
        slices.append({"seed": seed, **times, "ratio": times["old"] / times["new"]})
    total = {w: sum(s[w] for s in slices) for w in ways}
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
              "cpus": len(os.sched_getaffinity(0)), "grid": args.grid, "runs": args.runs, "set": args.set,
              "workers": args.workers, "baseline": args.baseline, "commit": _commit(), "slices": slices,
              "total_s": total, "ratio": total["old"] / total["new"],
              "median_run_s": {w: _median(run_times(f)) for w, (_, f) in ways.items()},
              "metrics": metric_differences(out / "old", out / "new")}
    print(report(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


def _median(values: list[float]) -> float:
    return values[len(values) // 2] if values else math.nan


def _commit() -> str:
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip()


def report(record: dict) -> str:
    """The printed table: wall time per slice and way, the ratio, and the metric differences."""
    lines = [f"{record['date']}, {record['machine']}, {record['cpus']} CPUs; grid {record['grid']} (runs "
             f"{record['runs']}{', set ' + ' '.join(record['set']) if record['set'] else ''}), {record['workers']} "
             f"workers; old: commit {record['baseline']}, a process per run; new: commit {record['commit']}", "",
             "| slice | old (s) | new (s) | old / new |", "|---|---|---|---|"]
    for s in record["slices"]:
        lines.append(f"| seed {s['seed']} | {s['old']:.1f} | {s['new']:.1f} | {s['ratio']:.2f}x |")
    total = record["total_s"]
    lines.append(f"| **all** | **{total['old']:.1f}** | **{total['new']:.1f}** | **{record['ratio']:.2f}x** |")
    median = record["median_run_s"]
    lines += ["", f"median run time: old {median['old']:.1f} s, new {median['new']:.1f} s", ""]
    metrics = record["metrics"]
    lines += [f"metrics: {metrics['runs']} runs compared, {metrics['identical']} bit-identical (final and history)", "",
              "| metric | max abs difference |", "|---|---|"]
    for key, value in metrics["max_abs_diff"].items():
        if key in KEY_METRICS or value > 0:
            lines.append(f"| {key} | {value:.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
