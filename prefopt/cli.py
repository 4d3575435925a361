"""The command line: `python -m prefopt {fit,validate,test} --config ...` (LightningCLI).

The shared base, configs/base.yaml, is always read first (it holds everything a comparison keeps fixed), so an
experiment file states only what differs: `python -m prefopt fit --config experiments/simpo.yaml`. More files stack
after it, last wins: `--config experiments/dpo.yaml --config my_overrides.yaml`. Set PREFOPT_BASE_CONFIG to use
another base file.

Values two parts must agree on are linked at parse time, not copied by hand: the tokenizer is the model's, the
DataModule's paired/unpaired mode follows the loss's metadata, and the data seed is the run's seed (so a seed
redraws the built-in task's preference pairs as well as the initialization order).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from prefopt.data import PreferenceDataModule
from prefopt.losses import LossConfig
from prefopt.module import PreferenceModule


BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


def base_config() -> list[str]:
    """The base config file(s) read before any --config: PREFOPT_BASE_CONFIG, else the repo's configs/base.yaml."""
    path = os.environ.get("PREFOPT_BASE_CONFIG", str(BASE_CONFIG))
    return [path] if path and Path(path).is_file() else []


def run_name(loss: LossConfig, seed: int | None) -> str:
    """A run name generated from the config: loss name, its hyperparameters that differ from the defaults, seed."""
    defaults = loss.spec.defaults()
    parts = [loss.name] + [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
                           for k, v in loss.params.items() if v != defaults.get(k) and not isinstance(v, list)]  # fmt: skip
    return "_".join(parts + [f"seed{seed}"])


def _unpaired(loss: LossConfig) -> bool:
    return not loss.paired


class PrefoptCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.link_arguments("model.loss", "data.unpaired", compute_fn=_unpaired)
        parser.link_arguments("seed_everything", "data.seed")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            args = logger["init_args"] if isinstance(logger, dict) else logger.init_args
            if args.get("name") in (None, "auto"):
                args["name"] = run_name(config.model.loss, config.seed_everything)


TOOLS = {"grid": "prefopt.grid", "report": "prefopt.report", "export": "prefopt.export"}  # not Lightning's


def _show_info_logs() -> None:
    """prefopt's INFO lines on stderr (the detected data format, truncation counts, cache use), set up once."""
    logger = logging.getLogger("prefopt")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(args: list[str] | None = None):
    """`fit`, `validate`, `test`, `predict` go to LightningCLI; `grid`, `report` and `export` to their own modules."""
    argv = sys.argv[1:] if args is None else list(args)
    _show_info_logs()
    if argv and argv[0] in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    return PrefoptCLI(
        PreferenceModule,
        PreferenceDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={cmd: {"default_config_files": base_config()} for cmd in ("fit", "validate", "test", "predict")},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
