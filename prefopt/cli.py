"""The command line: `python -m prefopt {fit,validate,test} --config ...` (LightningCLI).

The shared base, configs/base.yaml, is always read first (it holds everything a comparison keeps fixed), so an
experiment file states only what differs: `python -m prefopt fit --config experiments/simpo.yaml`. More files stack
after it, last wins: `--config experiments/dpo.yaml --config my_overrides.yaml`. Set PREFOPT_BASE_CONFIG to use
another base file.

Values two parts must agree on are linked at parse time, not copied by hand: the tokenizer is the model's, the
DataModule's paired/unpaired mode and whether it reads the responses' scores follow the loss's metadata, its batch layout follows the scorer's
(`model.scoring.share_prompt`), and the data seed is the run's seed (so a seed redraws the built-in task's
preference pairs as well as the initialization order). A loss that reads a record field the scoring settings cannot
produce is refused here too, before anything loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from prefopt.train.data import PreferenceDataModule
from prefopt.fast.scorer import EXTRA, FROM_DATA, check_config
from prefopt.losses import LossConfig
from prefopt.train.builtin import BUILTIN
from prefopt.train.module import PreferenceModule


BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


def base_config() -> list[str]:
    """The base config file(s) read before any --config: PREFOPT_BASE_CONFIG, else the repo's configs/base.yaml."""
    path = os.environ.get("PREFOPT_BASE_CONFIG", str(BASE_CONFIG))
    return [path] if path and Path(path).is_file() else []


def run_name(loss: LossConfig, seed: int | None, dataset: str = BUILTIN, model: str = BUILTIN,
             online: object = None) -> str:
    """A run name generated from the config: the data and model when they are not the built-in task's, `online` and
    the reward when not the gold one for on-policy rounds (`data.online`), the loss name, its hyperparameters that
    differ from the defaults, and the seed (`mydata_dpo_beta0.5_seed0`, `online_reward_model_rloo_seed0`)."""
    defaults = loss.spec.defaults()
    source = [_short(s) for s in (dataset, model) if s != BUILTIN]
    if online is not None:
        reward = getattr(online, "reward", None) or (online.get("reward") if isinstance(online, dict) else None)
        source += ["online"] + ([_short(reward.replace(":", "."))] if reward not in (None, "gold") else [])
    params = [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
              for k, v in loss.params.items() if v != defaults.get(k) and not isinstance(v, list)]
    return "_".join(source + [loss.name] + params + [f"seed{seed}"])


def _unpaired(loss: LossConfig) -> bool:
    return not loss.paired


def _reads_scores(loss: LossConfig) -> bool:
    return bool(loss.reads & set(FROM_DATA))


def _reads_extras(loss: LossConfig) -> bool:
    return bool(loss.reads & (EXTRA | {"extra_scores"}))


def _reads_labels(loss: LossConfig) -> bool:
    return loss.reads_labels


def _short(source: str) -> str:
    """A model's or dataset's name as a run-name part: the last part of a path or hub name, without suffix."""
    stem = Path(str(source).rstrip("/")).name
    return re.sub(r"[^\w.+-]", "-", Path(stem).stem if Path(stem).suffix in DATA_SUFFIXES else stem)


DATA_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".arrow"}
LOSS_ARG = "--model.loss"
COMMANDS = ("fit", "validate", "test", "predict")


