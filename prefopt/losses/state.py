"""State a loss keeps across batches or ranks, declared by the loss and served the same way for every loss.

A loss registered with `state=(...)` names factories of `LossState` modules. The training module builds one of each
when it is built (so their buffers are checkpointed and restored on resume), calls `update` on every training
record and `read` on every validation record, and never asks which loss it trains. A state either fills record
fields from what it has accumulated (BCO's running mean of the log-ratios) or widens fields across ranks (KTO's
reference point, a mean over the global batch). Cross-rank work goes through a `Collective`, which is the identity
in a single process.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any, Literal, Protocol

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

    def set_progress(self, step: int, total: int) -> None:
        """Told, before every training step, the optimizer steps done and the run's total; most states ignore it."""


class TrainingProgress(LossState):
    """The fraction of the run done, t = optimizer steps done / the run's total optimizer steps (0 outside a fit,
    and on validation before any training step): what a scheduled hyperparameter reads. Derived from the trainer's
    step counter at every step, so a resumed run continues its schedule without a buffer of its own."""

    fields = ("training_progress",)

    def __init__(self) -> None:
        super().__init__()
        self.progress = 0.0

    def set_progress(self, step: int, total: int) -> None:
        self.progress = min(1.0, max(0.0, step / max(1, total)))

    def read(self, record: Record) -> Record:
        return record.replace(training_progress=record.policy_chosen_logps.new_tensor(self.progress))


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


# ---------------------------------------------------------------- running margin statistics, Gaussian pair filter
MarginKind = Literal["sum", "mean"]
# The record fields (mean, std) that `MarginMoments` fills for each kind of margin.
MARGIN_FIELDS: dict[str, tuple[str, str]] = {
    "sum": ("margin_ema_mean", "margin_ema_std"), "mean": ("avg_margin_ema_mean", "avg_margin_ema_std"),
}
STD_FLOOR = 1e-12  # floor on a standard deviation that divides (a batch of equal margins has none)


def pair_margin(record: PairLogps, margin: MarginKind) -> Tensor:
    """The detached margin of each pair, shape (B,): h = r_w - r_l ("sum") or r_w/|y_w| - r_l/|y_l| ("mean")."""
    return (record.margins() if margin == "sum" else record.avg_margins()).detach()


