"""A Bradley-Terry reward model trained in prefopt: the policy's architecture with a scalar head (#20).

r_phi(x, y) is a linear head on the last hidden state at the response's last token (its <eos>), on the decoder of the
policy's starting model (`AutoModelForSequenceClassification` with one label: a standard `save_pretrained` reward
model directory, which `data.online.reward` can name again). It is fitted to preference pairs by the Bradley-Terry
likelihood, loss -log sigmoid(r(x, y_w) - r(x, y_l)) (Ouyang et al. 2022, arXiv 2203.02155, Eq. 1, with one
comparison per pair), with AdamW, from a seed: the same pairs and options give the same model, so it is built once and
cached (`ensure_reward_model`). Its held-out accuracy is measured on the data's validation pairs.

The scalar is read at the last non-padding position of each right-padded row, found from the attention mask (not from
`pad_token_id`, which some tokenizers share with <eos>).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from prefopt.train.batching import collate_rows
from prefopt.train.builtin import RewardModelOptions

log = logging.getLogger(__name__)

STATS = "prefopt_reward_model.json"  # beside the weights: the recipe, the data's hash, the accuracies


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def load_reward_model(path: str | Path, device: torch.device | str | None = None) -> PreTrainedModel:
    """A `save_pretrained` sequence-classification model with one output (a reward model), frozen, in eval mode."""
    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    if model.config.num_labels != 1:
        raise ValueError(f"{path}: a reward model has one output (num_labels 1), this one has {model.config.num_labels}")
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def _head(model: PreTrainedModel) -> torch.nn.Module:
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no `score` or `classifier` head to read a reward from")
    return head


def scalar_rewards(model: PreTrainedModel, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                   batch_size: int = 256) -> Tensor:
    """r(x, y) for each (prompt ids, response ids) row, (N,) float32 on the model's device; with gradient when the
    model trains."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = collate_rows(prompts[start:start + batch_size], responses[start:start + batch_size], pad_id)
        ids, mask = rows["input_ids"].to(device), rows["attention_mask"].to(device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, H)
        last = mask.sum(-1) - 1  # right padding: the last real token
        out.append(_head(model)(hidden[torch.arange(len(ids), device=device), last]).squeeze(-1).float())
    return torch.cat(out) if out else torch.zeros(0)


def pair_rewards(model: PreTrainedModel, pairs: list[dict[str, Any]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(r(x, y_w), r(x, y_l)) of a list of pairs (prompt_ids, chosen_ids, rejected_ids), each (B,)."""
    prompts = [p["prompt_ids"] for p in pairs]
    both = scalar_rewards(model, prompts + prompts, [p["chosen_ids"] for p in pairs] +
                          [p["rejected_ids"] for p in pairs], pad_id)
    return both[: len(pairs)], both[len(pairs):]


@torch.no_grad()
def accuracy(model: PreTrainedModel, pairs: list[dict[str, Any]], pad_id: int) -> float:
    """The share of pairs whose chosen response gets the higher reward (ties count half)."""
    r_w, r_l = pair_rewards(model, pairs, pad_id)
    return float(((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).mean())


def train_reward_model(source: str | Path, tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, Any]],
                       options: RewardModelOptions, seed: int) -> PreTrainedModel:
    """A reward model on `source`'s decoder, fitted to `pairs` by the Bradley-Terry loss; the global RNG is left as
    it was (the head's initialization and the batch order come from `seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet():  # transformers reports the new head as "MISSING": it is, by design
            model = AutoModelForSequenceClassification.from_pretrained(str(source), num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        warmup = max(1, options.steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        order = torch.Generator().manual_seed(seed)
        queue: list[int] = []
        for _ in range(options.steps):
            if len(queue) < options.batch_size:  # a fresh permutation per epoch
                queue += torch.randperm(len(pairs), generator=order).tolist()
            batch, queue = [pairs[i] for i in queue[: options.batch_size]], queue[options.batch_size:]
            r_w, r_l = pair_rewards(model, batch, tokenizer.pad_token_id)
            loss = -F.logsigmoid(r_w - r_l).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().requires_grad_(False)


def data_key(pairs: list[dict[str, Any]]) -> str:
    """A hash of the pairs' token ids: the reward model's cache key with its source and options."""
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]]).encode())
    return digest.hexdigest()[:16]


def ensure_reward_model(source: str | Path, tokenizer: PreTrainedTokenizerBase, train: list[dict[str, Any]],
                        val: list[dict[str, Any]], options: RewardModelOptions, seed: int, cache_dir: Path) -> Path:
    """The directory of the reward model trained on `train` (built once per source, pairs, options and seed, and
    cached under `cache_dir`), with its train and held-out accuracies in prefopt_reward_model.json."""
    recipe = {"source": str(source), "data": data_key(train), "options": dataclasses.asdict(options), "seed": seed}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_dir / "reward_models" / key
    if (final / STATS).is_file():
        return final
    log.info("training a Bradley-Terry reward model on %d pairs (%d steps); cached in %s", len(train), options.steps,
             final)
    model = train_reward_model(source, tokenizer, train, options, seed)
    stats = {**recipe, "pairs": len(train), "train_accuracy": accuracy(model, train, tokenizer.pad_token_id),
             "val_accuracy": accuracy(model, val, tokenizer.pad_token_id), "val_pairs": len(val)}
    tmp = final.with_name(f"{key}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / STATS).write_text(json.dumps(stats, indent=2))
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same model first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def reward_model_stats(path: str | Path) -> dict[str, Any]:
    """What `ensure_reward_model` recorded about the model at `path` ({} for a reward model made elsewhere)."""
    stats = Path(path) / STATS
    return json.loads(stats.read_text()) if stats.is_file() else {}
