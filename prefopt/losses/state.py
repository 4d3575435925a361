"""State a loss keeps across batches or ranks, declared by the loss and served the same way for every loss.

A loss registered with `state=(...)` names factories of `LossState` modules. The training module builds one of each
when it is built (so their buffers are checkpointed and restored on resume), calls `update` on every training
record and `read` on every validation record, and never asks which loss it trains. A state either fills record
fields from what it has accumulated (BCO's running mean of the log-ratios) or widens fields across ranks (KTO's
reference point, a mean over the global batch). Cross-rank work goes through a `Collective`, which is the identity
in a single process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from prefopt.records import PairLogps, UnpairedLogps

Record = PairLogps | UnpairedLogps


class Collective(Protocol):
    """Cross-rank reductions: both are the identity in a single process."""

    def sum(self, tensor: Tensor) -> Tensor: ...

    def gather(self, tensor: Tensor) -> Tensor: ...  # rows of every rank, concatenated along dim 0


class SingleProcess:
    """The collective of a single process: nothing to reduce."""

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def gather(self, tensor: Tensor) -> Tensor:
        return tensor


class LossState(nn.Module):
    """Base class: `fields` are the record fields a state fills; `update` sees training records, `read` the rest."""

    fields: tuple[str, ...] = ()

    def update(self, record: Record, collective: Collective) -> Record:
        return self.read(record)

    def read(self, record: Record) -> Record:
        return record


class RunningLogratioMean(LossState):
    """The mean of every chosen and rejected log-ratio r = logp - ref_logp seen in training so far, over all ranks
    (BCO's reward shift delta is beta times it). Kept in float64 buffers; read as a detached float32 scalar."""

    fields = ("running_logratio_mean",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("total", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def update(self, record: Record, collective: Collective) -> Record:
        assert isinstance(record, PairLogps)
        logratios = torch.cat([record.chosen_logratios(), record.rejected_logratios()]).detach()
        step = collective.sum(torch.stack([logratios.sum().double(), logratios.new_tensor(logratios.numel()).double()]))
        self.total += step[0]
        self.count += step[1]
        return self.read(record)

    def read(self, record: Record) -> Record:
        return record.replace(running_logratio_mean=(self.total / self.count.clamp(min=1)).float())


class GlobalBatch(LossState):
    """Named fields of a training record gathered from every rank (detached): for a loss whose batch-level statistic
    (KTO's reference point z0) is a mean over the global batch and carries no gradient."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.names = names

    def update(self, record: Record, collective: Collective) -> Record:
        return record.replace(**{n: collective.gather(getattr(record, n).detach()) for n in self.names})


StateFactory = Callable[[], LossState]


def global_batch(*names: str) -> StateFactory:
    """A factory of `GlobalBatch(*names)`, for `register(..., state=...)`."""
    factory = lambda: GlobalBatch(*names)  # noqa: E731
    factory.__qualname__ = f"global_batch{names}"
    return factory
