"""sDPO's data in chunks (Kim et al. 2024, 'sDPO: Don't Use Your Data All at Once', arXiv 2403.19270): `data.stages: T`
splits the training pairs into T chunks and trains stage t on chunk t only, with the model that ended stage t - 1 as
the reference (`model.reference_update: {every: n, alpha: 1}`, n the steps of a stage: the reference reset to the
policy at each stage's start). The chunks are a seeded random partition of equal sizes (the paper splits by source
dataset; it notes an easy-to-hard order may help, which a random split does not give). The run's step budget is
split evenly: stage t is optimizer steps [t n, (t + 1) n), cycling over its chunk in a fresh order each pass.
"""

from __future__ import annotations

from typing import Any

import torch

from prefopt.train.batching import EpochSeededSampler
from prefopt.train.formats import DataError


class StagedSampler(EpochSeededSampler):
    """The whole run's batches in one epoch: `stages` x `steps` global batches of `batch_size` x world_size indices,
    stage t's drawn from chunk t; the order depends only on the seed. Rank r takes every world_size-th index."""

    def __init__(self, size: int, stages: int, steps: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(size, seed, rank, world_size)
        self.stages, self.steps, self.batch_size = stages, steps, batch_size

    def __len__(self) -> int:
        return self.stages * self.steps * self.batch_size

    def chunks(self) -> list[list[int]]:
        """The seeded partition of the pairs into `stages` chunks (sizes differ by at most one)."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 - 1)).tolist()
        return [order[t :: self.stages] for t in range(self.stages)]

    def global_order(self) -> list[int]:
        g, out = self.generator(), []
        need = self.steps * self.batch_size * self.world_size
        for chunk in self.chunks():
            stage: list[int] = []
            while len(stage) < need:  # passes over the chunk, each in a fresh order
                stage += [chunk[i] for i in torch.randperm(len(chunk), generator=g).tolist()]
            out += stage[:need]
        return out

    def __iter__(self):
        mine = self.global_order()[self.rank :: self.world_size][self.skip :]
        self.skip = 0
        return iter(mine)


def staged_sampler(datamodule: Any, size: int, rows: int, rank: int, world: int) -> StagedSampler:
    """`data.stages`'s sampler for this run, after checking that the run's steps split into equal stages and that the
    reference is reset at each stage's start (what makes them sDPO's stages)."""
    stages, trainer = datamodule.hparams.stages, datamodule.trainer
    total = trainer.max_steps if trainer is not None else -1
    module = getattr(trainer, "lightning_module", None)
    update = getattr(module, "reference_update", None)
    problems = [why for bad, why in (
        (total < stages or total % stages, f"splits trainer.max_steps into equal stages: {total} steps for {stages}"),
        (datamodule.online is not None or datamodule.hparams.unpaired or datamodule.hparams.group_by_length,
         "splits a fixed set of pairs (not data.online, an unpaired loss or group_by_length)"),
        (total >= stages and (update is None or update.every != total // stages or update.alpha != 1.0
                              or module.hparams.sft_steps),
         f"resets the reference at each stage's start: set model.reference_update: {{every: "
         f"{max(total, 0) // stages}, alpha: 1}} and no model.sft_steps"),
    ) if bad]
    if problems:
        raise DataError("data.stages " + "; it ".join(problems))
    if size < stages:
        raise DataError(f"data.stages: {stages} chunks of {size} training pairs")
    return StagedSampler(size, stages, total // stages, rows, datamodule.hparams.seed, rank, world)
