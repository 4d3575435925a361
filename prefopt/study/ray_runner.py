"""Grids on a Ray cluster: each run becomes one Ray task, placed by Ray on any node with the resources it asks for.

`python -m prefopt grid --config experiments/grids/default.yaml --backend ray --ray-address auto --cpus-per-run 4
--gpus-per-run 1`. The grid runner stays the same (resume, failure records, tables): only *where* a run's
`python -m prefopt fit ...` process starts changes. A Ray task runs that command with `subprocess` on its node and
returns the exit code; the run writes its files into the results folder, so the nodes must share a filesystem
(the usual cluster set-up) and the same Python environment. Ray sets CUDA_VISIBLE_DEVICES in each task, and the
run inherits the worker's environment, with only prefopt's own variables (cache location, thread counts) passed
from the driver.

Ray is an optional extra (`pip install -e ".[ray]"`); it is imported only when this backend is chosen.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# Variables the driver passes to every run; everything else comes from the node's own worker environment.
PASSED = ("PREFOPT_CACHE", "PREFOPT_BASE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
          "PYTHONUNBUFFERED", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "PYTHONPATH")


def run_command(command: list[str], env: dict[str, str], cwd: str, stdout_path: str, stderr_path: str) -> int:
    """What a Ray task executes on its node: the run's process, with its output in the run's folder."""
    from prefopt.study.runner import die_with_parent

    environment = dict(os.environ, **env)
    with open(stdout_path, "ab") as out, open(stderr_path, "wb") as err:
        # A cancelled task's worker is killed outright (ray.cancel force=True): the run must not outlive it.
        return subprocess.run(command, env=environment, cwd=cwd, stdout=out, stderr=err,
                              preexec_fn=die_with_parent if sys.platform == "linux" else None).returncode


class RayProcess:
    """A Ray task seen through the subset of `subprocess.Popen` the grid runner uses (poll, returncode, ...)."""

    def __init__(self, ref: Any, stderr_path: Path) -> None:
        self.ref, self.stderr_path, self.returncode = ref, stderr_path, None

    def poll(self) -> int | None:
        import ray

        if self.returncode is None and ray.wait([self.ref], timeout=0)[0]:
            try:
                self.returncode = int(ray.get(self.ref))
            except Exception as err:  # the task itself died (node lost, cancelled): record it as the run's error
                with open(self.stderr_path, "a") as f:
                    f.write(f"\nray task failed: {type(err).__name__}: {err}\n")
                self.returncode = -1
        return self.returncode

    def terminate(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)

    def wait(self) -> int:
        import ray

        ray.wait([self.ref])
        return self.poll() if self.returncode is None else self.returncode


class RayLauncher:
    """Starts runs as Ray tasks with `num_cpus` / `num_gpus` each; connects to `address` (None: a local instance)."""

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0) -> None:
        try:
            import ray
        except ImportError as err:
            raise SystemExit('the ray backend needs Ray: pip install -e ".[ray]"') from err
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        resources = ray.cluster_resources()
        for name, each in (("CPU", num_cpus), ("GPU", num_gpus)):
            if each > resources.get(name, 0):  # Ray would queue the first run forever, and silently
                raise SystemExit(f"error: each run asks for {each:g} {name}s but the Ray cluster has "
                                 f"{resources.get(name, 0):g}; lower --{name.lower()}s-per-run")
        self.task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(run_command)
        self.num_cpus, self.num_gpus = num_cpus, num_gpus

    def capacity(self) -> int:
        """How many runs the cluster can hold at once (Ray queues the rest itself)."""
        import ray

        resources = ray.cluster_resources()
        by_cpu = resources.get("CPU", 1) // max(self.num_cpus, 1e-9)
        by_gpu = resources.get("GPU", 0) // self.num_gpus if self.num_gpus else by_cpu
        return max(1, int(min(by_cpu, by_gpu)))

    def start(self, command: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path) -> RayProcess:
        passed = {k: v for k, v in env.items() if k in PASSED}
        ref = self.task.remote(command, passed, str(cwd), str(stdout), str(stderr))
        return RayProcess(ref, stderr)
