"""Worker processes that import once and run many runs: the grid runner's default way to start a run.

A fresh `python -m prefopt fit` process spends about 9 s importing torch, Lightning and transformers before its first
step (benchmarks/README.md, grid throughput), as long as a run's training on the built-in task. A worker pays that
once: it reads one request per line on stdin (the run's `fit` arguments and its log files), points its stdout and
stderr at the run's logs, calls `prefopt.cli.main` in-process, and answers one line with the exit code. Each run is the
same LightningCLI call as the subprocess would make (the same parsing, seeding and files), so its numbers are
identical (`benchmarks/bench_grid.py` checks this on the default grid).

Failure isolation: an exception or `SystemExit` ends the run, not the worker; a crash that kills the worker (a
segfault, the kernel's OOM killer) fails its one run, and the pool starts a new worker for the next. Workers die with
the grid (PR_SET_PDEATHSIG), so a grid killed with kill -9 leaves none behind.

PREFOPT_GRID_FIT_FUNCTION ("path/to/file.py:function" or "module:function") replaces `prefopt.cli.main` in the
workers: how the tests run pools of stub runs in milliseconds.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import select
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

FIT_FUNCTION = "PREFOPT_GRID_FIT_FUNCTION"


def fit_function() -> Callable[[list[str]], object]:
    spec = os.environ.get(FIT_FUNCTION)
    if not spec:
        from prefopt.cli import main

        return main
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        loaded = importlib.util.spec_from_file_location("prefopt_grid_fit", where)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def exit_code(err: SystemExit) -> int:
    """The status a process would exit with (`sys.exit("message")` prints the message and exits 1)."""
    if err.code is None or isinstance(err.code, int):
        return err.code or 0
    print(err.code, file=sys.stderr)
    return 1


def run_one(fit: Callable[[list[str]], object], request: dict) -> int:
    """One run with fds 1 and 2 pointed at its log files; returns its exit code."""
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(request["stdout"], "ab") as out, open(request["stderr"], "ab") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
    code = 0
    try:
        fit(list(request["args"]))
    except SystemExit as err:
        code = exit_code(err)
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001  (the run failed; the worker goes on)
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        gc.collect()
    return code


def serve() -> None:
    """The worker's loop: requests on stdin, one JSON answer per run on the stdout it started with."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # between runs nothing may write into the answer channel
    try:
        fit = fit_function()
    except BaseException:  # noqa: BLE001
        answers.write(json.dumps({"fatal": traceback.format_exc()}) + "\n")
        raise SystemExit(1) from None
    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps({"code": run_one(fit, json.loads(line))}) + "\n")


class PooledRun:
    """A run handed to a worker, with the `poll` / `returncode` / `terminate` / `wait` of a `subprocess.Popen`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.worker.answer()
        return self.returncode

    def terminate(self) -> None:
        self.worker.kill()

    def wait(self) -> int:
        self.worker.process.wait()
        return self.poll() if self.returncode is None else self.returncode


class Worker:
    """One worker process and its answer channel."""

    def __init__(self, env: dict[str, str], cwd: Path, preexec_fn: Callable | None) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "prefopt.study.worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd,
                                        preexec_fn=preexec_fn)
        self.buffer = b""
        self.fatal: str | None = None
        self.busy = False
        self.stderr: Path | None = None  # the current run's stderr log

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def start(self, args: list[str], stdout: Path, stderr: Path) -> PooledRun:
        request = {"args": args, "stdout": str(stdout), "stderr": str(stderr)}
        self.busy = True
        self.stderr = stderr
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # died before the run: answer() reports it
        return PooledRun(self)

    def answer(self) -> int | None:
        """The run's exit code once the worker has answered (or died), else None; never blocks."""
        while True:
            line = self._line()
            if line is None:
                break
            message = json.loads(line)
            if "fatal" in message:
                self.fatal = message["fatal"]
            elif "code" in message:
                self.busy = False
                return int(message["code"])
        if not self.alive:
            self.busy = False
            if self.fatal and self.stderr is not None:  # the worker could not start: its traceback is the run's stderr
                with open(self.stderr, "a") as err:
                    err.write(self.fatal)
            code = self.process.returncode
            return code if code else 1
        return None

    def _line(self) -> bytes | None:
        if b"\n" not in self.buffer:
            out = self.process.stdout
            while select.select([out], [], [], 0)[0]:
                chunk = os.read(out.fileno(), 65536)
                if not chunk:
                    break
                self.buffer += chunk
        if b"\n" not in self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def kill(self) -> None:
        """SIGKILL: a run's fit takes SIGTERM as Lightning's request to end the run, after which the worker would
        wait for its next run; the run resumes from its last checkpoint next time either way."""
        if self.alive:
            self.process.kill()

    def close(self) -> None:
        if self.alive:
            self.process.stdin.close()  # the loop ends; the worker exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class WorkerPool:
    """Workers started when first needed (one per concurrent run), replaced when one dies, kept across the grids
    that share the pool (a calibration's rounds) until `close`."""

    def __init__(self, env: dict[str, str] | None = None, cwd: Path | None = None,
                 preexec_fn: Callable | None = None) -> None:
        self.env, self.cwd, self.preexec_fn = env, cwd or Path.cwd(), preexec_fn
        self.workers: list[Worker] = []

    def prestart(self, count: int) -> None:
        """Start workers ahead of their first run, so that their imports overlap the grid's own preparations."""
        self.workers = [w for w in self.workers if w.alive or w.busy]
        for _ in range(count - len(self.workers)):
            self.workers.append(Worker(self.env, self.cwd, self.preexec_fn))

    def start(self, args: list[str], stdout: Path, stderr: Path) -> PooledRun:
        self.workers = [w for w in self.workers if w.alive or w.busy]
        idle = next((w for w in self.workers if w.alive and not w.busy), None)
        if idle is None:
            idle = Worker(self.env, self.cwd, self.preexec_fn)
            self.workers.append(idle)
        return idle.start(args, stdout, stderr)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []


if __name__ == "__main__":
    serve()
