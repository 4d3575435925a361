"""Every notebook in analysis/ runs, offline, against the results of a micro grid on the built-in task.

The micro grid runs real fits (4 steps, 64 pairs per seed, 64 evaluation samples) of two losses at two betas and
two seeds, then the report; the notebooks get the results folder through PREFOPT_RESULTS.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient

from prefopt.study import grid_cli
from prefopt.study import report

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "analysis").rglob("*.ipynb"))
CALLBACKS = [
    {"class_path": "prefopt.gold.evaluation.GoldTaskEvaluation", "init_args": {"num_samples": 64}},
    {"class_path": "prefopt.train.callbacks.MetricsJson"},
]
MICRO_GOLD_GRID = {
    "name": "micro_gold",
    "set": {"trainer.max_steps": 4, "trainer.val_check_interval": 2, "trainer.callbacks": CALLBACKS,
            "data.gold.pairs_per_prompt": 8, "data.gold.val_pairs_per_prompt": 4},
    "axes": {"seed": [0, 1]},
    "variants": [{"model.loss.name": "dpo", "model.loss.beta": [0.05, 1.0]},
                 {"model.loss.name": "ipo", "model.loss.beta": [0.1, 2.0]}],
}


@pytest.fixture(scope="module")
def micro_results(gold_reference_dir, tmp_path_factory) -> Path:
    """A micro grid's results folder on the built-in task (reference built once per test session)."""
    folder = tmp_path_factory.mktemp("micro_gold")
    grid_file = folder / "micro_gold.yaml"
    grid_file.write_text(yaml.safe_dump(MICRO_GOLD_GRID, sort_keys=False))
    out = folder / "results"
    assert grid_cli.main(["--config", str(grid_file), "--out", str(out), "--workers", "2", "--no-check"]) == 0
    assert report.main([str(out), "--no-plots"]) == 0
    return out


def test_the_micro_grid_has_gold_metrics_and_a_ranking(micro_results):
    runs = pd.read_csv(micro_results / "runs.csv")
    assert len(runs) == 8 and set(runs["status"]) == {"ok"}
    assert runs["val/gold/sampled_kl"].notna().all() and runs["data_hash"].nunique() == 2  # one pair set per seed
    assert set(pd.read_csv(micro_results / "ranking.csv")["curve"]) == {"dpo", "ipo"}


def test_the_search_finds_the_notebooks():
    assert ROOT / "analysis" / "compare_losses.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_notebook_runs(path, micro_results, monkeypatch):
    monkeypatch.setenv("PREFOPT_RESULTS", str(micro_results))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures as outputs
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook draws its plots"
    source = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert "import prefopt" not in source and "from prefopt" not in source, "notebooks read tables only"


def readme_notebook_command() -> str:
    """The README's notebook command: the one line of its bash blocks that starts with `PREFOPT_RESULTS=`."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("PREFOPT_RESULTS=")]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_readme_notebook_command_runs(micro_results, tmp_path):
    command = readme_notebook_command()
    # Only two things change: the results folder (the micro grid's, not the committed results/default, so that a
    # fresh grid's tables are what is read) and the output (under tmp_path, not a /tmp file every session shares).
    # The results folder stays relative to the repository root, as in the README, so the notebook's resolution of
    # a relative PREFOPT_RESULTS against the caller's directory is what this runs.
    results, output = "PREFOPT_RESULTS=results/default ", "--output /tmp/out.ipynb"
    assert results in command and output in command, command
    relative = os.path.relpath(micro_results, ROOT)
    out = tmp_path / "out.ipynb"
    command = command.replace(results, f"PREFOPT_RESULTS={shlex.quote(relative)} ")
    command = command.replace(output, f"--output {shlex.quote(str(out))}")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the inline backend draws figures as outputs
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    hint = "(pip install -e '.[analysis]' installs jupyter nbconvert)"
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}\n{hint}"
    notebook = nbformat.read(out, as_version=4)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook draws its plots"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"from {micro_results.resolve()}" in printed, printed


@pytest.fixture(scope="module")
def catalog_results(tmp_path_factory) -> Path:
    """A calibrating results folder the size of a catalog's panels (14 curves, two targets, three seeds), from hand-made
    run folders (as `tests/test_report.py` makes them) and the real report: no training."""
    from prefopt.gold.task import frontier_point
    from prefopt.study.tables import write_tables
    from test_report import fake_run, gold_final

    folder, dirs, calibration = tmp_path_factory.mktemp("catalog"), [], []
    names = ["dpo"] + [f"loss{i:02d}" for i in range(1, 14)]
    for i, name in enumerate(names):
        for target, beta in ((0.5, 2.0), (1.0, 1.0)):
            kl, reward = frontier_point(beta * 1.3)
            calibration.append({"variant": name, "search_runs": 4, "target": target, "status": "reached",
                                "key": "model.loss.beta", "value": beta, "kl": kl, "run": f"{name}_beta{beta:g}_seed100"})
            for seed in range(3):
                final = gold_final(kl, reward - 0.01 * i - 0.02 * seed)
                dirs.append(fake_run(folder / "runs", name, {"name": "dpo", "beta": beta}, seed, final))
    pd.DataFrame(calibration).to_csv(folder / "calibration.csv", index=False)
    write_tables(folder, dirs)
    assert report.main([str(folder), "--no-plots"]) == 0
    return folder


def test_notebook_reads_a_calibrating_catalog(catalog_results, monkeypatch):
    """Beyond ten curves (colours cycle, panels wrap) and with the at-targets tables: each of the 14 curves is a row of
    the targets' table, dpo (the report's default baseline) is compared with the 13 others."""
    monkeypatch.setenv("PREFOPT_RESULTS", str(catalog_results))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    path = ROOT / "analysis" / "compare_losses.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "gap minus dpo's, paired by seed" in text
    table = next(o["data"]["text/plain"] for o in outputs if "best" in o.get("data", {}).get("text/plain", ""))
    assert all(name in table for name in ("dpo", "loss01", "loss13"))
