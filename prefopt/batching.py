"""Length-grouped batching: batches of similar lengths, so that less of each padded batch is padding.

Within each window of `group` consecutive (global) batches of the usual seeded shuffle, examples are sorted by
length and cut into batches again; then the batches of the whole epoch are shuffled, so that lengths do not drift
over the epoch. Every example is still seen exactly once per epoch, and the order depends only on (seed, epoch).
This is the "megabatch" scheme of HF `group_by_length` (with `group` batches per megabatch instead of 50).

What it changes: which examples share a batch (batches are less varied in length; the set of examples per epoch
and the loss of any given batch are unchanged). `group: 1` gives the plain shuffle back.
"""

from __future__ import annotations

import torch

from prefopt.data import EpochSeededSampler


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
