"""A moving reference: the policy's weights carried into the reference during a run.

TR-DPO (Gorbatovski et al. 2024, 'Learn Your Reference Model for Real Good Alignment', arXiv 2404.09656) updates the
reference every tau optimizer steps, softly, ref <- alpha * policy + (1 - alpha) * ref, or hard (alpha = 1),
ref <- policy; the hard update once per round is iterative DPO's reset. SFT then preference (`model.sft_steps`) is
one hard update at the end of the SFT stage. The module applies them (`PreferenceModule.on_train_batch_start`); the
reference then differs from its source, so checkpoints carry it, and the training pairs' cached reference log-probs
are rescored or read live from then on, never read stale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ReferenceUpdate:
    """Every `every` optimizer steps (counted from the start of the preference stage), the reference becomes
    alpha * policy + (1 - alpha) * reference, weight by weight; alpha = 1 is the hard update. every = 0: never."""

    every: int = 0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.every < 0 or not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"model.reference_update: every must be >= 0 and alpha in (0, 1], got every={self.every}, "
                             f"alpha={self.alpha}")

    def due(self, step: int, start: int = 0) -> bool:
        """Whether an update is due before optimizer step `step` + 1 (`step` done), the stage having begun at `start`."""
        return self.every > 0 and step > start and (step - start) % self.every == 0


@torch.no_grad()
def mix_into(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """reference <- alpha * policy + (1 - alpha) * reference, in place, parameter by parameter (matched by name; the
    same architecture). Buffers (rotary tables) are the architecture's, the same in both, and left alone."""
    theirs = dict(policy.named_parameters())
    for name, mine in reference.named_parameters():
        source = theirs[name].detach().to(dtype=mine.dtype, device=mine.device)
        if alpha == 1.0:
            mine.copy_(source)
        else:
            mine.mul_(1.0 - alpha).add_(source, alpha=alpha)


def rescore_pays(steps: int, batch_size: int, pairs: int) -> bool:
    """Whether rescoring every training pair with a moved reference costs less than reading it live for the `steps`
    until it moves again: a rescoring is one reference forward per batch of the whole set, a live read one per
    step. Either gives the same numbers (up to float rounding); only the time differs."""
    return steps * batch_size >= pairs
