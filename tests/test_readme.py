"""The README's commands, run as written: every command of README.md's ```bash blocks is either run here or listed
in NOT_RUN (or ELSEWHERE) with the reason, and a README that gains a command that is neither fails
`test_every_readme_command_is_run_or_listed`.

The commands are read from README.md when the tests run: RUN, ELSEWHERE and NOT_RUN hold only the prefixes that
recognize them (a command belongs to the longest prefix that starts it), and what runs is the README's text. Each
command runs through `bash -c` in the root of a fresh copy of the checkout (the files git lists, as they are on
disk), with the session's $PREFOPT_CACHE (tests/conftest.py), so what a command writes (`runs/`, `exported/`, the
derived files of `results/default/`) lands in the copy. A command is shrunk only by size options appended to it
(`--trainer.max_steps`; for a grid, `--set trainer.max_steps=...` and `--runs`); a test that changes anything else
says why where it does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from micro_fixtures import save_micro_model, write_micro_pairs

from prefopt.cli import run_name
from prefopt.losses import LossConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STEPS = 10  # the base validates every 100 steps and at the last one: one validation, with the gold evaluation

# The README commands run here: a command prefix -> the test below that runs the commands it starts.
DEFAULT_JOB = "python -m prefopt fit --config experiments/dpo.yaml"
EXPORT = "python -m prefopt export --ckpt runs/.../checkpoints/last.ckpt --out "
EXPERIMENT = "python -m prefopt fit --config experiments/"
LOSS_OPTION = "python -m prefopt fit --config experiments/dpo.yaml --model.loss"  # the whole loss, or one key
PRINT_CONFIG = "python -m prefopt fit --config experiments/dpo.yaml --print_config"
OWN_DATA = "python -m prefopt fit --config experiments/dpo.yaml --model.model=path/to/model "
GRID_DRY_RUN = "python -m prefopt grid --config experiments/grids/default.yaml --dry-run"
GRID = "python -m prefopt grid --config experiments/grids/default.yaml"
GRID_OUT = f"{GRID} --workers 2 --set model.scoring.reference_cache=false --out "
REPORT = "python -m prefopt report results/default"
SCENARIO_REPORT = "python -m prefopt report results/scenarios/"
VERDICTS = "python -m prefopt.study.verdicts results/scenarios"
RUN = {
    DEFAULT_JOB: "test_the_default_job_then_export_its_policy",
    EXPORT: "test_the_default_job_then_export_its_policy",
    EXPERIMENT: "test_an_experiment_file_fits",
    LOSS_OPTION: "test_a_loss_set_on_the_command_line_fits",
    PRINT_CONFIG: "test_print_config_prints_the_resolved_config",
    OWN_DATA: "test_own_data_and_model_fit",
    GRID_DRY_RUN: "test_the_grid_dry_run_lists_the_committed_runs_as_done",
    GRID: "test_the_grid_runs_then_resumes",
    GRID_OUT: "test_the_grid_without_reference_cache_into_another_folder",
    REPORT: "test_the_report_rederives_the_committed_tables",
    SCENARIO_REPORT: "test_the_scenario_report_rederives_its_verdicts",
    VERDICTS: "test_the_verdict_table_is_the_committed_one",
}
MANY = {EXPERIMENT, LOSS_OPTION}  # the prefixes whose test is parametrized over every command they start; the
# others run one command each
ELSEWHERE = {  # run by another test file
    "PREFOPT_RESULTS=": "tests/test_notebooks.py::test_the_readme_notebook_command_runs",
}
NOT_RUN = {
    "pip install ": "installs packages: CI installed the package and its extras before running the tests",
    "python -m pytest": "the test suite itself, this file included",
    "python -m prefopt fit --config experiments/dpo.yaml --config configs/presets/": "multi-GPU strategy presets "
    "(DDP, FSDP, DeepSpeed) need GPUs; tests/test_configs.py parses every preset, tests/test_multidevice.py checks "
    "DDP with 2 gloo processes on CPU",
    "python -m prefopt fit --config experiments/real/": "real hub data sets and Qwen2.5-0.5B: need the internet (or "
    "a warm hub cache) and a GPU; tests/test_configs.py parses every experiments/real/ file",
    "srun ": "a SLURM job of 2 nodes x 8 GPUs",
    "python -m prefopt grid --config experiments/scenarios/": "a whole scenario (about 100 runs, 15-20 minutes on 2 "
    "cores); tests/test_grid.py expands and checks every scenario file, tests/test_scenarios.py runs a scenario grid "
    "of stub runs, and the report's verdicts are re-derived from the committed runs here",
    "ray start": "starts the head node of a Ray cluster",
    "python -m prefopt grid --config experiments/grids/default.yaml --backend ray ": "a Ray cluster with a GPU per "
    "run; tests/test_grid_ray.py runs a grid on a local Ray instance",
}


# ---------------------------------------------------------------------------------------------- the README's commands
def readme_commands(text: str | None = None) -> list[str]:
    """Every command of the README's ```bash blocks, in order: continued lines joined, comments (`#!` and `#SBATCH`
    lines too) dropped, `a && b` split into its commands."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            commands += [part.strip() for part in _without_comment(line).split(" && ") if part.strip()]
    return commands


