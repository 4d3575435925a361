"""The LightningDataModule: load preference rows, check them, tokenize once, pad per batch.

Each example is tokenized as three id lists: `prompt_ids = tokenizer(prompt)` (the tokenizer's own special tokens,
e.g. bos, included), and `chosen_ids` / `rejected_ids = tokenizer(completion, add_special_tokens=False) + [eos]`.
A sequence is prompt_ids + completion_ids, so the prompt/completion boundary is exact and no mask is inferred from
token values.

Truncation (documented modes): the prompt is first cut to `max_prompt_length` keeping its end
(`truncation_mode="keep_end"`, the default: the end of a prompt is what the response answers) or its start
(`"keep_start"`); then each completion is cut to `max_length - len(prompt)` keeping its start. An example whose
prompt alone fills `max_length`, or whose chosen and rejected completions are identical, is dropped, and the counts
are logged.

Batches (see `prefopt.logps`): paired data gives 2B rows, chosen rows then rejected rows. For losses on unpaired
data (KTO), each pair becomes two rows (chosen: desirable, rejected: undesirable), shuffled together so that batches
mix labels, and each batch appends B mismatched rows (prompt i with the completion of row i+1) for the KL estimate.
Validation batches are always paired, so every loss is measured on the same pairs with the same metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from prefopt.models import BUILTIN, load_tokenizer
from prefopt.sources import check_rows, load_rows

log = logging.getLogger(__name__)


@dataclass
class GoldData:
    """Pair sampling for the built-in task (used when `dataset: gold`)."""

    pairs_per_prompt: int = 500  # training pairs per training prompt (8 prompts)
    val_pairs_per_prompt: int = 64  # held-out pairs per training prompt, for the pair metrics
    label_temperature: float = 1.0  # Bradley-Terry temperature T of the labels; 0 = deterministic labels


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), not on the global RNG.

    Lightning calls `set_epoch` each epoch. `skip` drops the first indices of the next pass (a resumed epoch).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.skip = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()[self.skip :]
        self.skip = 0
        return iter(order)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable; its position is restored by the DataModule.

    Lightning pre-fetches one batch, so a count kept by the loader itself would be one ahead of training. The
    DataModule instead reads the trainer's own count of completed batches when it builds the loader on resume.
    """

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def _pad(rows: list[list[int]], pad_id: int) -> Tensor:
    width = max(map(len, rows))
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad prompt + completion rows; completion_mask marks the completion tokens only."""
    ids = [p + c for p, c in zip(prompts, completions)]
    input_ids = _pad(ids, pad_id)  # (N, T)
    positions = torch.arange(input_ids.shape[1])
    plen = torch.tensor([len(p) for p in prompts]).unsqueeze(1)
    total = torch.tensor([len(r) for r in ids]).unsqueeze(1)
    return {
        "input_ids": input_ids,
        "attention_mask": (positions < total).long(),
        "completion_mask": ((positions >= plen) & (positions < total)).long(),
    }


class PreferenceDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: str = BUILTIN,
        subset: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        columns: dict[str, str] | None = None,
        tokenizer: str = BUILTIN,
        max_length: int = 64,
        max_prompt_length: int | None = None,
        truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
        max_train_pairs: int | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        unpaired: bool = False,
        seed: int = 0,
        gold: GoldData | None = None,
    ) -> None:
        """
        Args:
            dataset: "gold" (the built-in task), a local file (.jsonl/.json/.parquet/.csv), a `save_to_disk`
                directory, or a hub dataset name.
            subset: the hub dataset's config name, if it has several.
            train_split: split used for training.
            val_split: split used for validation; None holds out `val_fraction` of the training rows (seeded).
            val_fraction: fraction held out when there is no validation split, in (0, 1).
            columns: map from prefopt's field names (prompt, chosen, rejected) to the dataset's column names.
            tokenizer: tokenizer name or path (linked to `model.model` by the CLI).
            max_length: maximum tokens of prompt + completion.
            max_prompt_length: maximum prompt tokens (None: no separate limit).
            truncation_mode: which end of a too-long prompt to keep.
            max_train_pairs: use only the first N training pairs (a data-size ablation axis).
            batch_size: pairs per training batch. Unpaired losses get 2 x batch_size rows per batch (both responses
                of batch_size pairs), so every loss sees the same number of responses per step.
            val_batch_size: pairs per validation batch (default: batch_size).
            num_workers: DataLoader worker processes.
            unpaired: train on unpaired (prompt, completion, label) rows (set by the CLI from the loss's metadata).
            seed: the run's seed (linked to `seed_everything`): it redraws the built-in task's pairs and the order.
            gold: pair sampling of the built-in task.
        """
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.gold = gold or GoldData()
        self.tokenizer = None
        self.train_examples: list[dict[str, Any]] = []
        self.val_examples: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- loading
    def _sources(self) -> tuple[Any, Any, str, str]:
        """(train rows, validation rows or None, train source name, val source name)."""
        hp = self.hparams
        if hp.dataset == BUILTIN:
            from prefopt.gold_build import ensure_pairs, ensure_reference

            train_path, val_path = ensure_pairs(
                ensure_reference(), seed=hp.seed, pairs_per_prompt=self.gold.pairs_per_prompt,
                val_pairs_per_prompt=self.gold.val_pairs_per_prompt, label_temperature=self.gold.label_temperature,
            )  # fmt: skip
            return load_rows(str(train_path)), load_rows(str(val_path)), str(train_path), str(val_path)
        train = load_rows(hp.dataset, hp.subset, hp.train_split)
        if hp.val_split is not None:
            return train, load_rows(hp.dataset, hp.subset, hp.val_split), hp.dataset, f"{hp.dataset}[{hp.val_split}]"
        return train, None, hp.dataset, hp.dataset

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        train, val, train_name, val_name = self._sources()
        fields = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **(hp.columns or {})}
        check_rows(train, fields, train_name)
        if val is None:
            split = train.train_test_split(test_size=hp.val_fraction, seed=hp.seed)
            train, val = split["train"], split["test"]
        else:
            check_rows(val, fields, val_name)
        if hp.max_train_pairs is not None:
            train = train.select(range(min(hp.max_train_pairs, len(train))))
        self.train_examples = self._tokenize(train, fields, train_name)
        self.val_examples = self._tokenize(val, fields, val_name)
        if not self.train_examples or not self.val_examples:
            raise ValueError(f"no usable examples left in {train_name} after truncation (see the log for counts)")

    def _tokenize(self, rows: Any, fields: dict[str, str], name: str) -> list[dict[str, Any]]:
        tok, hp = self.tokenizer, self.hparams
        eos = tok.eos_token_id

        def encode(batch: dict[str, list]) -> dict[str, list]:
            prompt = tok(batch[fields["prompt"]])["input_ids"]
            chosen = tok(batch[fields["chosen"]], add_special_tokens=False)["input_ids"]
            rejected = tok(batch[fields["rejected"]], add_special_tokens=False)["input_ids"]
            return {"prompt_ids": prompt, "chosen_ids": [c + [eos] for c in chosen],
                    "rejected_ids": [r + [eos] for r in rejected]}  # fmt: skip

        encoded = rows.map(encode, batched=True, remove_columns=rows.column_names, desc=f"tokenizing {name}")
        out, too_long_prompt, identical, truncated = [], 0, 0, 0
        for ex in encoded:
            prompt = ex["prompt_ids"]
            if hp.max_prompt_length is not None and len(prompt) > hp.max_prompt_length:
                keep = hp.max_prompt_length
                prompt = prompt[-keep:] if hp.truncation_mode == "keep_end" else prompt[:keep]
            room = hp.max_length - len(prompt)
            if room < 1:
                too_long_prompt += 1
                continue
            chosen, rejected = ex["chosen_ids"][:room], ex["rejected_ids"][:room]
            truncated += len(ex["chosen_ids"]) > room or len(ex["rejected_ids"]) > room
            if chosen == rejected:
                identical += 1
                continue
            out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
        log.info(
            "%s: %d pairs kept; %d truncated; dropped %d whose prompt fills max_length=%d and %d with identical "
            "chosen and rejected completions", name, len(out), truncated, too_long_prompt, hp.max_length, identical,
        )  # fmt: skip
        self.drop_counts = {"prompt_too_long": too_long_prompt, "identical": identical, "truncated": truncated}
        return out

    def set_reference_logps(self, table: Tensor | None) -> None:
        """Attach cached reference log-probs (N, 4) to the training pairs; batches then carry `ref_logps`."""
        if table is not None and table.shape[0] != len(self.train_examples):
            raise ValueError(f"reference table has {table.shape[0]} rows for {len(self.train_examples)} pairs")
        for i, example in enumerate(self.train_examples):
            if table is None:
                example.pop("ref_logps", None)
            else:
                example["ref_logps"] = table[i]

    # ---------------------------------------------------------------- batching
    def collate_pairs(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        prompts = [e["prompt_ids"] for e in examples]
        completions = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        batch = collate_rows(prompts + prompts, completions, self.tokenizer.pad_token_id)
        if all("ref_logps" in e for e in examples):
            batch["ref_logps"] = torch.stack([e["ref_logps"] for e in examples])  # (B, 4) float64
        return batch

    def collate_unpaired(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        # Mismatched rows for the KL estimate: prompt i with the completion of row i+1 (needs a batch of 2+).
        shifted = completions[1:] + completions[:1]
        kl = [c[: max(1, self.hparams.max_length - len(p))] for p, c in zip(prompts, shifted)]
        batch = collate_rows(prompts + prompts, completions + kl, self.tokenizer.pad_token_id)
        batch["desirable"] = torch.tensor([r["desirable"] for r in rows], dtype=torch.bool)
        return batch

    def unpaired_rows(self) -> list[dict[str, Any]]:
        rows = []
        for e in self.train_examples:
            rows.append({"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids"], "desirable": True})
            rows.append({"prompt_ids": e["prompt_ids"], "completion_ids": e["rejected_ids"], "desirable": False})
        return rows

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.unpaired:
            data, collate, rows = self.unpaired_rows(), self.collate_unpaired, 2 * hp.batch_size
        else:
            data, collate, rows = self.train_examples, self.collate_pairs, hp.batch_size
        sampler = EpochSeededSampler(len(data), hp.seed)
        if self.trainer is not None:  # resuming mid-epoch: skip the batches this epoch already trained on
            sampler.epoch = self.trainer.current_epoch
            sampler.skip = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed * rows
        return ResumableDataLoader(data, batch_size=rows, sampler=sampler, collate_fn=collate,
                          num_workers=hp.num_workers, drop_last=hp.unpaired)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.val_examples, batch_size=hp.val_batch_size or hp.batch_size,
                          collate_fn=self.collate_pairs, num_workers=hp.num_workers)  # fmt: skip

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
