"""Batches: the training samplers (a seeded, rank-aware shuffle; length-grouped batches), the resumable loader and
the collation of prompt + completion rows.

`EpochSeededSampler` is the shuffle every training run uses: its order depends only on (seed, epoch).
`LengthGroupedSampler` (`data.group_by_length`) makes batches of similar lengths:

Within each window of `group` consecutive (global) batches of the usual seeded shuffle, examples are sorted by
length and cut into batches again; then the batches of the whole epoch are shuffled, so that lengths do not drift
over the epoch. Every example is still seen exactly once per epoch, and the order depends only on (seed, epoch).
This is the "megabatch" scheme of HF `group_by_length` (with `group` batches per megabatch instead of 50).

What it changes: which examples share a batch (batches are less varied in length; the set of examples per epoch
and the loss of any given batch are unchanged). `group: 1` gives the plain shuffle back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from prefopt.train.formats import EXTRA_SCORES, SCORES


class EpochSeededSampler(DistributedSampler):
    """A shuffling sampler whose order depends only on (seed, epoch), not on the global RNG; rank-aware.

    Lightning calls `set_epoch` each epoch. With several processes (DDP), rank r takes every world_size-th index of
    the one global order, so a step's global batch is the same set of examples as in a single-process run with
    world_size times the batch (the remainder that does not divide evenly is dropped). `skip` drops the first
    indices of this rank's next pass (a resumed epoch).

    It subclasses DistributedSampler only so that Lightning uses it as it is: Lightning wraps any other sampler
    in a DistributedSampler of its own, which would reshuffle the order.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:  # no super().__init__:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size  # it needs a process group
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def generator(self) -> torch.Generator:
        """The random stream of this (seed, epoch)."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def global_order(self) -> list[int]:
        """All indices of this epoch, before the split over ranks."""
        return torch.randperm(self.size, generator=self.generator()).tolist()

    def __iter__(self):
        mine = self.global_order()[self.rank :: self.world_size][: len(self)][self.skip :]
        self.skip = 0
        return iter(mine)


class LengthGroupedSampler(EpochSeededSampler):
    """A seeded, rank-aware sampler whose consecutive `batch_size` indices have similar `lengths`.

    With several processes, a global batch (batch_size x world_size examples) is grouped as one, and rank r takes
    every world_size-th index of it; the split over ranks, `skip` and `set_epoch` are `EpochSeededSampler`'s.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, group: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        super().__init__(len(lengths), seed, rank, world_size)
        self.lengths, self.batch_size, self.group = lengths, batch_size, group

    def global_order(self) -> list[int]:
        """All indices of this epoch, length-grouped, before the split over ranks."""
        g = self.generator()
        order = torch.randperm(self.size, generator=g).tolist()
        step = self.batch_size * self.world_size
        window = step * self.group
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: self.lengths[i])
            batches += [chunk[s : s + step] for s in range(0, len(chunk), step)]
        full = [b for b in batches if len(b) == step]  # a short last batch stays last, as with the plain shuffle
        shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        return [i for b in shuffled + batches[len(full) :] for i in b]


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Fraction of the padded batch area that is padding, for batches of `batch_size` consecutive `order` indices."""
    padded = used = 0
    for s in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[s : s + batch_size]]
        padded += max(batch) * len(batch)
        used += sum(batch)
    return 1.0 - used / padded if padded else 0.0


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


def with_index(batch: dict[str, Tensor], examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Add the training pairs' positions in `train_examples` (`index`, (B,)): what per-example tables (the scorer's
    reference cache) are read by; and the responses' scores (`chosen_score`, `rejected_score`, (B,)) when read."""
    if examples and "index" in examples[0]:
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    for field in (f for f in SCORES if examples and f in examples[0]):
        batch[field] = torch.tensor([e[field] for e in examples], dtype=torch.float32)
    return batch


def with_extras(batch: dict[str, Tensor], examples: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Add the further responses (`extras`) as their own rows, M per pair in pair-major order, each prompt + response:
    `extra_input_ids`, `extra_attention_mask`, `extra_completion_mask` (B * M, T'), and `extra_scores` (B, M) when read."""
    if not examples or "extra_ids" not in examples[0]:
        return batch
    prompts = [e["prompt_ids"] for e in examples for _ in e["extra_ids"]]
    rows = collate_rows(prompts, [ids for e in examples for ids in e["extra_ids"]], pad_id)
    batch |= {f"extra_{k}": v for k, v in rows.items()}
    if EXTRA_SCORES in examples[0]:
        batch[EXTRA_SCORES] = torch.tensor([e[EXTRA_SCORES] for e in examples], dtype=torch.float32)
    return batch
