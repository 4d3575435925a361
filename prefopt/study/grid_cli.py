"""`python -m prefopt grid --config experiments/grids/<name>.yaml [--workers N] [--runs PATTERN] [--dry-run]
[--fresh-process]`.

The command: read and expand the grid file (`prefopt.study.grid`), check one run per variant, then run the runs
locally (`prefopt.study.runner`) or as Ray tasks (`prefopt.study.ray_runner`). Kept apart from `prefopt.study.grid` so that the
grid's definition does not import its runners.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefopt.study.grid import GridError, check_configs, default_workers, expand, load_grid, select, with_overrides
from prefopt.study.calibrated import Calibration, run_calibrated
from prefopt.study.runner import GridRunner
from prefopt.study.scenarios import SCENARIO_FILE
from prefopt.study.tables import write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefopt grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the grid file, e.g. experiments/grids/default.yaml")
    parser.add_argument("--out", help="results folder (default: results/<grid name>)")
    parser.add_argument("--workers", type=int, help="parallel runs (default: the grid's `workers`, else the cores)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    parser.add_argument("--no-check", action="store_true", help="skip parsing one run per variant before starting")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: worker processes on this machine; ray: one Ray task per run (pip install -e .[ray])")
    parser.add_argument("--ray-address", help="the Ray cluster to join (e.g. auto, ray://head:10001); default: a local instance")
    parser.add_argument("--cpus-per-run", type=float, default=1, help="Ray backend: CPUs each run asks for")
    parser.add_argument("--gpus-per-run", type=float, default=0, help="Ray backend: GPUs each run asks for")
    parser.add_argument("--fresh-process", action="store_true",
                        help="start a new `python -m prefopt fit` process for every run (the old way: ~9 s of imports "
                        "each) instead of worker processes that import once and run many runs")
    parser.add_argument("--runs", metavar="PATTERN", help="only the runs whose names match these shell patterns "
                        "(comma-separated), e.g. 'dpo_beta0.5_*,kto_*_seed0'")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a fixed override added to the grid's `set` (YAML value), e.g. model.scoring.reference_cache=false")
    args = parser.parse_args(argv)
    try:
        grid = with_overrides(load_grid(args.config), args.set)
        if grid.calibrate is not None:
            if args.runs:
                raise GridError("--runs selects runs of a grid with hyperparameter lists; a calibrating grid decides "
                                "its runs as it goes")
            calibration = Calibration(grid, Path(args.out or Path("results") / grid.name))
            runs = calibration.first_runs()
        else:
            runs = select(expand(grid), args.runs)
        if not args.no_check:
            check_configs(grid, runs)
    except GridError as err:
        parser.exit(2, f"error: {err}\n")
    out = Path(args.out or Path("results") / grid.name)
    if grid.scenario is not None and not args.dry_run:  # the prediction is on disk before any run
        out.mkdir(parents=True, exist_ok=True)
        write_json(grid.scenario, out / SCENARIO_FILE)
    launcher = None
    if args.backend == "ray" and not args.dry_run:
        from prefopt.study.ray_runner import RayLauncher

        launcher = RayLauncher(args.ray_address, num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run)
    workers = args.workers or grid.workers or (launcher.capacity() if launcher else default_workers())
    if grid.calibrate is not None:
        return run_calibrated(calibration, workers, launcher, dry_run=args.dry_run, fresh_process=args.fresh_process)
    runner = GridRunner(grid, runs, out, workers=workers, launcher=launcher, fresh_process=args.fresh_process)
    if args.dry_run:
        runner.print_plan()
        return 0
    return runner.run()
