"""The grid's Ray backend: every run a Ray task on a local Ray instance started by the test (no network)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)

from prefopt.study import grid_cli

ray = pytest.importorskip("ray")


@pytest.fixture()
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_a_grid_of_four_real_runs_on_ray_lands_in_the_usual_results_layout(micro_base, tmp_path, local_ray):
    spec = {
        "name": "ray_micro",
        "set": {"trainer.max_steps": 2, "trainer.val_check_interval": 2},
        "axes": {"seed": [0, 1]},
        "variants": [{"model.loss.name": "dpo", "model.loss.beta": [0.1, 0.5]}],
    }
    path = tmp_path / "ray_micro.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "results"
    args = ["--config", str(path), "--out", str(out), "--no-check", "--backend", "ray", "--cpus-per-run", "1"]
    assert grid_cli.main(args) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and set(runs["status"]) == {"ok"}
    assert sorted(runs["loss.beta"].unique()) == [0.1, 0.5]
    for name in runs["run"]:
        assert (out / "runs" / name / "metrics.json").is_file()
    # Resuming works the same way: nothing left to run, nothing rerun.
    assert grid_cli.main(args) == 0
    assert len(pd.read_csv(out / "runs.csv")) == 4


def test_asking_for_gpus_the_cluster_lacks_is_an_error_not_a_hang(local_ray):
    from prefopt.study.ray_runner import RayLauncher

    with pytest.raises(SystemExit, match="asks for 1 GPUs but the Ray cluster has 0"):
        RayLauncher(num_gpus=1)
