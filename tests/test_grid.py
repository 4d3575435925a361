"""The grid runner: expansion, names, dry run, parallel runs, failures, resume, atomic tables, every grid file.

Most tests run grids of *stub* runs (a 20-line script in place of `python -m prefopt fit`, selected with
PREFOPT_GRID_FIT_COMMAND) so they take seconds; one test runs real fits of the micro model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)

from prefopt.study import grid as grid_mod
from prefopt.study import grid_cli
from prefopt.study import tables
from prefopt.study.grid import GridError, expand, load_grid

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "runs", "results", "lightning_logs", ".cache", "node_modules"}

STUB = r'''
import json, os, signal, sys, time


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    run_dir = os.path.join(args["trainer.logger.init_args.save_dir"], args["trainer.logger.init_args.name"])
    os.makedirs(run_dir, exist_ok=True)
    loss, seed, start = json.loads(args["model.loss"]), int(args.get("seed_everything", 0)), time.time()
    time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
    record = {"run": os.path.basename(run_dir), "start": start, "end": time.time(), "ckpt": args.get("ckpt_path"),
              "threads": os.environ.get("OMP_NUM_THREADS"), "cache": os.environ.get("PREFOPT_CACHE"),
              "pid": os.getpid()}
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps(record) + "\n")
    print("stub run", os.path.basename(run_dir))  # into the run's stdout.log
    if str(loss.get("beta")) == os.environ.get("STUB_FAIL_BETA"):
        sys.exit("boom: beta " + str(loss["beta"]) + " fails")
    if str(loss.get("beta")) == os.environ.get("STUB_RAISE_BETA"):
        raise RuntimeError("bug: beta " + str(loss["beta"]))
    if str(loss.get("beta")) == os.environ.get("STUB_CRASH_BETA"):
        os.kill(os.getpid(), signal.SIGKILL)  # a segfault or the OOM killer: the process is gone
    kl = 1.0 / loss["beta"] + 0.1 * seed
    final = {"val/gold/sampled_kl": kl, "val/gold/gold_reward": kl / (1 + kl), "val/accuracy": 0.7}
    metrics = {"final": final, "best": final, "history": [dict(final, step=2.0)], "finished": True, "step": 2}
    tmp = os.path.join(run_dir, ".metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f)
    os.replace(tmp, os.path.join(run_dir, "metrics.json"))


if __name__ == "__main__":
    main(sys.argv[1:])
'''


@pytest.fixture(params=["workers", "process per run"])
def stub(request, tmp_path, monkeypatch, micro_base) -> Path:
    """Runs go to a stub, in worker processes (the default runner) or a process each (`--fresh-process`, the
    Ray backend's way); returns the log file where each stub invocation appends one JSON line."""
    script = tmp_path / "stub_fit.py"
    script.write_text(STUB)
    log = tmp_path / "stub_log.jsonl"
    if request.param == "workers":
        monkeypatch.setenv("PREFOPT_GRID_FIT_FUNCTION", f"{script}:main")
    else:
        monkeypatch.setenv("PREFOPT_GRID_FIT_COMMAND", f"{sys.executable} {script}")
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    return log


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def write_grid(tmp_path: Path, spec: dict, name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_grid(path: Path, out: Path, *extra: str) -> int:
    return grid_cli.main(["--config", str(path), "--out", str(out), "--no-check", *extra])


# ---------------------------------------------------------------------------------------------- expansion
def test_expansion_is_axes_times_variants_with_generated_names(tmp_path, micro_base):
    path = write_grid(tmp_path, {
        "set": {"trainer.max_steps": 2},
        "axes": {"seed": [0, 1]},
        "variants": [
            {"model.loss.name": "dpo", "model.loss.beta": [0.1, 0.5]},
            {"name": "ipo_sum", "model.loss.name": "ipo", "model.loss.average_log_probs": False, "model.loss.beta": [1.0]},
            {"model.loss.name": "kto", "model.loss.beta": 0.2},  # a scalar is fixed, not swept
        ],
    })
    runs = expand(load_grid(path))
    assert [r.name for r in runs] == [
        "dpo_beta0.1_seed0", "dpo_beta0.5_seed0", "ipo_sum_beta1_seed0", "kto_seed0",
        "dpo_beta0.1_seed1", "dpo_beta0.5_seed1", "ipo_sum_beta1_seed1", "kto_seed1",
    ]  # seed-major, 2 seeds x (2 + 1 + 1)
    ipo = runs[2]
    assert ipo.variant == "ipo_sum" and ipo.seed == 0
    # A new loss name starts from that loss's defaults: nothing of the base's dpo leaks in.
    assert ipo.loss == {"name": "ipo", "beta": 1.0, "average_log_probs": False, "ld_alpha": 1.0, "wpo": False}
    args = ipo.overrides(())
    assert "--trainer.max_steps=2" in args and "--seed_everything=0" in args
    assert json.loads(args[-1].split("=", 1)[1]) == ipo.loss
    assert runs[3].loss["beta"] == 0.2 and runs[3].loss["name"] == "kto"


def test_a_string_value_reaches_the_run_as_that_string(tmp_path, capsys):
    """jsonargparse keeps the quotes of a JSON string in a str field: `model.model: gold_weak` must arrive unquoted
    (quoted, it named a hub repository '"gold_weak"' and every run of the weak-start scenario failed)."""
    from prefopt.cli import main

    path = write_grid(tmp_path, {"variants": [{"model.model": "gold_weak", "model.loss.name": "dpo"}]})
    (run,) = expand(load_grid(path))
    args = run.overrides(load_grid(path).base)
    assert "--model.model=gold_weak" in args
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    assert "  model: gold_weak\n" in capsys.readouterr().out  # (data.tokenizer, linked to it, is not printed)


def test_loss_keys_merge_into_the_base_loss(tmp_path, micro_base):
    """The stacked base sets dpo with label smoothing 0.2; sweeping model.loss.beta keeps it."""
    base = tmp_path / "cdpo.yaml"
    base.write_text("model:\n  loss: {name: dpo, beta: 0.3, label_smoothing: 0.2}\n")
    path = write_grid(tmp_path, {"base": [str(base)], "axes": {"model.loss.beta": [0.1, 1.0],
                                 "model.optimizer.init_args.lr": [1e-3, 1e-4]}})
    runs = expand(load_grid(path))
    assert all(r.loss["label_smoothing"] == 0.2 for r in runs)
    assert {r.loss["beta"] for r in runs} == {0.1, 1.0}
    assert runs[0].name == "dpo_beta0.1_lr0.001_seed0"  # short names, values as written; base seed 0
    assert f"--config={base}" in runs[0].overrides(load_grid(path).base)


def test_a_base_file_is_parsed_once_per_version_and_handed_out_as_a_copy(tmp_path, micro_base):
    """base_values caches each base file by its inode, size and mtime: an edit is seen, a caller's change is not."""
    base = tmp_path / "extra.yaml"
    base.write_text("model:\n  loss: {name: dpo, beta: 0.3}\n")
    grid = load_grid(write_grid(tmp_path, {"base": [str(base)], "axes": {"seed": [0]}}))
    first = grid_mod.base_values(grid)
    assert first["model"]["loss"]["beta"] == 0.3
    first["model"]["loss"]["beta"] = 99.0  # the caller's copy
    assert grid_mod.base_values(grid)["model"]["loss"]["beta"] == 0.3
    base.write_text("model:\n  loss: {name: dpo, beta: 0.75}\n")  # a new version of the file (written anew)
    assert grid_mod.base_values(grid)["model"]["loss"]["beta"] == 0.75


def test_the_tables_are_rewritten_after_a_run_only_when_due(tmp_path, micro_base):
    """After a run the tables wait for TABLES_SHARE times their last write's time; a forced write (the start, the end,
    a stop) always happens."""
    from prefopt.study.runner import GridRunner

    grid = load_grid(write_grid(tmp_path, {"axes": {"seed": [0]}}))
    runner = GridRunner(grid, expand(grid), tmp_path / "out", workers=1)
    run_dir = runner.run_dir(runner.runs[0])
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": run_dir.name, "seed": 0}))
    runner._write_tables()
    table = tmp_path / "out" / "runs.csv"
    written = table.stat().st_mtime_ns
    assert runner._tables_due > time.perf_counter()
    runner._write_tables(when_due=True)
    assert table.stat().st_mtime_ns == written, "not due yet: not rewritten"
    runner._tables_due = 0.0
    runner._write_tables(when_due=True)
    assert table.stat().st_mtime_ns != written


def test_short_names_and_values():
    keys = ["model.loss.beta", "model.optimizer.init_args.lr", "data.max_train_pairs", "a.beta"]
    assert grid_mod.short_name("model.optimizer.init_args.lr", keys) == "lr"
    assert grid_mod.short_name("model.loss.beta", keys) == "loss.beta"  # "beta" would be ambiguous
    assert grid_mod.format_value(1e-5) == "1e-05" and grid_mod.format_value(True) == "true"
    assert grid_mod.format_value("torch.optim.AdamW") == "AdamW"
    assert len(grid_mod.format_value({"a": [1, 2]})) == 8


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"axis": {"seed": [0]}}, "unknown keys"),
        ({"axes": {"seed": []}}, "non-empty list"),
        ({"axes": {"model.loss.beta": [0.1]}, "variants": [{"model.loss.bta": 1.0}]}, "no hyperparameter bta"),
        ({"variants": [{"model.loss.name": "dpoo"}]}, "valid names"),
        ({"axes": {"model.loss.beta": [-1.0]}}, "outside the valid range"),
        ({"axes": {"seed": [0]}, "variants": [{"seed": 1}]}, "already set"),
        ({"variants": [{"model.loss.beta": [0.1]}, {"model.loss.beta": [0.1, 0.2]}]}, "both named"),
        ({"variants": [{"model.loss.beta": 0.1}, {"model.loss.beta": 0.2}]}, "both labelled 'dpo'"),
        ({"variants": [{"model.loss.name": "ipo", "model.loss.average_log_probs": True, "model.loss.beta": [0.5]},
                       {"model.loss.name": "ipo", "model.loss.average_log_probs": False, "model.loss.beta": [2.0]}]},
         "both labelled 'ipo'"),
        ({"set": [{"trainer.max_steps": 3}]}, "set must be a mapping"),
        ({"axes": [{"seed": [0, 1]}]}, "axes must be a mapping"),
    ],
)
def test_bad_grid_files_fail_before_anything_runs(tmp_path, micro_base, spec, message):
    with pytest.raises(GridError, match=message):
        expand(load_grid(write_grid(tmp_path, spec)))


