"""Grids of runs as data: `python -m prefopt grid --config experiments/grids/<name>.yaml [--workers N] [--dry-run]`.

A grid file names a base and the axes to sweep; every run is one `python -m prefopt fit` with generated overrides:

    name: default                      # results go to results/<name>/ (default: the file's stem)
    base: [experiments/dpo.yaml]       # experiment configs stacked after configs/base.yaml, in order
    set: {trainer.max_steps: 300}      # fixed overrides of every run (any dotted config key)
    axes:                              # swept as a cartesian product: every value a list
      seed: [0, 1, 2]                  # `seed` is short for `seed_everything` (it also redraws the pairs)
    variants:                          # explicit named variants, each crossed with the axes
      - {model.loss.name: dpo, model.loss.beta: [0.1, 0.5]}     # a list inside a variant is swept too
      - {name: ipo_sum, model.loss.name: ipo, model.loss.average_log_probs: false, model.loss.beta: [1, 2]}

Keys under `model.loss.` are merged into the base's loss dict (a different `model.loss.name` starts from that
loss's defaults), and the merged loss is validated while the grid is expanded, so a typo fails before any run
starts. Run names are generated: the variant's `name` (default: its loss name), then every swept key's short name
and value, then the seed, e.g. `dpo_beta0.5_seed1`; a hyperparameter whose value is itself a list is written as a
list of one list. The command is `prefopt.study.grid_cli`, the runner `prefopt.study.runner`, the tables `prefopt.study.tables`.

A grid may declare KL targets instead of hyperparameter lists (`calibrate:`, with a variant's optional `strength` and
`strength_direction` keys): `prefopt.study.calibration` searches each variant's knob, `prefopt.study.calibrated` runs it.
A calibrating grid may state a claim and its predictions before it runs (`scenario:`, `prefopt.study.scenarios`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefopt.study.calibration import CalibrationError, CalibrationSpec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
LOSS_KEY = "model.loss"
SEED_KEY = "seed_everything"
ALIASES = {"seed": SEED_KEY}
GRID_KEYS = {"name", "base", "set", "axes", "variants", "workers", "calibrate", "scenario"}
KNOB_KEYS = ("strength", "strength_direction")  # a variant's searched setting in a calibrating grid (calibration.py)


class GridError(ValueError):
    """A grid file that cannot be expanded: the message says which key and why."""


@dataclass(frozen=True)
class Run:
    """One run of a grid: its generated name, the values the grid assigns, and the resolved loss."""

    name: str
    variant: str  # the variant's label: runs that differ only in seed and in `swept` loss values form a curve
    assigned: dict[str, Any]  # every key the grid sets for this run (loss keys merged into `loss`), dotted
    swept: tuple[str, ...]  # the keys swept by the grid (axes and list-valued variant keys), dotted
    loss: dict[str, Any]  # the validated loss dict, all hyperparameters filled in
    seed: int
    along: tuple[str, ...] = ()  # keys besides the loss's that vary along its curve (a calibrated learning rate)

    def overrides(self, base: tuple[Path, ...]) -> list[str]:
        """The `fit` arguments of this run (without the logger's location, which the runner adds)."""
        # A string goes as it is: jsonargparse keeps the quotes of a JSON string in a str-typed field.
        args = [f"--config={p}" for p in base]
        args += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in self.assigned.items()
                 if not k.startswith(LOSS_KEY)]
        return args + [f"--{LOSS_KEY}={json.dumps(self.loss)}"]


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    base: tuple[Path, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    variants: tuple[dict[str, Any], ...] = ()
    workers: int | None = None
    calibrate: CalibrationSpec | None = None  # KL targets instead of hyperparameter lists (prefopt.study.calibration)
    knobs: tuple[dict[str, Any], ...] = ()  # per variant: its `strength` / `strength_direction` keys, if any
    scenario: dict[str, Any] | None = None  # the claim and its predictions, fixed before the runs (prefopt.study.scenarios)


def _resolve_path(value: str) -> Path:
    """A base config path: as given if it exists (relative to the current folder), else under the repository."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path.resolve()
    if (ROOT / path).exists():
        return ROOT / path
    raise GridError(f"base config {value!r} not found (relative to {Path.cwd()} or {ROOT})")


def _key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key or key.startswith("-"):
        raise GridError(f"{where}: {key!r} is not a dotted config key such as model.loss.beta")
    return ALIASES.get(key, key)


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid file (its runs are checked by `expand`)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, Mapping):
        raise GridError(f"{path}: a grid file is a mapping with keys {sorted(GRID_KEYS)}")
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise GridError(f"{path}: unknown keys {sorted(unknown)}; valid keys: {sorted(GRID_KEYS)}")
    base = raw.get("base") or []
    base = [base] if isinstance(base, str) else base
    for section in ("set", "axes"):
        if not isinstance(raw.get(section) or {}, Mapping):
            raise GridError(f"{path}: {section} must be a mapping of dotted config keys to values, got {raw[section]!r}")
    if not isinstance(raw.get("variants") or [], list):
        raise GridError(f"{path}: variants must be a list of mappings, got {raw['variants']!r}")
    fixed = {_key(k, f"{path}: set"): v for k, v in (raw.get("set") or {}).items()}
    axes: dict[str, list[Any]] = {}
    for k, values in (raw.get("axes") or {}).items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{path}: axes.{k} must be a non-empty list of values, got {values!r}")
        axes[_key(k, f"{path}: axes")] = values
    variants, knobs = [], []
    for i, variant in enumerate(raw.get("variants") or []):
        if not isinstance(variant, Mapping) or not variant:
            raise GridError(f"{path}: variants[{i}] must be a mapping of config keys to values")
        knobs.append({k: variant[k] for k in KNOB_KEYS if k in variant})
        if knobs[-1] and "calibrate" not in raw:
            raise GridError(f"{path}: variants[{i}] sets {sorted(knobs[-1])}, which only a calibrating grid (calibrate:) reads")
        variant = {k: val for k, val in variant.items() if k not in KNOB_KEYS}
        v = {k if k == "name" else _key(k, f"{path}: variants[{i}]"): val for k, val in variant.items()}
        clash = (set(v) - {"name"}) & (set(axes) | set(fixed))
        if clash:
            raise GridError(f"{path}: variants[{i}] sets {sorted(clash)}, which `axes` or `set` already set")
        if any(isinstance(val, list) and not val for val in v.values()):
            raise GridError(f"{path}: variants[{i}] has an empty list of values")
        variants.append(v)
    workers = raw.get("workers")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise GridError(f"{path}: workers must be a positive integer, got {workers!r}")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or ".." in name:
        raise GridError(f"{path}: name {name!r} may hold only letters, digits, '_', '-' and '.' (and one '/': a "
                        "folder of results, e.g. scenarios/label_noise)")
    calibrate = None
    if "calibrate" in raw:
        if set(axes) - {SEED_KEY}:
            raise GridError(f"{path}: a calibrating grid sweeps only seeds in axes (got {sorted(set(axes) - {SEED_KEY})}); "
                            "put other settings in variants")
        try:
            calibrate = parse_spec(raw["calibrate"], str(path), axes.get(SEED_KEY, []))
        except CalibrationError as err:
            raise GridError(str(err)) from None
    scenario = None
    if "scenario" in raw:
        from prefopt.study.scenarios import ScenarioError, parse_scenario

        if calibrate is None:
            raise GridError(f"{path}: a scenario compares at matched KL: it needs calibrate: (KL targets)")
        labels = [str(v.get("name") or v.get(f"{LOSS_KEY}.name", "")) for v in variants]
        try:
            scenario = parse_scenario(raw["scenario"], str(path), labels)
        except ScenarioError as err:
            raise GridError(str(err)) from None
    return Grid(name, path, tuple(_resolve_path(str(p)) for p in base), fixed, axes, tuple(variants), workers,
                calibrate, tuple(knobs), scenario)


# ---------------------------------------------------------------------------------------------- expansion
def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in update.items():
        into[k] = _merge(dict(into.get(k) or {}), v) if isinstance(v, Mapping) and isinstance(into.get(k), Mapping) else v
    return into


def base_values(grid: Grid) -> dict[str, Any]:
    """The config the base files give (the CLI's base file, then `grid.base` in order), as nested dicts."""
    from prefopt.cli import base_config

    config: dict[str, Any] = {}
    for path in [*map(Path, base_config()), *grid.base]:
        _merge(config, _yaml_file(Path(path)))
    return config


_PARSED: dict[Path, tuple[tuple[int, int, int], Any]] = {}


def _yaml_file(path: Path) -> Any:
    """A YAML file's content (a fresh copy), parsed once per version of the file: a calibrating grid expands its
    runs one by one, each against the base config (parsing it each time cost a catalog's search rounds 9 s each)."""
    stat = path.stat()
    stamp, key = (stat.st_ino, stat.st_mtime_ns, stat.st_size), path.resolve()
    if key not in _PARSED or _PARSED[key][0] != stamp:
        _PARSED[key] = (stamp, yaml.safe_load(path.read_text()) or {})
    return copy.deepcopy(_PARSED[key][1])


def lookup(config: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key of nested dicts, or None."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def merge_loss(base_loss: Any, assigned: Mapping[str, Any]) -> dict[str, Any]:
    """The run's loss: the base loss, replaced by `model.loss` and updated by `model.loss.<hyperparameter>` keys.

    A `model.loss.name` that differs from the loss so far starts from that loss's defaults (the base's
    hyperparameters belong to another loss). The result is validated and every hyperparameter filled in.
    """
    from prefopt.losses import LossConfig

    loss = assigned.get(LOSS_KEY, base_loss)
    updates = {k[len(LOSS_KEY) + 1 :]: v for k, v in assigned.items() if k.startswith(f"{LOSS_KEY}.")}
    return LossConfig.updated(loss, updates).to_dict()


def short_name(key: str, keys: list[str]) -> str:
    """The shortest dotted suffix of `key` that no other key in `keys` ends with: lr, max_train_pairs, beta."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
            return suffix
    return key


def format_value(value: Any) -> str:
    """A value as it appears in a run name: 0.5, 1e-05, true, AdamW; mappings and lists as a short hash."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (Mapping, list)):
        text = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    elif isinstance(value, str) and re.fullmatch(r"[\w.]+\.[A-Z]\w*", value):
        text = value.rsplit(".", 1)[-1]  # a class path: torch.optim.AdamW -> AdamW
    else:
        text = str(value)
    return re.sub(r"[^\w.+-]", "-", text)


def expand(grid: Grid) -> list[Run]:
    """Every run of the grid: (variants or one empty variant) x the cartesian product of the axes, seed-major."""
    base = base_values(grid)
    base_loss, base_seed = lookup(base, LOSS_KEY), lookup(base, SEED_KEY) or 0
    variant_swept = {k for v in grid.variants for k, val in v.items() if k != "name" and isinstance(val, list)}
    swept = list(grid.axes) + sorted(variant_swept - set(grid.axes))
    shown = [k for k in swept if k not in (SEED_KEY, f"{LOSS_KEY}.name", LOSS_KEY)]
    runs = []
    for variant in grid.variants or ({},):
        fixed = {k: v for k, v in variant.items() if k != "name" and not isinstance(v, list)}
        lists = {**grid.axes, **{k: v for k, v in variant.items() if k != "name" and isinstance(v, list)}}
        for combo in itertools.product(*lists.values()):
            values = dict(zip(lists, combo))
            assigned = {**grid.fixed, **fixed, **values}
            try:
                loss = merge_loss(base_loss, assigned)
            except ValueError as err:
                raise GridError(f"{grid.path}: variant {variant or '(none)'}: {err}") from None
            seed = int(assigned.get(SEED_KEY, base_seed))
            label = str(variant.get("name") or loss["name"])
            parts = [label] + [f"{short_name(k, shown)}{format_value(values[k])}" for k in shown if k in values]
            runs.append(Run("_".join(parts + [f"seed{seed}"]), label, assigned, tuple(swept), loss, seed))
    settings: dict[str, dict[str, Any]] = {}  # label -> the fixed settings of the first variant with that label
    for run in runs:
        fixed = {k: v for k, v in run.assigned.items() if k not in swept and not k.startswith(LOSS_KEY)}
        fixed.update({f"{LOSS_KEY}.{k}": v for k, v in run.loss.items() if f"{LOSS_KEY}.{k}" not in swept})
        first = settings.setdefault(run.variant, fixed)
        if first != fixed:
            differ = sorted(k for k in first.keys() | fixed.keys() if first.get(k) != fixed.get(k))
            raise GridError(f"{grid.path}: two variants are both labelled {run.variant!r} but differ in {differ}, which "
                            "they do not sweep, so their runs would merge into one curve; give them distinct `name`s")
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            raise GridError(f"{grid.path}: two runs are both named {run.name!r}; give the variants distinct `name`s")
        seen[run.name] = run
    return sorted(runs, key=lambda r: r.seed)  # stable: seed-major keeps each partial grid a set of whole seeds


def with_overrides(grid: Grid, items: list[str]) -> Grid:
    """The grid with command-line `--set KEY=VALUE` items (YAML values) added to its fixed overrides.

    A key the grid's `axes` or `variants` set is an error (those would silently win over it), as is a repeated key.
    """
    fixed = dict(grid.fixed)
    set_by_grid = set(grid.axes) | {k for v in grid.variants for k in v if k != "name"}
    given: set[str] = set()
    for item in items:
        raw_key, sep, value = item.partition("=")
        if not sep:
            raise GridError(f"--set takes KEY=VALUE, got {item!r}")
        key = _key(raw_key, "--set")
        if key in given:
            raise GridError(f"--set gives {key} twice")
        if key in set_by_grid:
            raise GridError(f"--set {key}: the grid's `axes` or `variants` already set {key}; change it there")
        given.add(key)
        fixed[key] = yaml.safe_load(value)
    return dataclasses.replace(grid, fixed=fixed)


def select(runs: list[Run], patterns: str | None) -> list[Run]:
    """The runs whose names match one of the comma-separated shell patterns (all runs without patterns)."""
    if not patterns:
        return runs
    import fnmatch

    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]
    if not chosen:
        raise GridError(f"--runs {patterns!r} matches none of the grid's {len(runs)} runs (e.g. {runs[0].name})")
    return chosen


def check_configs(grid: Grid, runs: list[Run]) -> None:
    """Parse the first run of each variant with the CLI (`--print_config`): a wrong key fails before any run starts,
    and so does a loss that reads a record field its scoring settings cannot produce (`fast.scorer.check_fields`)."""
    import contextlib
    import io

    import yaml

    from prefopt.cli import main
    from prefopt.fast.scorer import check_config

    firsts = {run.variant: run for run in reversed(runs)}
    for run in firsts.values():
        out, err, argv = io.StringIO(), io.StringIO(), sys.argv
        sys.argv = argv[:1]  # LightningCLI warns when it is given args while sys.argv holds others (ours)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(["fit", *run.overrides(grid.base), "--print_config"])
                code = 0
            except SystemExit as exit_:
                code = exit_.code or 0
            finally:
                sys.argv = argv
        if code:
            raise GridError(f"run {run.name} does not parse:\n{err.getvalue().strip()[-2000:]}")
        model = (yaml.safe_load(out.getvalue()) or {}).get("model") or {}
        try:
            check_config(model.get("scoring"), model.get("loss"))
        except ValueError as error:
            raise GridError(f"run {run.name}: {error}") from None


def default_workers() -> int:
    """The cores this process may use (its CPU affinity): the default number of parallel runs."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
