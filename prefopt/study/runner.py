"""Run a grid: N worker slots, resumable, tables after every run.

- Runs go to N worker processes that import once and run many runs in-process (`prefopt.study.worker`), or, with
  `fresh_process=True` (`grid --fresh-process`), each to its own `python -m prefopt fit` subprocess: the same
  LightningCLI call either way, the same numbers, ~9 s of imports per run saved by the workers.

- Each run lives in `<out>/runs/<run>/` (the TensorBoard logger's folder): the grid's `run.json`, the run's
  `config.yaml`, `metrics.json`, checkpoints, and its stdout/stderr logs.
- Resumable: a run whose `metrics.json` says `finished` (and whose arguments are unchanged) is skipped; a run that
  was started but never ended (a killed grid) resumes from its `checkpoints/last.ckpt` if it has one, and starts
  again from scratch if that resume fails; a failed run, or one whose arguments changed, starts again from scratch.
- A failed run writes `error.txt` (the tail of its stderr) and does not stop the others.
- Every run gets cores // N torch threads (OMP_NUM_THREADS) and the same $PREFOPT_CACHE, so the reference policy,
  the pairs of each seed and the reference log-probs are computed once and shared by every run (and later grids).
- On Linux a run dies with the grid (PR_SET_PDEATHSIG), so a grid killed with kill -9 leaves no orphan writing
  into its folder; the tables are rewritten atomically after every run (`prefopt.study.tables`).
- Ctrl-C or `kill <pid>` (SIGTERM) stops it cleanly: the running runs end (they resume from their checkpoints), the
  tables are written and the invocation is logged in grid.json as interrupted. A grid started in the background by
  a script ignores SIGINT (the shell sets that), so `kill` is the way to stop one.

The fit command is `python -m prefopt fit`; PREFOPT_GRID_FIT_COMMAND replaces it (a shell-quoted command line; runs
then get a process each), and PREFOPT_GRID_FIT_FUNCTION replaces the workers' `prefopt.cli.main`: how the tests run
grids of stub runs in milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prefopt.study.grid import ROOT, Grid, Run, default_workers
from prefopt.study.worker import FIT_FUNCTION, WorkerPool
from prefopt.study.tables import (ERROR_FILE, METRICS_FILE, RUN_FILE, remove_stale_temporaries, run_status,
                            write_atomic, write_json, write_tables)

STDERR_TAIL = 4000  # characters of a failed run's stderr kept in error.txt
POLL_S = 0.2
SAME_FAILURES = 3  # a grid whose first this-many finished runs all failed the same way stops
TABLES_SHARE = 20  # the tables are rewritten after a run once 20x their last write's time has passed: <= 5% of the
# controller's time (a 1,800-run catalog's tables take seconds to write, and a run ends every few seconds)


def failure_line(tail: str, run_name: str) -> str:
    """The line that says why a run failed (its stderr's last non-blank line), with the run's name taken out, so
    that the same error in two runs reads the same."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1].replace(run_name, "<run>") if lines else "(no output on stderr)"


def checkpoint_step(path: Path) -> int | None:
    """The optimizer steps a Lightning checkpoint has done, or None if it cannot be read."""
    try:
        import torch

        # mmap: the tensors stay on disk (a large model's checkpoint is not read just for its step)
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001  (a cut-short or foreign file: the run then starts again)
        return None


def fit_command() -> list[str]:
    override = os.environ.get("PREFOPT_GRID_FIT_COMMAND")
    return shlex.split(override) if override else [sys.executable, "-m", "prefopt", "fit"]


def git_commit(root: Path = ROOT) -> str | None:
    """The checked-out commit, read from .git's files (HEAD, then the ref it names, loose or packed)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises KeyboardInterrupt, so `kill <pid>` stops a grid as Ctrl-C does (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Active:
    run: Run
    process: subprocess.Popen
    started: float
    stderr: IO[bytes]
    resumed: int | None  # the checkpoint's step when the run resumed, else None
    load: float  # the 1-minute load average when it started: timings taken on a busy machine are noisy


class GridRunner:
    def __init__(self, grid: Grid, runs: list[Run], out: Path, workers: int, launcher: Any = None,
                 fresh_process: bool = False, pool: WorkerPool | None = None) -> None:
        """`launcher`: None runs locally (in worker processes, or a process per run with `fresh_process`); a
        `prefopt.study.ray_runner.RayLauncher` makes each run a Ray task. `pool`: workers shared with other grids
        (the caller closes it); None: this grid's own, closed when it ends."""
        self.grid, self.runs, self.out = grid, runs, Path(out)
        self.workers = max(1, workers)
        self.launcher = launcher
        self.pooled = launcher is None and not fresh_process and (FIT_FUNCTION in os.environ
                                                                   or "PREFOPT_GRID_FIT_COMMAND" not in os.environ)
        self.own_pool = pool is None
        self.pool = pool if pool is not None else WorkerPool()
        self.threads = max(1, default_workers() // self.workers) if launcher is None else max(1, int(launcher.num_cpus))
        self.commit = git_commit()
        self.tty = sys.stderr.isatty()
        self._tables_due = 0.0  # when the tables may next be rewritten after a run (`_write_tables`)

    # ---------------------------------------------------------------- per-run files
    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.name

    def spec(self, run: Run) -> dict:
        """run.json: what the grid assigned; `args` decides whether a recorded run is still this run."""
        return {"name": run.name, "variant": run.variant, "assigned": run.assigned, "loss": run.loss,
                "seed": run.seed, "swept": list(run.swept), "along": list(run.along), "args": run.overrides(self.grid.base),
                "grid": self.grid.name, "git_commit": self.commit, "root": str(ROOT)}

    def status(self, run: Run) -> str:
        return run_status(self.run_dir(run), self.spec(run))

    def fit_args(self, run: Run, resume: Path | None) -> list[str]:
        """The run's arguments after `fit`: whether a worker or a fresh process runs it."""
        # The run's folder is <out>/runs/<name>/: the logger's save_dir and name, and an empty version (no version_<n>).
        logger = "--trainer.logger.init_args."
        args = [*run.overrides(self.grid.base), f"{logger}save_dir={self.out.resolve() / 'runs'}",
                f"{logger}name={run.name}", f"{logger}version="]
        return args + ([f"--ckpt_path={resume}"] if resume else [])

    def command(self, run: Run, resume: Path | None) -> list[str]:
        return [*fit_command(), *self.fit_args(run, resume)]

    def environment(self) -> dict[str, str]:
        from prefopt.gold.build import default_cache_dir  # the one cache every run of every grid shares

        env = dict(os.environ, PREFOPT_CACHE=str(Path(default_cache_dir()).resolve()), PYTHONUNBUFFERED="1")
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads), TOKENIZERS_PARALLELISM="false")
        return env

    # ---------------------------------------------------------------- plan
    def print_plan(self) -> None:
        statuses = [self.status(r) for r in self.runs]
        width = max(len(r.name) for r in self.runs)
        for run, status in zip(self.runs, statuses):
            print(f"{run.name:<{width}}  {status:<10}  {' '.join(run.overrides(self.grid.base))}")
        todo = sum(s != "ok" for s in statuses)
        print(f"{len(self.runs)} runs, {todo} to run, into {self.out}; {self.workers} workers x {self.threads} threads")

    # ---------------------------------------------------------------- running
    def _start(self, run: Run, env: dict[str, str]) -> Active:
        run_dir = self.run_dir(run)
        status = self.status(run)
        last = run_dir / "checkpoints" / "last.ckpt"
        resume = last if status == "unfinished" and last.is_file() else None
        step = checkpoint_step(last) if resume else None
        if step is None:
            resume = None
        if resume is None and run_dir.exists():
            shutil.rmtree(run_dir)  # failed, stale or unfinished without a checkpoint: from scratch
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
        write_json(dict(self.spec(run), resumed_from_step=step), run_dir / RUN_FILE)
        stderr = open(run_dir / "stderr.log", "wb+")  # read back by _finish, whoever writes it
        if self.launcher is not None:  # a Ray task on some node of the cluster (shared filesystem)
            process = self.launcher.start(self.command(run, resume), env, Path.cwd(), run_dir / "stdout.log",
                                          run_dir / "stderr.log")
            return Active(run, process, time.perf_counter(), stderr, step, os.getloadavg()[0])
        if self.pooled:
            process = self.pool.start(["fit", *self.fit_args(run, resume)], run_dir / "stdout.log",
                                      run_dir / "stderr.log")
            return Active(run, process, time.perf_counter(), stderr, step, os.getloadavg()[0])
        stdout = open(run_dir / "stdout.log", "ab")
        process = subprocess.Popen(self.command(run, resume), env=env, stdout=stdout, stderr=stderr, cwd=Path.cwd(),
                                   preexec_fn=die_with_parent if sys.platform == "linux" else None)
        stdout.close()
        return Active(run, process, time.perf_counter(), stderr, step, os.getloadavg()[0])

    def _finish(self, active: Active, code: int) -> tuple[str, str]:
        """("ok" or "failed", the failure's line) of a run that has exited."""
        run_dir = self.run_dir(active.run)
        active.stderr.seek(0)
        tail = active.stderr.read().decode(errors="replace")[-STDERR_TAIL:]
        active.stderr.close()
        spec = dict(self.spec(active.run), run_time_s=time.perf_counter() - active.started, exit_code=code,
                    load_start=active.load, load_end=os.getloadavg()[0], workers=self.workers, threads=self.threads,
                    resumed_from_step=active.resumed)
        write_json(spec, run_dir / RUN_FILE)
        if code == 0 and run_status(run_dir) == "ok":
            return "ok", ""
        reason = f"exit code {code}" if code else f"exited 0 without a finished {METRICS_FILE}"
        (run_dir / ERROR_FILE).write_text(f"{reason}\n{tail}")
        return "failed", failure_line(tail, active.run.name) if code else reason

    def run(self) -> int:
        """Run every run that is not complete; returns 0 if all are complete at the end, else 1."""
        try:
            with sigterm_interrupts():
                return self._run()
        finally:
            if self.own_pool:
                self.pool.close()

    def start_workers(self, count: int) -> None:
        """Start `count` worker processes now (their imports then overlap whatever the grid does before its runs)."""
        if not self.pooled:
            return
        if self.pool.env is None:
            self.pool.env, self.pool.preexec_fn = self.environment(), die_with_parent if sys.platform == "linux" else None
        self.pool.prestart(count)

    def _run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        for run in self.runs:
            remove_stale_temporaries(self.run_dir(run))
        todo = [r for r in self.runs if self.status(r) != "ok"]
        progress = Progress(len(self.runs), len(self.runs) - len(todo), self.workers, self.tty)
        self._write_tables()
        if not todo:
            progress.line(f"all {len(self.runs)} runs of {self.grid.name} are complete in {self.out}", final=True)
            return 0
        env, load = self.environment(), os.getloadavg()[0]
        queue, active, retried, outcomes = list(todo), [], set(), []
        try:
            self.start_workers(min(self.workers, len(todo)))
            self._prepare_cache(todo)
            how = "worker processes" if self.pooled else ("Ray tasks" if self.launcher else "a process per run")
            print(f"grid {self.grid.name}: {len(todo)} runs to do into {self.out}; {self.workers} workers x "
                  f"{self.threads} threads ({how}); cache {env['PREFOPT_CACHE']}", file=sys.stderr)
            while queue or active:
                while queue and len(active) < self.workers:
                    active.append(self._start(queue.pop(0), env))
                progress.update(running=len(active))
                time.sleep(POLL_S)
                for a in [a for a in active if a.process.poll() is not None]:
                    active.remove(a)
                    result, why = self._finish(a, a.process.returncode)
                    if result == "failed" and a.resumed is not None and a.run.name not in retried:
                        retried.add(a.run.name)  # a resume that fails (a bad checkpoint): once more from scratch
                        shutil.rmtree(self.run_dir(a.run))
                        queue.insert(0, a.run)
                        continue
                    progress.done(result, time.perf_counter() - a.started, a.run.name)
                    outcomes.append((result, why, a.run))
                    self._write_tables(when_due=True)
                if queue and self._all_failed_alike(outcomes):
                    self._stop(active)
                    why, first = outcomes[0][1], self.run_dir(outcomes[0][2])
                    progress.line(f"stopped: the first {len(outcomes)} runs all failed with\n  {why}\nsee "
                                  f"{first / ERROR_FILE}; fix it, then run the same command again", final=True)
                    self._log_invocation(progress, env["PREFOPT_CACHE"], load, "stopped: the first runs all failed")
                    return 1
        except KeyboardInterrupt:
            self._stop(active)
            progress.line("interrupted: run the same command again to resume", final=True)
            self._log_invocation(progress, env["PREFOPT_CACHE"], load, "interrupted")
            return 130
        self._write_tables()
        progress.line(f"finished: {progress.ok} ok, {progress.failed} failed; tables in {self.out}", final=True)
        self._log_invocation(progress, env["PREFOPT_CACHE"], load, "finished")
        return 0 if progress.failed == 0 else 1

    @staticmethod
    def _all_failed_alike(outcomes: list[tuple[str, str, Run]]) -> bool:
        """The first SAME_FAILURES finished runs all failed, with the same error line."""
        first = outcomes[:SAME_FAILURES]
        return len(first) == SAME_FAILURES and all(r == "failed" for r, _, _ in first) and len({w for _, w, _ in first}) == 1

    def _stop(self, active: list[Active]) -> None:
        """End the running runs (each resumes from its last checkpoint next time) and write the tables."""
        for a in active:
            a.process.terminate()
        for a in active:
            a.process.wait()
            a.stderr.close()
        self._write_tables()

    def _log_invocation(self, progress: Progress, cache: str, load_start: float, ended: str) -> None:
        """Append this invocation's wall time, conditions and how it `ended` (finished, interrupted, stopped) to
        <out>/grid.json (the grid's timing record)."""
        path = self.out / "grid.json"
        log = json.loads(path.read_text()) if path.is_file() else []
        log.append({"grid": self.grid.name, "runs": len(self.runs), "ran": progress.ok + progress.failed,
                    "ok": progress.ok, "failed": progress.failed, "wall_time_s": time.perf_counter() - progress.start,
                    "workers": self.workers, "threads": self.threads, "cache": cache,
                    "processes": "workers" if self.pooled else "ray" if self.launcher else "per run",
                    "git_commit": self.commit,
                    "load_start": load_start, "load_end": os.getloadavg()[0], "fixed": self.grid.fixed,
                    "ended": ended, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(log, indent=2)))

    def _write_tables(self, when_due: bool = False) -> None:
        """Write the grid's tables (always, unless `when_due`: only once TABLES_SHARE times the last write's time has
        passed since it; the run folders are the record, and every invocation rewrites the tables as it ends)."""
        now = time.perf_counter()
        if when_due and now < self._tables_due:
            return
        write_tables(self.out, [self.run_dir(r) for r in self.runs])
        done = time.perf_counter()
        self._tables_due = done + TABLES_SHARE * (done - now)

    def _prepare_cache(self, todo: list[Run]) -> None:
        """Build the built-in task's reference once, here, rather than in several workers at the same time."""
        from prefopt.study.grid import base_values, lookup

        models = {r.assigned.get("model.model", lookup(base_values(self.grid), "model.model")) for r in todo}
        if "gold" in models:
            from prefopt.gold.build import ensure_reference

            ensure_reference()


