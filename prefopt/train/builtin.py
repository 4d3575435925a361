"""Sources made in code: names a config may give as `model.model` or `data.dataset` instead of a hub name or a path.

Each name maps to "module:function", imported only when a run uses it (a run on a real model never loads the
built-in task). A model's function returns a `save_pretrained` directory; a dataset's returns (train file,
validation file) for a seed and the data's options for that source (`data.gold` for "gold").
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

BUILTIN = "gold"  # the built-in task (prefopt/gold/): its reference policy and its preference pairs
WEAK = "gold_weak"  # the built-in task's weak start: its reference's SFT stopped early (scenario S8)
MODELS = {BUILTIN: "prefopt.gold.build:ensure_reference", WEAK: "prefopt.gold.build:ensure_weak_reference"}
DATASETS = {BUILTIN: "prefopt.gold.pairs:pair_files"}


def source(table: dict[str, str], name: str) -> Callable:
    """The function that makes the built-in model or dataset `name` (a key of MODELS or DATASETS)."""
    module, _, function = table[name].partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass
class GoldData:
    """Pair sampling for the built-in task (used when `dataset: gold`)."""

    pairs_per_prompt: int = 500  # training pairs per training prompt (8 prompts)
    val_pairs_per_prompt: int = 64  # held-out pairs per training prompt, for the pair metrics
    label_temperature: float = 1.0  # Bradley-Terry temperature T of the labels; 0 = deterministic labels
    extra_responses: int = 0  # further reference responses per pair with their gold rewards (TPO, InfoNCA with K)
    extra_best_of: int = 1  # each further response is the best (by gold reward) of this many reference samples
    # Scenario knobs (prefopt/gold/pairs.py, `Labeler`; docs/gold_task.md, 'Scenario knobs'), off by default:
    label_flip: float = 0.0  # each label flipped with this probability (noisy labels)
    length_bias: float = 0.0  # with this probability the labeler prefers the longer response, whatever the reward
    rejected_edits: int = 0  # > 0: the second response is the first with this many words replaced (near duplicates)
    excluded_words: list[str] = dataclasses.field(default_factory=list)  # never in the data (narrowed coverage)


@dataclass(frozen=True)
class RewardModelOptions:
    """How `data.online.reward: reward_model` trains its Bradley-Terry reward model (`prefopt.train.reward_model`)."""

    steps: int = 500  # optimizer steps (4,000 pairs, batch 32: 4 epochs)
    batch_size: int = 32  # pairs per step
    lr: float = 1.0e-3  # AdamW, constant after a linear warmup over 10% of the steps
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"data.online.reward_model: steps and batch_size must be >= 1 and lr > 0, got {self}")


@dataclass(frozen=True)
class OnlinePairs:
    """Responses from the current policy, a round per training epoch (`prefopt.train.online`)."""

    pairs_per_round: int = 512  # prompts drawn per round (rounded up to a multiple of the 8 training prompts)
    max_new_tokens: int = 16  # the sampling cap, as the evaluation's
    epochs_per_round: int = 1  # a round's examples train this many epochs (fewer labels for the same steps)
    responses_per_prompt: int = 2  # K: the pair and K - 2 further responses (for a loss that reads them: RLOO)
    reward: str = "gold"  # what scores them: gold, reward_model, a reward model's directory, or module:function
    reward_model: RewardModelOptions = RewardModelOptions()  # with reward: reward_model

    def __post_init__(self) -> None:
        if min(self.pairs_per_round, self.max_new_tokens, self.epochs_per_round) < 1 or self.responses_per_prompt < 2:
            raise ValueError(f"data.online: pairs_per_round, max_new_tokens and epochs_per_round must be >= 1 and "
                             f"responses_per_prompt >= 2, got {self}")