def test_one_loss_swept_over_two_variants_is_one_curve(tmp_path, micro_base):
    """Same label and the same unswept settings: allowed (one curve whose betas are listed in two places)."""
    spec = {"variants": [{"model.loss.beta": [0.1, 0.2]}, {"model.loss.beta": [0.5]}]}
    assert {run.variant for run in expand(load_grid(write_grid(tmp_path, spec)))} == {"dpo"}


@pytest.mark.parametrize(
    ("items", "message"),
    [(["trainer.max_steps"], "KEY=VALUE"), (["trainer.max_steps=3", "trainer.max_steps=4"], "twice"),
     (["seed=7"], "already set seed_everything"), (["model.loss.beta=0.3"], "already set model.loss.beta")],
)
def test_command_line_set_may_not_repeat_or_override_a_swept_key(tmp_path, micro_base, items, message):
    grid = load_grid(write_grid(tmp_path, {"axes": {"seed": [0, 1]}, "variants": [{"model.loss.beta": [0.1, 0.5]}]}))
    with pytest.raises(GridError, match=message):
        grid_mod.with_overrides(grid, items)
    assert grid_mod.with_overrides(grid, ["trainer.max_steps=3"]).fixed["trainer.max_steps"] == 3


def test_a_moved_checkout_still_recognizes_its_finished_runs(tmp_path):
    """run.json records the checkout's root: base config paths inside it compare relative to it."""
    run = tmp_path / "run"
    run.mkdir()
    args = lambda root: ["--config=" + str(Path(root) / "experiments" / "dpo.yaml"), "--seed_everything=0"]  # noqa: E731
    (run / tables.RUN_FILE).write_text(json.dumps({"root": "/old/checkout", "args": args("/old/checkout")}))
    (run / tables.METRICS_FILE).write_text(json.dumps({"finished": True}))
    assert tables.run_status(run, {"root": "/new/place", "args": args("/new/place")}) == "ok"
    assert tables.run_status(run, {"root": "/new/place", "args": args("/new/place")[:1]}) == "stale"