def _without_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (at the start or after a blank, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def classify(command: str) -> str | None:
    """The longest prefix of RUN, ELSEWHERE and NOT_RUN that starts the command; None if none does."""
    prefixes = [p for p in (*RUN, *ELSEWHERE, *NOT_RUN) if command.startswith(p)]
    return max(prefixes, key=len, default=None)


def commands_of(prefix: str) -> list[str]:
    return [c for c in readme_commands() if classify(c) == prefix]


def the_command(prefix: str) -> str:
    """The one README command that belongs to `prefix`."""
    found = commands_of(prefix)
    assert len(found) == 1, f"README.md: expected one command under {prefix!r}, found {found}"
    return found[0]


def test_every_readme_command_is_run_or_listed():
    commands = readme_commands()
    assert DEFAULT_JOB in commands and len(commands) > 10, "the parse finds the README's commands"
    unlisted = [c for c in commands if classify(c) is None]
    assert not unlisted, f"README commands neither run here nor listed in NOT_RUN (add them): {unlisted}"
    stale = [p for p in (*RUN, *ELSEWHERE, *NOT_RUN) if not commands_of(p)]
    assert not stale, f"entries that no README command uses any more (remove them): {stale}"
    shared = {p: commands_of(p) for p in RUN if p not in MANY and len(commands_of(p)) > 1}
    assert not shared, f"commands that their test does not run (give each its own entry): {shared}"
    here = Path(__file__).read_text()
    assert all(f"\ndef {name}(" in here for name in RUN.values())
    for where in ELSEWHERE.values():
        path, _, name = where.partition("::")
        assert f"\ndef {name}(" in (ROOT / path).read_text(), where


def test_the_parse_joins_continued_lines_drops_comments_and_splits_chains():
    text = ("```bash\n#!/bin/bash\n#SBATCH --nodes=2\npip install x && python -m a --b '#c d' \\\n    --e=1   # note\n"
            "```\n\n```yaml\nkey: value\n```\n")
    assert readme_commands(text) == ["pip install x", "python -m a --b '#c d' --e=1"]


# ---------------------------------------------------------------------------------------------- running them
@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    """A copy of the checkout: the files git lists (tracked, and new ones not ignored), as they are on disk now.
    Git ignores runs, checkpoints and events; of the committed results only results/default and results/scenarios are
    copied."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, so there is no list of its files to copy: {listed.stderr.strip()}")
    copy = tmp_path / "checkout"
    for name in filter(None, listed.stdout.split("\0")):
        other_results = name.startswith("results/") and name.count("/") > 1 and \
            not name.startswith(("results/default/", "results/scenarios/"))
        if (ROOT / name).is_file() and not other_results:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`bash -c command` in cwd with this session's environment (offline, its $PREFOPT_CACHE); exit code 0."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PREFOPT_BASE_CONFIG", None)  # the README's commands read the shipped configs/base.yaml
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"$ {command}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def check_fit(done: subprocess.CompletedProcess, cwd: Path, name: str, steps: int = STEPS) -> dict:
    """The fit printed its final metrics and where it wrote them, and finished there; its metrics.json."""
    assert f"final metrics at step {steps}:" in done.stdout, done.stdout
    assert f"written to runs/{name}/version_0/ (metrics.json" in done.stdout, done.stdout
    metrics = json.loads((cwd / "runs" / name / "version_0" / "metrics.json").read_text())
    assert metrics["finished"] and metrics["step"] == steps
    assert [h["step"] for h in metrics["history"]] == [steps], "one validation, at the last step"
    return metrics


def holds(config: dict, values: dict) -> bool:
    """Every key of `values` has its value in `config` (which also holds the defaults of the keys not given)."""
    return all(config.get(k) == v for k, v in values.items())


def gold_keys(metrics: object) -> set[str]:
    """The built-in task's metric names (`val/gold/*`, `val/gold_heldout/*`) anywhere in a metrics.json."""
    if isinstance(metrics, dict):
        return {k for k in metrics if k.startswith("val/gold")} | {g for v in metrics.values() for g in gold_keys(v)}
    return {g for v in metrics for g in gold_keys(v)} if isinstance(metrics, list) else set()


def test_the_default_job_then_export_its_policy(gold_reference_dir, checkout):
    # The set-up block chains `pip install torch==... && pip install -e . && python -m prefopt fit ...`: CI installed
    # the package already, so only the fit runs (NOT_RUN lists the pip parts).
    done = run(f"{the_command(DEFAULT_JOB)} --trainer.max_steps={STEPS}", checkout)
    metrics = check_fit(done, checkout, "dpo_seed0")
    assert "val/gold/gold_reward" in done.stdout and "val/gold/gold_reward" in metrics["final"]
    ckpt = checkout / "runs" / "dpo_seed0" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    # `[--merge-lora] [--dtype bfloat16]` are optional: the command runs without them, then with `--dtype bfloat16`.
    # `--merge-lora` needs a LoRA run (this one trained every weight); tests/test_models.py exports one merged.
    command = the_command(EXPORT).replace("runs/.../", "runs/dpo_seed0/version_0/")
    options = re.findall(r"\s*\[([^]]*)\]", command)
    assert options == ["--merge-lora", "--dtype bfloat16"], command
    plain = re.sub(r"\s*\[[^]]*\]", "", command)
    out = checkout / re.search(r"--out (\S+)", plain)[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run(plain, checkout)
    model = AutoModelForCausalLM.from_pretrained(out)
    trained = {k.removeprefix("policy."): v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items()
               if k.startswith("policy.")}
    exported = model.state_dict()
    assert trained.keys() <= exported.keys() and all(torch.equal(exported[k], v) for k, v in trained.items())
    assert AutoTokenizer.from_pretrained(out).eos_token is not None

    run(f"{plain} {options[1]}", checkout)
    assert next(AutoModelForCausalLM.from_pretrained(out, dtype="auto").parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("command", commands_of(EXPERIMENT), ids=lambda c: c.split()[-1])
def test_an_experiment_file_fits(command, gold_reference_dir, checkout):
    experiment = yaml.safe_load((checkout / command.split("--config ")[1].split()[0]).read_text())
    online = (experiment.get("data") or {}).get("online")
    # The generated run name: the loss and its non-default hyperparameters, led by `online` (and the reward when not
    # the gold one) for on-policy rounds.
    name = run_name(LossConfig.from_value(experiment["model"]["loss"]), 0, online=online).removesuffix("_seed0")
    metrics = check_fit(run(f"{command} --trainer.max_steps={STEPS}", checkout), checkout, f"{name}_seed0")
    assert "val/gold/gold_reward" in metrics["final"]
    config = yaml.safe_load((checkout / "runs" / f"{name}_seed0" / "version_0" / "config.yaml").read_text())
    assert holds(config["model"]["loss"], experiment["model"]["loss"])
    if online is not None:
        assert holds(config["data"]["online"], {k: v for k, v in online.items() if not isinstance(v, dict)})
        assert holds(config["data"]["online"].get("reward_model") or {}, online.get("reward_model") or {})


@pytest.mark.parametrize("command", commands_of(LOSS_OPTION), ids=lambda c: re.search(r"model\.loss[.\w]*", c)[0])
def test_a_loss_set_on_the_command_line_fits(command, gold_reference_dir, checkout):
    dpo = yaml.safe_load((checkout / "experiments" / "dpo.yaml").read_text())["model"]["loss"]
    whole = re.search(r"--model\.loss '([^']*)'", command)
    keys = dict(re.findall(r"--model\.loss\.(\w+)=(\S+)", command))
    assert bool(whole) != bool(keys), command
    # The whole loss replaces the experiment's (its other keys take their defaults); one key keeps the rest of it.
    loss = yaml.safe_load(whole[1]) if whole else {**dpo, **{k: yaml.safe_load(v) for k, v in keys.items()}}
    name = f"{loss['name']}_beta{loss['beta']:g}_seed0"
    check_fit(run(f"{command} --trainer.max_steps={STEPS}", checkout), checkout, name)
    config = yaml.safe_load((checkout / "runs" / name / "version_0" / "config.yaml").read_text())
    assert holds(config["model"]["loss"], loss)


def test_print_config_prints_the_resolved_config(checkout):
    # Nothing is appended: --print_config prints what is parsed before it and exits, and it trains nothing.
    printed = yaml.safe_load(run(the_command(PRINT_CONFIG), checkout).stdout)
    base = yaml.safe_load((checkout / "configs" / "base.yaml").read_text())
    dpo = yaml.safe_load((checkout / "experiments" / "dpo.yaml").read_text())
    assert holds(printed["model"]["loss"], dpo["model"]["loss"])
    assert printed["trainer"]["max_steps"] == base["trainer"]["max_steps"]
    assert [c["class_path"] for c in printed["trainer"]["callbacks"]] == [
        c["class_path"] for c in base["trainer"]["callbacks"]
    ]
    assert printed["data"]["gold"] == base["data"]["gold"] and printed["seed_everything"] == base["seed_everything"]


def test_own_data_and_model_fit(checkout):
    # The command runs unchanged: its placeholder paths are made real in the copy, a micro model saved with
    # save_pretrained at path/to/model and a micro pairs file at path/to/pairs.jsonl.
    command = the_command(OWN_DATA)
    model, data = (re.search(rf"--{key}=(\S+)", command)[1] for key in ("model.model", "data.dataset"))
    assert (model, data) == ("path/to/model", "path/to/pairs.jsonl"), command
    save_micro_model(checkout / model)
    write_micro_pairs(checkout / data, n=200)  # 5% held out: 10 validation pairs
    done = run(f"{command} --trainer.max_steps={STEPS}", checkout)
    section = README.read_text().split("## Your data and models", 1)[1].split("\n## ", 1)[0]
    name = re.search(r"`runs/([^`/]+)/`", section)[1]  # the README names the run: runs/pairs_model_dpo_seed0/
    assert name.startswith("pairs_model_")
    metrics = check_fit(done, checkout, name)
    assert "val/margin_nats" in metrics["final"] and "val/kl_per_token" in metrics["final"]
    assert not gold_keys(metrics) and "val/gold" not in done.stdout, "the built-in task's evaluation turns itself off"


def test_the_grid_dry_run_lists_the_committed_runs_as_done(checkout):
    printed = run(the_command(GRID_DRY_RUN), checkout).stdout.splitlines()
    total, todo = map(int, re.fullmatch(r"(\d+) runs, (\d+) to run, into results/default; .*", printed[-1]).groups())
    listed = {line.split()[0]: line.split()[1] for line in printed[:-1]}
    committed = {p.name for p in (checkout / "results" / "default" / "runs").iterdir()}
    assert len(listed) == total and set(listed) == committed
    # A moved checkout keeps its finished runs: every committed run is done.
    assert todo == 0 and set(listed.values()) == {"ok"}, [line for line in printed if " ok " not in line]


GRID_RUNS = "dpo_beta0.5_seed0,kto_beta0.3_seed0"  # two runs of the grid, one paired and one unpaired loss


def test_the_grid_runs_then_resumes(gold_reference_dir, checkout):
    # Into the copy's results/default (workers: the grid file's 2): the two runs' arguments differ from the committed
    # ones (fewer steps), so they run again, and the tables are rewritten for the runs this command selects.
    command = f"{the_command(GRID)} --set trainer.max_steps={STEPS} --runs {GRID_RUNS}"
    done = run(command, checkout)
    assert "finished: 2 ok, 0 failed; tables in results/default" in done.stderr, done.stderr
    results = checkout / "results" / "default"
    runs = pd.read_csv(results / "runs.csv")
    assert sorted(runs["run"]) == sorted(GRID_RUNS.split(",")) and set(runs["status"]) == {"ok"}
    for name in GRID_RUNS.split(","):
        metrics = json.loads((results / "runs" / name / "metrics.json").read_text())
        assert metrics["finished"] and metrics["step"] == STEPS and "val/gold/gold_reward" in metrics["final"]
    again = run(command, checkout)  # "run it again to resume": nothing is left to do
    assert "all 2 runs of default are complete in results/default" in again.stderr, again.stderr


def test_the_grid_without_reference_cache_into_another_folder(gold_reference_dir, checkout, tmp_path):
    # `--out /tmp/nocache` becomes a folder of this test, not a /tmp folder every session would share.
    command = the_command(GRID_OUT)
    assert " --out /tmp/nocache" in command, command
    out = tmp_path / "nocache"
    runs_pattern = "dpo_beta0.5_seed0,simpo_beta2_seed0"  # one loss with a reference, one reference-free
    done = run(f"{command.replace(' --out /tmp/nocache', f' --out {out}')} --set trainer.max_steps={STEPS} "
               f"--runs {runs_pattern}", checkout)
    assert f"finished: 2 ok, 0 failed; tables in {out}" in done.stderr, done.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["run"]) == sorted(runs_pattern.split(",")) and set(runs["status"]) == {"ok"}
    for name in runs_pattern.split(","):
        config = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        assert config["model"]["scoring"]["reference_cache"] is False and config["trainer"]["max_steps"] == STEPS
    committed = "results/default/runs.csv"
    assert (checkout / committed).read_bytes() == (ROOT / committed).read_bytes(), "--out leaves results/ alone"


def test_the_report_rederives_the_committed_tables(checkout):
    results = checkout / "results" / "default"
    done = run(the_command(REPORT), checkout)
    assert "Summary of results/default" in done.stdout and "Ranking by" in done.stdout, done.stdout
    plots = re.search(r"^wrote (.*)$", done.stdout, flags=re.M)[1].split(", ")
    assert {Path(p).name for p in plots} >= {"frontier.png", "frontier_gap.png", "beta_sweeps.png", "curves.png"}
    assert all((checkout / p).stat().st_size > 0 for p in plots)
    # The checked-in derived tables are what the report derives from the checked-in runs (up to float rounding).
    for name in ("frontier", "targets", "matched_kl", "ranking"):
        derived, committed = pd.read_csv(results / f"{name}.csv"), pd.read_csv(ROOT / "results/default" / f"{name}.csv")
        pd.testing.assert_frame_equal(derived, committed, check_exact=False, rtol=1e-6, obj=f"{name}.csv")


def test_the_scenario_report_rederives_its_verdicts(checkout):
    command = the_command(SCENARIO_REPORT)
    folder = command.split()[-1]
    done = run(command, checkout)
    assert "scenario: " in done.stdout and "verdict" in done.stdout, done.stdout
    derived, committed = pd.read_csv(checkout / folder / "verdicts.csv"), pd.read_csv(ROOT / folder / "verdicts.csv")
    pd.testing.assert_frame_equal(derived, committed, check_exact=False, rtol=1e-6)


def test_the_verdict_table_is_the_committed_one(checkout):
    """results/scenarios/README.md and the README's 'Scenarios' show the command's table as it prints it from the
    committed verdicts."""
    done = run(the_command(VERDICTS), checkout)
    assert done.stdout.count("\n") > 2 and done.stdout in (ROOT / "results" / "scenarios" / "README.md").read_text()
    assert done.stdout in (ROOT / "README.md").read_text().split("## Scenarios", 1)[1]