class MarginMoments(LossState):
    """Exponential moving averages of a training batch's mean and standard deviation of a pair margin, over all
    ranks: mean <- m mean + (1 - m) batch mean and std <- m std + (1 - m) batch std (the Bessel-corrected sample
    std, as torch.std; 0 for a single pair), both from 0 with no bias correction, as the beta-DPO and alpha-DPO
    authors' trainers keep them. `update` folds the batch in first, then fills the record with the new values;
    `read` fills the current ones (validation never moves them). Float64 buffers; the fields are detached scalars in
    the record's dtype."""

    def __init__(self, momentum: float, margin: MarginKind) -> None:
        super().__init__()
        self.momentum, self.margin, self.fields = momentum, margin, MARGIN_FIELDS[margin]
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("std", torch.zeros((), dtype=torch.float64))

    def update(self, record: Record, collective: Collective) -> Record:
        assert isinstance(record, PairLogps)
        x = pair_margin(record, self.margin).double()  # (B,)
        n, total, squares = collective.sum(torch.stack([x.new_tensor(x.numel()), x.sum(), x.square().sum()]))
        mean = total / n.clamp(min=1)
        std = ((squares - n * mean.square()) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()  # 0 when n == 1
        self.mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
        self.std.mul_(self.momentum).add_((1 - self.momentum) * std)
        return self.read(record)

    def read(self, record: Record) -> Record:
        dtype = record.policy_chosen_logps.dtype  # copies: a later update must not change a record already made
        return record.replace(**dict(zip(self.fields, (self.mean.to(dtype, copy=True), self.std.to(dtype, copy=True)))))


class GaussianPairFilter(LossState):
    """beta-DPO's data filter: keep k = max(1, floor(rho B)) of a training batch's B pairs, drawn without replacement
    with probability proportional to the Gaussian density of each pair's margin x_i around the running mean,
    w_i = exp(-(x_i - mean)^2 / (2 std^2)); mean and std are the record's fields that a `MarginMoments` declared
    before this state has just filled. The record's `kept_pairs` marks the k pairs. The draws are made at once as
    the top k of log w_i + Gumbel noise (the Gumbel-top-k trick: the same distribution as torch.multinomial(w, k)
    without replacement, and no underflow when every w_i is tiny). The noise comes from a generator seeded by a hash
    of (seed, the count of earlier draws, the process rank): the count is a buffer, so a run resumed from a
    checkpoint keeps the pairs the uninterrupted run keeps; each rank filters its own rows. `read` keeps them all."""

    fields = ("kept_pairs",)

    def __init__(self, rho: float, seed: int, margin: MarginKind = "sum") -> None:
        super().__init__()
        self.rho, self.seed, self.margin = rho, seed, margin
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        self._draws: int | None = None  # the host's copy of `draws`: seeding then needs no wait for the device

    def update(self, record: Record, collective: Collective) -> Record:
        assert isinstance(record, PairLogps)
        mean_field, std_field = MARGIN_FIELDS[self.margin]
        mean, std = getattr(record, mean_field), getattr(record, std_field)
        if mean is None or std is None:
            raise ValueError(f"GaussianPairFilter reads {mean_field} and {std_field}: declare MarginMoments before it")
        x = pair_margin(record, self.margin).double()  # (B,)
        b, draw = x.numel(), self._next_draw()
        k = max(1, int(self.rho * b + 1e-9))  # the epsilon: rho * B is a whole number more often than floats say
        if k >= b:
            return record.replace(kept_pairs=torch.ones(b, dtype=torch.bool, device=x.device))
        generator = torch.Generator(device=x.device)
        generator.manual_seed(_draw_seed(self.seed, draw))
        uniform = torch.rand(b, generator=generator, dtype=torch.float64, device=x.device)  # (B,)
        uniform = uniform.clamp(min=torch.finfo(torch.float64).tiny)  # log(log(.)) below: keep it off 0
        log_w = -0.5 * ((x - mean.double()) / std.double().clamp(min=STD_FLOOR)).square()
        kept = torch.zeros(b, dtype=torch.bool, device=x.device)
        kept[(log_w - (-uniform.log()).log()).topk(k).indices] = True
        return record.replace(kept_pairs=kept)

    def _next_draw(self) -> int:
        if self._draws is None:  # after construction or a checkpoint load: read the buffer once
            self._draws = int(self.draws)
        draw, self._draws = self._draws, self._draws + 1
        self.draws.fill_(self._draws)
        return draw

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._draws = None


def _draw_seed(seed: int, draw: int) -> int:
    """A generator seed for one filter draw, from the loss's seed, the draw's number and the process rank."""
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return int.from_bytes(hashlib.blake2b(f"{seed}/{draw}/{rank}".encode(), digest_size=7).digest(), "little")


def configured(cls: type[LossState], fields: tuple[str, ...], **kwargs: Any) -> StateFactory:
    """A factory of `cls(**kwargs)` for a loss's `state` hook, carrying the record `fields` the state fills (the
    scorer's parse-time check reads them from the factory) and a readable name for docs/losses.md."""
    factory = functools.partial(cls, **kwargs)
    factory.fields = fields  # type: ignore[attr-defined]
    factory.__qualname__ = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"  # type: ignore
    return factory


def margin_moments(momentum: float, margin: MarginKind) -> StateFactory:
    return configured(MarginMoments, MARGIN_FIELDS[margin], momentum=momentum, margin=margin)


def gaussian_pair_filter(rho: float, seed: int, margin: MarginKind = "sum") -> StateFactory:
    return configured(GaussianPairFilter, GaussianPairFilter.fields, rho=rho, seed=seed, margin=margin)