def test_a_cut_short_config_yaml_costs_its_row_the_resolved_settings_not_the_table(tmp_path):
    run = tmp_path / "runs" / "dpo_seed0"
    run.mkdir(parents=True)
    (run / tables.RUN_FILE).write_text(json.dumps({"variant": "dpo", "loss": {"name": "dpo"}, "seed": 0}))
    (run / tables.METRICS_FILE).write_text(json.dumps({"finished": True, "final": {"val/loss": 0.5}}))
    (run / tables.CONFIG_FILE).write_text("model: {model: tiny, optimizer: {lr:")  # a partial write
    row = tables.run_row(run)
    assert row["status"] == "ok" and row["val/loss"] == 0.5 and row["model.model"] is None


def test_dry_run_lists_runs_and_checks_the_config(tmp_path, micro_base, capsys):
    path = write_grid(tmp_path, {"axes": {"seed": [0, 1], "model.loss.beta": [0.1, 1.0]}})
    assert grid_cli.main(["--config", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dpo_beta0.1_seed0" in out and "dpo_beta1_seed1" in out and "4 runs, 4 to run" in out
    assert not (tmp_path / "out").exists()
    grid_cli.main(["--config", str(path), "--dry-run", "--no-check", "--set", "model.scoring.reference_cache=false"])
    assert "--model.scoring.reference_cache=false" in capsys.readouterr().out  # --set adds a fixed override
    bad = write_grid(tmp_path, {"set": {"trainer.max_stepz": 3}}, "bad.yaml")
    with pytest.raises(SystemExit):
        grid_cli.main(["--config", str(bad), "--dry-run"])
    assert "max_stepz" in capsys.readouterr().err
    # A loss reading a field that the run's scoring settings cannot produce is refused before any run starts.
    unproducible = write_grid(tmp_path, {"set": {"model.loss.name": "tdpo2", "model.scoring.logps_chunk_size": 8}},
                              "tdpo.yaml")
    with pytest.raises(SystemExit):
        grid_cli.main(["--config", str(unproducible), "--dry-run"])
    assert "'tdpo2' reads chosen_seq_kl" in capsys.readouterr().err


def grid_files() -> list[Path]:
    found = [p for p in ROOT.rglob("*.y*ml") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in found if {"grids", "scenarios"} & set(p.relative_to(ROOT).parts))


def test_the_search_finds_the_shipped_grids():
    assert {ROOT / "experiments" / "grids" / "default.yaml", ROOT / "experiments" / "scenarios" / "label_noise.yaml"} \
        <= set(grid_files())


@pytest.mark.parametrize("path", grid_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_grid_file_expands_and_parses(path, monkeypatch):
    monkeypatch.delenv("PREFOPT_BASE_CONFIG", raising=False)
    grid = load_grid(path)
    runs = expand(grid)
    assert runs and len({r.name for r in runs}) == len(runs)
    grid_mod.check_configs(grid, runs)


# ---------------------------------------------------------------------------------------------- running
def test_runs_in_parallel_and_a_failed_run_does_not_stop_the_others(tmp_path, stub, monkeypatch):
    monkeypatch.setenv("STUB_SLEEP", "1.0")
    monkeypatch.setenv("STUB_FAIL_BETA", "13.0")
    path = write_grid(tmp_path, {"axes": {"seed": [0, 1], "model.loss.beta": [0.5, 13.0, 2.0]}})
    out = tmp_path / "out"
    assert run_grid(path, out, "--workers", "2") == 1  # one setting fails: exit code 1
    records = calls(stub)
    assert len(records) == 6
    pairs = [(a, b) for i, a in enumerate(records) for b in records[i + 1 :]]
    overlaps = sum(a["start"] < b["end"] and b["start"] < a["end"] for a, b in pairs)
    assert overlaps >= 2, "two workers should run two stubs at a time"
    cores = len(os.sched_getaffinity(0))
    assert {r["threads"] for r in records} == {str(max(1, cores // 2))}
    assert {r["cache"] for r in records} == {str((tmp_path / "cache").resolve())}, "one shared cache"
    runs = pd.read_csv(out / "runs.csv").set_index("run")
    assert runs["status"].value_counts().to_dict() == {"ok": 4, "failed": 2}
    assert "boom: beta 13.0 fails" in runs.loc["dpo_beta13_seed0", "error"]
    assert "boom" in (out / "runs" / "dpo_beta13_seed1" / "error.txt").read_text()
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["loss.beta"]) == [0.5, 2.0] and set(summary["n"]) == {2}


def test_resume_skips_complete_runs_and_reruns_failed_and_unfinished_ones(tmp_path, stub, monkeypatch):
    monkeypatch.setenv("STUB_FAIL_BETA", "13.0")
    path = write_grid(tmp_path, {"axes": {"model.loss.beta": [0.5, 1.0, 2.0, 13.0]}})
    out = tmp_path / "out"
    assert run_grid(path, out) == 1
    assert len(calls(stub)) == 4
    # Simulate a kill: beta 1 died after a checkpoint, beta 2 before any; beta 13 failed; beta 0.5 is complete.
    for name in ("dpo_beta1_seed0", "dpo_beta2_seed0"):
        metrics = out / "runs" / name / "metrics.json"
        metrics.write_text(json.dumps(dict(json.loads(metrics.read_text()), finished=False)))
    (out / "runs" / "dpo_beta1_seed0" / "checkpoints").mkdir()
    torch.save({"global_step": 1}, out / "runs" / "dpo_beta1_seed0" / "checkpoints" / "last.ckpt")
    monkeypatch.delenv("STUB_FAIL_BETA")
    assert run_grid(path, out) == 0
    again = {r["run"]: r for r in calls(stub)[4:]}
    assert set(again) == {"dpo_beta1_seed0", "dpo_beta2_seed0", "dpo_beta13_seed0"}
    assert again["dpo_beta1_seed0"]["ckpt"].endswith("dpo_beta1_seed0/checkpoints/last.ckpt")
    assert again["dpo_beta2_seed0"]["ckpt"] is None and again["dpo_beta13_seed0"]["ckpt"] is None
    assert not (out / "runs" / "dpo_beta13_seed0" / "error.txt").exists()
    assert set(pd.read_csv(out / "runs.csv")["status"]) == {"ok"}
    # Complete: a third call runs nothing; a changed setting reruns (its arguments changed).
    assert run_grid(path, out) == 0 and len(calls(stub)) == 7
    changed = write_grid(tmp_path, {"set": {"trainer.max_steps": 3}, "axes": {"model.loss.beta": [0.5, 1.0, 2.0, 13.0]}})
    assert run_grid(changed, out) == 0 and len(calls(stub)) == 11


def test_a_grid_whose_first_runs_all_fail_alike_stops_with_one_message(tmp_path, stub, monkeypatch, capsys):
    monkeypatch.setenv("STUB_FAIL_BETA", "13.0")
    path = write_grid(tmp_path, {"axes": {"seed": [0, 1, 2, 3, 4, 5], "model.loss.beta": [13.0]}})
    assert run_grid(path, tmp_path / "out", "--workers", "1") == 1
    assert len(calls(stub)) == 3, "no run is started after the first three failed alike"
    err = capsys.readouterr().err
    assert "stopped: the first 3 runs all failed with" in err and "boom: beta 13.0 fails" in err
    assert "error.txt" in err


def test_a_grid_whose_runs_fail_differently_goes_on(tmp_path, stub, monkeypatch):
    """Different errors may be the runs' own: the grid stops only on the same error."""
    monkeypatch.setenv("STUB_FAIL_BETA", "13.0")
    path = write_grid(tmp_path, {"variants": [{"model.loss.name": "dpo", "model.loss.beta": [13.0, 0.5]},
                                              {"model.loss.name": "ipo", "model.loss.beta": [13.0]}],
                                 "axes": {"seed": [0, 1]}})
    assert run_grid(path, tmp_path / "out", "--workers", "1") == 1
    assert len(calls(stub)) == 6


def test_table_writes_are_atomic(tmp_path, monkeypatch):
    """A crash between writing the temporary file and renaming it leaves the previous table whole."""
    path = tmp_path / "runs.csv"
    tables.write_csv(pd.DataFrame({"a": [1, 2]}), path)

    def crash(src, dst):
        raise KeyboardInterrupt("killed between runs")

    monkeypatch.setattr(tables.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        tables.write_csv(pd.DataFrame({"a": range(10_000)}), path)
    assert pd.read_csv(path)["a"].tolist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["runs.csv"], "no temporary file left behind"


def test_tables_read_a_run_folder_again_only_when_its_files_change(tmp_path, monkeypatch):
    """Rows are kept between the table writes of one grid (it rewrites them after every run); a folder whose
    run.json, metrics.json, config.yaml or error.txt changed is read again, so the tables never go stale."""
    folders = []
    for i in range(3):
        folder = tmp_path / "runs" / f"r{i}"
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"loss": {"name": "dpo", "beta": i + 1}, "seed": 0}))
        (folder / "metrics.json").write_text(json.dumps({"finished": True, "final": {"val/accuracy": 0.5}}))
        folders.append(folder)
    tables.write_tables(tmp_path, folders)
    reads = []
    original = tables.run_row
    monkeypatch.setattr(tables, "run_row", lambda d: reads.append(d.name) or original(d))
    tables.write_tables(tmp_path, folders)
    assert reads == [], "unchanged folders are not read again"
    (folders[1] / "metrics.json").write_text(json.dumps({"finished": True, "final": {"val/accuracy": 0.75}}))
    (folders[2] / "error.txt").write_text("boom")
    runs = tables.write_tables(tmp_path, folders).set_index("run")
    assert sorted(reads) == ["r1", "r2"]
    assert runs.loc["r1", "val/accuracy"] == 0.75 and runs.loc["r2", "status"] == "failed"
    assert pd.read_csv(tmp_path / "runs.csv").set_index("run").loc["r1", "val/accuracy"] == 0.75


def start_stub_grid(tmp_path: Path, monkeypatch, **popen) -> tuple[Path, Path, subprocess.Popen]:
    """A grid of 6 stub runs of 0.7 s, 2 at a time, started as `python -m prefopt grid` in its own process:
    (grid file, results folder, the process)."""
    monkeypatch.setenv("STUB_SLEEP", "0.7")
    path = write_grid(tmp_path, {"axes": {"seed": [0, 1, 2], "model.loss.beta": [0.5, 1.0]}})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "prefopt", "grid", "--config", str(path), "--out", str(out), "--workers", "2",
               "--no-check"]
    return path, out, subprocess.Popen(command, cwd=ROOT, **popen)


def assert_no_stub_outlived_the_grid(stub: Path) -> None:
    for pid in {r["pid"] for r in calls(stub)}:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), \
            f"process {pid} outlived the grid"


def test_a_grid_killed_with_sigkill_loses_no_finished_run(tmp_path, stub, monkeypatch):
    path, out, process = start_stub_grid(tmp_path, monkeypatch, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120

    def finished() -> set[str]:  # the run folders are the record (the tables follow them, at most 5% of the time)
        runs = out / "runs"
        return {d.name for d in runs.iterdir() if tables.run_status(d) == "ok"} if runs.is_dir() else set()

    while time.time() < deadline and len(finished()) < 2:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(1.0)  # the stubs (or the workers running them) die with the grid (PR_SET_PDEATHSIG)
    assert_no_stub_outlived_the_grid(stub)
    finished_before = finished()
    assert 2 <= len(finished_before) < 6
    for table in out.glob("*.csv"):  # every table whole: it parses
        pd.read_csv(table)
    assert run_grid(path, out) == 0
    starts: dict[str, int] = {}
    for record in calls(stub):
        starts[record["run"]] = starts.get(record["run"], 0) + 1
    assert all(starts[r] == 1 for r in finished_before), "a finished run was run again"
    assert len(starts) == 6 and set(pd.read_csv(out / "runs.csv")["status"]) == {"ok"}
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_a_grid_stopped_by_kill_or_ctrl_c_ends_cleanly_and_logs_the_invocation(tmp_path, stub, monkeypatch, signum):
    """SIGTERM (`kill <pid>`, the way to stop a grid started in the background, which ignores SIGINT) and SIGINT
    both stop the grid: exit 130, no run left running, the tables whole and the invocation in grid.json as
    interrupted; the same command then finishes the rest without running a finished run again."""
    if signum == signal.SIGINT and "PREFOPT_GRID_FIT_FUNCTION" not in os.environ:
        pytest.skip("Ctrl-C is the path the other tests of the runner already take; one runner mode is enough")
    # Ctrl-C's SIGINT acts only where it is not ignored at start: pytest-xdist's workers ignore it, and a child
    # inherits that (as a grid started in the background by a script does), so this child gets the default back.
    restore = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if signum == signal.SIGINT else None
    path, out, process = start_stub_grid(tmp_path, monkeypatch, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    deadline = time.time() + 120
    while time.time() < deadline and len(calls(stub)) < 2:
        time.sleep(0.1)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted: run the same command again to resume" in err
    time.sleep(0.5)
    assert_no_stub_outlived_the_grid(stub)
    log = json.loads((out / "grid.json").read_text())
    assert [entry["ended"] for entry in log] == ["interrupted"] and log[0]["ok"] < 6
    finished_before = {n for n in pd.read_csv(out / "runs.csv").query("status == 'ok'")["run"]}
    assert run_grid(path, out) == 0
    assert [entry["ended"] for entry in json.loads((out / "grid.json").read_text())] == ["interrupted", "finished"]
    starts = [r["run"] for r in calls(stub)]
    assert all(starts.count(r) == 1 for r in finished_before), "a finished run was run again"
    assert set(pd.read_csv(out / "runs.csv")["status"]) == {"ok"}


def test_the_command_line_exits_with_the_tools_status(monkeypatch):
    """`python -m prefopt` and the `prefopt` script both go through cli.run: a tool's integer result is the exit
    status; LightningCLI's object (fit) or export's folder means success, not sys.exit(object)'s status 1."""
    from prefopt import cli

    assert "prefopt = \"prefopt.cli:run\"" in (ROOT / "pyproject.toml").read_text()
    for result, status in ((1, 1), (130, 130), (0, 0), (object(), 0), (Path("exported"), 0)):
        monkeypatch.setattr(cli, "main", lambda result=result: result)
        with pytest.raises(SystemExit) as exit_:
            cli.run()
        assert exit_.value.code == status


def test_workers_run_many_runs_each_and_survive_a_failed_run(tmp_path, stub, monkeypatch):
    """A worker runs run after run in one process; an exception or sys.exit fails that run only, and a run that
    kills its worker (a crash) fails alone: the next run gets a new worker. Each run's output is in its own logs."""
    if "PREFOPT_GRID_FIT_FUNCTION" not in os.environ:
        pytest.skip("worker processes only")
    monkeypatch.setenv("STUB_FAIL_BETA", "13.0")
    monkeypatch.setenv("STUB_RAISE_BETA", "14.0")
    monkeypatch.setenv("STUB_CRASH_BETA", "15.0")
    path = write_grid(tmp_path, {"axes": {"model.loss.beta": [0.5, 13.0, 1.0, 14.0, 2.0, 15.0, 4.0, 8.0]}})
    out = tmp_path / "out"
    assert run_grid(path, out, "--workers", "1") == 1
    records = calls(stub)
    pids = [r["pid"] for r in records]
    assert len(records) == 8 and len(set(pids[:6])) == 1, "one worker ran every run until the crash"
    assert pids[6] == pids[7] != pids[5], "a new worker after the crash"
    runs = pd.read_csv(out / "runs.csv").set_index("run")
    assert runs["status"].value_counts().to_dict() == {"ok": 5, "failed": 3}
    assert "boom: beta 13.0 fails" in (out / "runs" / "dpo_beta13_seed0" / "error.txt").read_text()
    assert "RuntimeError: bug: beta 14.0" in (out / "runs" / "dpo_beta14_seed0" / "error.txt").read_text()
    assert "exit code -9" in (out / "runs" / "dpo_beta15_seed0" / "error.txt").read_text()
    for name in runs.index:
        assert (out / "runs" / name / "stdout.log").read_text() == f"stub run {name}\n"
    assert json.loads((out / "grid.json").read_text())[-1]["processes"] == "workers"


def test_a_worker_that_cannot_start_fails_its_run_with_the_reason(tmp_path, micro_base, monkeypatch):
    monkeypatch.setenv("PREFOPT_GRID_FIT_FUNCTION", f"{tmp_path / 'missing.py'}:main")
    path = write_grid(tmp_path, {"axes": {"model.loss.beta": [0.5]}})
    assert run_grid(path, tmp_path / "out") == 1
    assert "missing.py" in (tmp_path / "out" / "runs" / "dpo_beta0.5_seed0" / "error.txt").read_text()


def test_a_real_micro_grid_runs_two_fits_in_parallel(tmp_path, micro_base, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    path = write_grid(tmp_path, {"set": {"trainer.max_steps": 2, "trainer.val_check_interval": 2},
                                 "axes": {"model.loss.beta": [0.1, 1.0]}})
    out = tmp_path / "out"
    assert grid_cli.main(["--config", str(path), "--out", str(out), "--workers", "2"]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["status"]) == ["ok", "ok"] and list(runs["step"]) == [2, 2]
    assert runs["data_hash"].nunique() == 1 and runs["val/accuracy"].notna().all()
    for name in runs["run"]:
        folder = out / "runs" / name
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((folder / "metrics.json").read_text())["history"][0]["step"] == 2
    assert list((tmp_path / "cache" / "reference_logps").glob("*.pt")), "the reference log-probs were cached"


def test_a_hyperparameter_added_later_at_its_old_behaviour_keeps_recorded_runs(tmp_path):
    """A run recorded before ORPO gained `nll` (default: the old computation) is the same run, not a stale one; a
    changed value still is."""
    old = {"args": ["--seed_everything=0", '--model.loss={"name": "orpo", "lam": 0.1, "ld_alpha": 1.0, "wpo": false}']}
    now = {"args": ["--seed_everything=0", '--model.loss={"name": "orpo", "lam": 0.1, "nll": "completion", '
                    '"ld_alpha": 1.0, "wpo": false}']}
    assert tables.portable_args(old) == tables.portable_args(now)
    changed = {"args": ["--seed_everything=0", '--model.loss={"name": "orpo", "lam": 0.1, "nll": "prompt_and_completion"}']}
    assert tables.portable_args(changed) != tables.portable_args(now)