def with_dotted_loss_keys(argv: list[str]) -> list[str]:
    """argv with `--model.loss.<key> VALUE` items folded into one `--model.loss=<the whole loss>`.

    The loss is one validated value (`LossConfig`), which jsonargparse cannot update key by key; grid files and
    users write dotted keys all the same. The loss so far is read from the base config, every `--config` file and
    every `--model.loss` value in order (last wins, as the parser reads them); the dotted keys then update it as
    `LossConfig.updated` does (a new `name` starts from that loss's defaults). The merged value takes the place of
    the last dotted key, so an argument after it still wins.
    """
    if not argv or argv[0] not in COMMANDS or not any(a.startswith(LOSS_ARG + ".") for a in argv):
        return argv
    import yaml

    def loss_in(path: str) -> object:
        try:
            config = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None  # the parser reports an unreadable config itself
        return (config.get("model") or {}).get("loss") if isinstance(config, dict) else None

    loss: object = None
    for path in base_config():
        loss = loss_in(path) or loss
    out, updates, at, i = [argv[0]], {}, None, 1
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        takes_next = not eq and i + 1 < len(argv)
        if key in ("--config", "-c") or key == LOSS_ARG or key.startswith(LOSS_ARG + "."):
            if not eq:
                value, i = (argv[i + 1] if takes_next else ""), i + 1
            if key.startswith(LOSS_ARG + "."):
                updates[key[len(LOSS_ARG) + 1 :]] = yaml.safe_load(value)
                at = len(out)
                i += 1
                continue
            if key == LOSS_ARG:
                loss, updates = yaml.safe_load(value), {}  # a whole loss replaces earlier dotted keys too
            else:
                loss = loss_in(value) or loss
            out.append(f"{key}={value}")
        else:
            out.append(arg)
        i += 1
    if at is not None and updates:
        try:
            merged = LossConfig.updated(loss, updates).to_dict()
        except ValueError as err:
            from argparse import ArgumentError

            raise ArgumentError(None, f"{LOSS_ARG}: {err}") from None
        out.insert(at, f"{LOSS_ARG}={json.dumps(merged)}")
    return out


class PrefoptCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.link_arguments("model.loss", "data.unpaired", compute_fn=_unpaired)
        parser.link_arguments("model.loss", "data.scores", compute_fn=_reads_scores)  # ODPO, ties, ...: the data's scores
        parser.link_arguments("model.loss", "data.extras", compute_fn=_reads_extras)  # TPO, InfoNCA-K: more responses
        parser.link_arguments("model.loss", "data.labels", compute_fn=_reads_labels)  # RLOO reads rewards only
        parser.link_arguments("seed_everything", "data.seed")
        parser.link_arguments("model.scoring.share_prompt", "data.share_prompt")  # the scorer owns the layout

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a fit that fails before writing any result (bad data, a model that will not load) leaves no
        run folder behind: what it added there is removed, and nothing that was there before."""
        logger = self.trainer.logger
        log_dir = Path(self.trainer.log_dir) if subcommand == "fit" and logger is not None else None
        before = set(log_dir.rglob("*")) if log_dir is not None and log_dir.is_dir() else set()
        anchor = log_dir  # the deepest folder that exists already: nothing at or above it is removed
        while anchor is not None and not anchor.exists():
            anchor = anchor.parent
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if log_dir is not None and log_dir.is_dir() and self.trainer.is_global_zero:
                if not (log_dir / "metrics.json").exists() and not (log_dir / "checkpoints").exists():
                    _remove_new_files(log_dir, before, anchor)
            raise

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        try:
            check_config(config.model.scoring, config.model.loss)
            if config.model.loss.on_policy and not config.data.get("online"):
                raise ValueError(f"loss {config.model.loss.name!r} trains on samples of the policy being trained: set "
                                 "data.online (experiments/online/rloo_gold.yaml)")
        except ValueError as err:
            from argparse import ArgumentError

            raise ArgumentError(None, str(err)) from None
        logger = config.trainer.get("logger")
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            args = logger["init_args"] if isinstance(logger, dict) else logger.init_args
            if args.get("name") in (None, "auto"):
                args["name"] = run_name(config.model.loss, config.seed_everything, config.data.dataset,
                                        config.model.model, config.data.get("online"))
        if config.trainer.get("enable_progress_bar") is False and config.trainer.get("callbacks"):
            # Lightning refuses a progress-bar callback beside enable_progress_bar=false: the flag wins here.
            config.trainer.callbacks = [c for c in config.trainer.callbacks if not _is_progress_bar(c)]


def _is_progress_bar(callback: object) -> bool:
    from lightning.pytorch.callbacks import ProgressBar

    path = callback.get("class_path") if hasattr(callback, "get") else None
    if isinstance(path, str):
        module, _, name = path.rpartition(".")
        try:
            import importlib

            return issubclass(getattr(importlib.import_module(module), name), ProgressBar)
        except (ImportError, AttributeError, TypeError):
            return False
    return isinstance(callback, ProgressBar)


def _remove_new_files(log_dir: Path, before: set[Path], stop: Path) -> None:
    """Delete what this process added to a run folder that holds no result, then the folders left empty."""
    for path in sorted(set(log_dir.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    folder = log_dir
    while folder != stop and stop in folder.parents and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


TOOLS = {"grid": "prefopt.study.grid_cli", "report": "prefopt.study.report", "export": "prefopt.train.export"}  # not Lightning's


def _show_info_logs() -> None:
    """prefopt's INFO lines on stderr (the detected data format, truncation counts, cache use), set up once."""
    logger = logging.getLogger("prefopt")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------- user errors
