"""What scores the responses that on-policy rounds sample (`data.online.reward`), as labeler or as RL reward (#20).

- "gold": the built-in task's exact gold reward R(x, y) (`prefopt.gold.task.gold_reward`).
- "reward_model": a Bradley-Terry reward model trained in prefopt (`prefopt.train.reward_model`) on the run's own
  offline training pairs, the very pairs and labels offline DPO of the same seed trains on, with
  `data.online.reward_model`'s options; built once and cached. The labels it was trained on count toward the run's
  label budget: RLHF's learned reward in miniature.
- a directory: a `save_pretrained` sequence-classification model with one output (a reward model trained elsewhere,
  or one `reward_model` cached).
- "module:function": a user function `fn(prompts: list[str], responses: list[str]) -> list[float]` on the texts.

With labels (`data.online` and a loss that reads them), the labeler draws Bradley-Terry labels from these rewards
at data.gold.label_temperature (0: the higher reward wins); without, the loss reads the rewards themselves as the
responses' scores. A learned reward's quality is reported beside the run's metrics (`stats`): its held-out accuracy
on the data's validation pairs, the gold reward's accuracy on the same labels (the ceiling), and its correlation with
the gold reward on those pairs' responses.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from prefopt.gold import task
from prefopt.gold.build import default_cache_dir
from prefopt.gold.sampling import _prompt_ids
from prefopt.train.models import resolve
from prefopt.train.reward_model import (
    ensure_reward_model, load_reward_model, pair_rewards, reward_model_stats, scalar_rewards,
)

GOLD, LEARNED = "gold", "reward_model"


class Sample(NamedTuple):
    """A sampled response to score: its token ids, and on the built-in task its topic and words."""

    prompt_ids: list[int]
    response_ids: list[int]
    topic: str
    words: list[str]


class Reward:
    """A reward function over samples, with what making it cost in labels and what is known of its quality."""

    def __init__(self, fn: Callable[[list[Sample]], list[float]], gold: bool = False, labels_spent: int = 0,
                 stats: dict[str, float] | None = None, source: str = GOLD) -> None:
        self.fn, self.gold, self.labels_spent, self.stats, self.source = fn, gold, labels_spent, stats or {}, source

    def __call__(self, samples: list[Sample]) -> list[float]:
        return [float(r) for r in self.fn(samples)] if samples else []


def gold_reward() -> Reward:
    """The built-in task's exact gold reward of each sample."""
    return Reward(lambda samples: [task.gold_reward(s.topic, s.words) for s in samples], gold=True)


def make_reward(name: str, datamodule: Any, device: torch.device) -> Reward:
    """The reward `data.online.reward` names, for the run whose DataModule is `datamodule` (set up: its training
    pairs are the offline ones a learned reward model trains on)."""
    if name == GOLD:
        return gold_reward()
    if name == LEARNED or Path(name).expanduser().is_dir():
        return _model_reward(name, datamodule, device)
    module, _, function = name.partition(":")
    if not function:
        raise ValueError(f"data.online.reward: {name!r} is not 'gold', 'reward_model', a reward model's directory, or "
                         "'module:function'")
    fn = getattr(importlib.import_module(module), function)
    tok = datamodule.tokenizer

    def call(samples: list[Sample]) -> list[float]:
        prompts = [tok.decode(s.prompt_ids, skip_special_tokens=True) for s in samples]
        return list(fn(prompts, [tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]))

    return Reward(call, source=name)


def _model_reward(name: str, datamodule: Any, device: torch.device) -> Reward:
    tok, hp = datamodule.tokenizer, datamodule.hparams
    labels = 0
    if name == LEARNED:
        base = resolve(hp.tokenizer)  # the policy's source: a built-in name made, else as given
        options = datamodule.online.reward_model
        name = str(ensure_reward_model(base, tok, datamodule.train_examples, datamodule.val_examples, options,
                                       hp.seed, default_cache_dir()))
        labels = len(datamodule.train_examples)
    model = load_reward_model(Path(name).expanduser(), device)
    stats = {k: float(v) for k, v in reward_model_stats(name).items() if k.endswith("accuracy")}
    stats |= gold_agreement(model, datamodule.val_examples, tok)

    def call(samples: list[Sample]) -> list[float]:
        with torch.no_grad():
            return scalar_rewards(model, [s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                  tok.pad_token_id).tolist()

    return Reward(call, labels_spent=labels, stats={f"rm_{k}": v for k, v in stats.items()}, source=name)


@torch.no_grad()
def gold_agreement(model: Any, pairs: list[dict[str, Any]], tokenizer: Any) -> dict[str, float]:
    """On the built-in task's held-out pairs: the reward model's accuracy on their labels, the gold reward's accuracy
    on the same labels (what a perfect reward model would score: the labels are Bradley-Terry draws), and the Pearson
    correlation of the two rewards over the pairs' responses."""
    topics = {tuple(_prompt_ids(tokenizer, t)): t for t in task.TOPICS}
    words = lambda ids: [w for w in tokenizer.convert_ids_to_tokens(ids) if w in task.CONTENT_WORDS]  # noqa: E731
    if not pairs or any(tuple(p["prompt_ids"]) not in topics for p in pairs):
        return {}
    r_w, r_l = pair_rewards(model, pairs, tokenizer.pad_token_id)
    g = torch.tensor([[task.gold_reward(topics[tuple(p["prompt_ids"])], words(p[k])) for k in ("chosen_ids",
                                                                                                "rejected_ids")]
                      for p in pairs])
    rm = torch.stack([r_w, r_l], -1).cpu()
    correlation = torch.corrcoef(torch.stack([rm.flatten(), g.flatten()]))[0, 1]
    return {"val_accuracy": float(((rm[:, 0] > rm[:, 1]) + 0.5 * (rm[:, 0] == rm[:, 1])).float().mean()),
            "gold_val_accuracy": float(((g[:, 0] > g[:, 1]) + 0.5 * (g[:, 0] == g[:, 1])).float().mean()),
            "gold_correlation": float(correlation)}
