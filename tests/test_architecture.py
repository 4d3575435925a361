"""The package's shape: imports go one way (no cycles), no file over 400 lines, a training run loads no study code.

The import graph is read from the source with `ast` (every `import` and `from ... import`, those inside functions
included), so a deferred import that only hides a cycle counts as one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prefopt"
MAX_LINES = 400
# The wings and what each may import (besides itself): the core (records, log-probs, metrics, files) imports no wing;
# the losses read the core only; the speed levers serve the losses' records; a run (train) uses the levers and the
# built-in task; the study runs everything. The command line sits beside train, the study's commands above it.
CORE = {"prefopt.records", "prefopt.logps", "prefopt.metrics", "prefopt.files"}
MAY_IMPORT = {
    "core": {"core"},
    "losses": {"core"},
    "fast": {"core", "losses"},
    "gold": {"core"},
    "train": {"core", "losses", "fast", "gold"},
    "cli": {"core", "losses", "fast", "gold", "train"},
    "study": {"core", "losses", "fast", "gold", "train", "cli"},
}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """prefopt module -> the prefopt modules it imports (a `from package import module` names the module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_go_one_way():
    assert cycles(import_graph()) == []


def wing(module: str) -> str:
    """The wing a module belongs to: its subpackage, "core" for the plain reference path, "cli" for the rest."""
    if module in CORE or module == "prefopt":
        return "core"
    part = module.split(".")[1]
    return part if part in MAY_IMPORT else "cli"


def test_each_wing_imports_only_the_wings_below_it():
    wrong = sorted(f"{m} -> {t}" for m, targets in import_graph().items() if m != "prefopt"
                   for t in targets if t != "prefopt" and wing(t) != wing(m) and wing(t) not in MAY_IMPORT[wing(m)])
    assert not wrong


def test_no_module_is_over_400_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_a_training_run_loads_no_grid_table_or_plotting_code():
    """What `python -m prefopt fit` imports with the shipped base config's classes: none of the study modules."""
    code = ("import sys, prefopt.cli, prefopt.train.callbacks, prefopt.gold.evaluation\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('prefopt'))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout.split())
    study = sorted(m for m in loaded if m.startswith("prefopt.study"))
    assert "prefopt.train.module" in loaded and not study, study