# A config error (unknown key, bad value, YAML syntax) or a data error (prefopt.train.formats.DataError: a bad file, row or
# column) is printed as one short `error: ...` message, exit code 2: not jsonargparse's ~80-line usage before it, nor
# a traceback. Any other exception is a bug and keeps its traceback. PREFOPT_TRACEBACK=1 shows them all.
def _config_files(argv: list[str]) -> list[str]:
    """The config files a command line reads: the base config, then each `--config FILE` / `-c FILE`, in order."""
    files = base_config()
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def _yaml_problem(path: str) -> str | None:
    """"FILE: line L, column C: YAML syntax error: ..." for a config file that is not valid YAML; else None."""
    import yaml

    try:
        yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)  # syntax only: no tags are resolved
    except OSError:
        return None  # not a file (an inline --config value), or unreadable: the parser says so itself
    except yaml.MarkedYAMLError as err:
        mark, context = err.problem_mark, err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        started = f" ({err.context} at line {context.line + 1})" if err.context and context else ""
        return f"{path}: {where}YAML syntax error: {err.problem}{started}"
    except yaml.YAMLError as err:
        return f"{path}: YAML syntax error: {err}"
    return None


def _user_error(err: Exception, argv: list[str]) -> str:
    """The message printed for a config or data error."""
    from argparse import ArgumentError

    if not isinstance(err, ArgumentError):
        return f"error: {err}"
    problem = next(filter(None, map(_yaml_problem, _config_files(argv))), None)  # jsonargparse names no file
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    hint = f"(`python -m prefopt {command} --help` lists the options)".replace("  ", " ")
    return f"error: {problem or err}\n{hint}"


def main(args: list[str] | None = None):
    """`fit`, `validate`, `test`, `predict` go to LightningCLI; `grid`, `report` and `export` to their own modules."""
    argv = sys.argv[1:] if args is None else list(args)
    _show_info_logs()
    if argv and argv[0] in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    from argparse import ArgumentError

    from prefopt.train.formats import DataError

    try:
        folded = with_dotted_loss_keys(argv)
        if folded != argv:
            if args is None:
                sys.argv[1:] = folded
            else:
                args = folded
        return PrefoptCLI(
            PreferenceModule,
            PreferenceDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "exit_on_error": False,  # parse errors raise (ArgumentError), printed below without the usage
                **{cmd: {"default_config_files": base_config()} for cmd in COMMANDS},
            },
            auto_configure_optimizers=False,
        )
    except (ArgumentError, DataError) as err:  # Lightning re-raises errors from fit/validate/... unwrapped
        if os.environ.get("PREFOPT_TRACEBACK") == "1":
            raise
        sys.stderr.write(_user_error(err, argv) + "\n")
        raise SystemExit(2) from None


def run() -> None:
    """The command line's entry (`python -m prefopt`, the `prefopt` script): `main`, then exit with its status. A
    tool's integer result is the status (a grid with failed runs: 1, an interrupted one: 130); the others' results
    (LightningCLI, export's folder) mean 0, as errors raise."""
    result = main()
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    run()