class Progress:
    """One status line: done, running, failed, elapsed and an estimate of the time left."""

    def __init__(self, total: int, skipped: int, workers: int, tty: bool) -> None:
        self.total, self.skipped, self.workers, self.tty = total, skipped, workers, tty
        self.ok, self.failed, self.running = 0, 0, 0
        self.durations: list[float] = []
        self.start = time.perf_counter()

    def done(self, result: str, seconds: float, name: str) -> None:
        self.ok += result == "ok"
        self.failed += result == "failed"
        self.durations.append(seconds)
        self.running -= 1
        self.line(f"{result:<6} {name} ({seconds:.0f} s)", final=True)

    def update(self, running: int) -> None:
        self.running = running
        self.line("")

    def status(self) -> str:
        done = self.skipped + self.ok + self.failed
        left = self.total - done
        eta = "?"
        if self.durations:
            per_run = sum(self.durations) / len(self.durations)
            eta = _minutes(per_run * left / min(self.workers, max(left, 1)))
        return (f"[{done}/{self.total} done ({self.skipped} before), {self.running} running, {self.failed} failed, "
                f"{_minutes(time.perf_counter() - self.start)} elapsed, ~{eta} left]")

    def line(self, message: str, final: bool = False) -> None:
        """A terminal gets one line redrawn in place; a log file gets a line per finished run only."""
        text = f"{self.status()} {message}".rstrip()
        if self.tty:
            sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
            sys.stderr.flush()
        elif final:
            print(text, file=sys.stderr, flush=True)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
