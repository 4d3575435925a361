"""Every YAML file shipped in the repo parses against the CLI (found recursively, so none is skipped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "runs", "results", "lightning_logs", ".cache", "node_modules"}
GRID_DIRS = {"grids", "scenarios"}  # grid files: parsed by tests/test_grid.py


def shipped_yamls() -> list[Path]:
    found = [p for p in ROOT.rglob("*.y*ml") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in found if p.suffix in (".yaml", ".yml"))


def run_configs() -> list[Path]:
    return [p for p in shipped_yamls() if not GRID_DIRS & set(p.relative_to(ROOT).parts)]


def test_the_search_finds_the_shipped_configs():
    names = {p.relative_to(ROOT).as_posix() for p in shipped_yamls()}
    assert {"configs/base.yaml", "experiments/dpo.yaml", "experiments/simpo.yaml", "experiments/kto.yaml"} <= names


@pytest.mark.parametrize("path", run_configs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_run_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", f"--config={path}", "--print_config"])
    assert exc.value.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "loss:" in printed and "trainer:" in printed
