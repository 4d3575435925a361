"""The loss registry: a dict from name to a pure loss function plus its metadata.

A loss is registered with `@register(name, ...)` on a function `fn(lp, *, hyper=default, ...) -> Tensor`
that maps a log-prob record (`PairLogps` or `UnpairedLogps`) to per-example losses of shape (B,). Its
keyword-only signature *is* its hyperparameter schema: each hyperparameter is typed, and its valid range is
an `Annotated[float, Range(...)]` or a `Literal[...]` (`prefopt.losses.schema`). The training module asks the
metadata (needs a reference? paired or unpaired rows?) and never branches on a loss name.

A `LossConfig` is what a YAML file names: `{name: dpo, beta: 0.1}`. It is registered as a jsonargparse
type, so an unknown name or an out-of-range value fails while the config is parsed (`--print_config`
included), before any model loads, and the error lists the valid choices.

Generic options (`prefopt.losses.options`: LD-DPO's `ld_alpha`, WPO's `wpo`) are extra hyperparameters of every
paired loss registered with `options=True` (the default); `LossConfig.__call__` applies them around the loss
function, so no loss re-implements them. A loss function may carry hooks that `LossConfig` asks:
`fn.check_params(params, where)` (cross-field checks, nested configs), and `fn.needs_reference(params)`,
`fn.paired(params)`, `fn.reward_scale(params)`, `fn.reads(params)`, `fn.state(params)` where the metadata depends
on the hyperparameters (composite).

A loss declares what it reads: the record fields (`LossConfig.reads`: the policy's sums and lengths, the reference's
sums when it needs a reference, and any field named in `reads=`, such as TDPO's sequential KL), and the running
state it keeps (`state=`, `prefopt.losses.state`: BCO's running mean, KTO's global-batch reference point). The
scorer refuses, when the config is parsed, a loss that reads a field its settings cannot produce.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from prefopt.losses.options import PAIR_OPTIONS, apply_pair_options, check_pair_options, option_reads
from prefopt.losses.schema import Hyperparameter, hyperparameters
from prefopt.losses.state import StateFactory
from prefopt.records import PairLogps, UnpairedLogps

# The fields every loss of a kind reads, and those it reads when it needs a reference.
BASE_FIELDS = {True: frozenset({"policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"}),
               False: frozenset({"policy_logps", "lengths", "desirable"})}
REFERENCE_FIELDS = {True: frozenset({"ref_chosen_logps", "ref_rejected_logps"}), False: frozenset({"ref_logps"})}
RECORD_FIELDS = {True: frozenset(PairLogps.__dataclass_fields__), False: frozenset(UnpairedLogps.__dataclass_fields__)}


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function and what the training loop and the docs need to know about it."""

    name: str
    fn: Callable[..., Tensor]
    paper: str  # authors, year, arXiv id, and the equation
    formula: str  # the per-example loss in one line, in the notation of docs/loss_pitfalls.md
    needs_reference: bool  # does training need reference log-probs?
    paired: bool  # True: (prompt, chosen, rejected) pairs; False: (prompt, completion, label) rows
    aggregation: str  # how completion log-probs are aggregated: "sum", "mean", or which option decides
    reward: str  # the loss's own implicit reward, e.g. "beta * (logp - ref_logp)"
    hyperparameters: tuple[Hyperparameter, ...] = field(default=())
    # Which hyperparameter scales the reference-based reward in the shared metrics (None: scale 1).
    reward_scale: str | None = "beta"
    aliases: tuple[str, ...] = ()
    # The generic options (prefopt.losses.options) this loss accepts on top of its own hyperparameters.
    options: tuple[Hyperparameter, ...] = ()
    reads: frozenset[str] = frozenset()  # record fields read beyond BASE_FIELDS (and REFERENCE_FIELDS)
    state: tuple[StateFactory, ...] = ()  # running state kept across batches or ranks (prefopt.losses.state)
    # The hyperparameter that sets how far the policy moves from the reference, and the sign of its effect on the KL
    # (-1: larger beta, smaller KL; +1: larger lam, larger KL): what a calibrating grid searches (prefopt.study.calibration).
    strength: tuple[str, int] | None = None
    # Does it read the preference label (which response is chosen)? False: only the responses' scores (RLOO, InfoNCA),
    # so on-policy data need not spend labels on it (`prefopt.train.online`).
    labels: bool = True
    # Is its gradient right only for responses sampled from the policy being trained (a policy gradient)? Such a loss
    # trains on on-policy rounds only (`data.online`), never on a fixed set of pairs.
    on_policy: bool = False

    @property
    def all_hyperparameters(self) -> tuple[Hyperparameter, ...]:
        return self.hyperparameters + self.options

    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.all_hyperparameters}

    @property
    def summary(self) -> str:
        """The first line of the loss function's docstring."""
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


LOSSES: dict[str, LossSpec] = {}


def register(
    name: str,
    *,
    paper: str,
    formula: str,
    needs_reference: bool,
    paired: bool = True,
    aggregation: str = "sum",
    reward: str = "beta * (logp - ref_logp)",
    reward_scale: str | None = "beta",
    aliases: tuple[str, ...] = (),
    options: bool = True,
    reads: tuple[str, ...] = (),
    state: tuple[StateFactory, ...] = (),
    strength: tuple[str, int] | None | str = "auto",
    labels: bool = True,
    on_policy: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register `fn` under `name` (and each alias); the function itself is returned unchanged.

    `options=True` gives a paired loss the generic options of `prefopt.losses.options` (LD-DPO, WPO). `reads`: the
    record fields it reads beyond the policy's sums and lengths and (with `needs_reference`) the reference's sums;
    `state`: factories of the running state it keeps (`prefopt.losses.state`); `strength`: (hyperparameter, +1 or -1),
    the knob that sets the KL to the reference and its sign; "auto" is ("beta", -1) for a loss with a reference and a
    beta (the KL falls as beta grows), else None (no single knob: a calibrating grid then names one, e.g. the steps).
    `labels=False`: it reads the responses' scores, not which one is chosen; `on_policy=True`: it trains on responses
    sampled from the policy being trained only (`LossSpec`).
    """

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        own = hyperparameters(fn)
        extra = PAIR_OPTIONS if options and paired else ()
        clash = {h.name for h in own} & {h.name for h in extra}
        if clash:
            raise TypeError(f"loss {name!r}: hyperparameters {sorted(clash)} clash with the generic options")
        if reward_scale is not None and reward_scale not in {h.name for h in own}:
            raise TypeError(f"loss {name!r}: reward_scale {reward_scale!r} is not one of its hyperparameters")
        unknown = set(reads) - RECORD_FIELDS[paired]
        if unknown:
            raise TypeError(f"loss {name!r} reads {sorted(unknown)}, which are not fields of its record")
        knob = strength
        if knob == "auto":
            knob = ("beta", -1) if needs_reference and "beta" in {h.name for h in own} else None
        if knob is not None and (knob[0] not in {h.name for h in own} or knob[1] not in (-1, 1)):
            raise TypeError(f"loss {name!r}: strength {knob!r} is not (one of its hyperparameters, +1 or -1)")
        spec = LossSpec(
            name, fn, paper, formula, needs_reference, paired, aggregation, reward,
            own, reward_scale, aliases, extra, frozenset(reads), tuple(state), knob, labels, on_policy,
        )
        for key in (name, *aliases):
            if key in LOSSES:
                raise KeyError(f"loss {key!r} is registered twice")
            LOSSES[key] = spec
        return fn

    return decorate


def loss_names() -> list[str]:
    """Every name a config may use, aliases included, sorted."""
    return sorted(LOSSES)


class LossConfig:
    """A validated choice of loss and hyperparameters: what `model.loss` in a YAML file holds.

    `LossConfig("dpo", beta=0.1)` or, from YAML, `{name: dpo, beta: 0.1}`. Missing hyperparameters take the
    function's defaults. Calling it on a record returns the per-example losses, shape (B,).
    """

    def __init__(self, name: str, **params: Any) -> None:
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(loss_names())}")
        self.name = name
        self.spec = LOSSES[name]
        known = {h.name: h for h in self.spec.all_hyperparameters}
        unknown = sorted(set(params) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise ValueError(f"loss {name!r} has no hyperparameter {', '.join(unknown)}; its hyperparameters: {valid}")
        self.params = {k: h.validate(params.get(k, h.default), f"loss {name!r}, {k}") for k, h in known.items()}
        check = getattr(self.spec.fn, "check_params", None)
        if check is not None:  # cross-field checks and nested configs (composite losses)
            check(self.params, f"loss {name!r}")
        if self.spec.options:
            check_pair_options(self.spec.fn, self.params, f"loss {name!r}")

    @classmethod
    def from_value(cls, value: Any) -> LossConfig:
        """Build from a YAML/CLI value: a mapping with `name`, a bare name string, or a LossConfig."""
        if isinstance(value, LossConfig):
            return value
        if isinstance(value, str):
            import yaml  # a CLI value such as '{name: ipo, beta: 0.5}' or just 'ipo'

            parsed = yaml.safe_load(value)
            value = parsed if isinstance(parsed, Mapping) else {"name": value}
        if not isinstance(value, Mapping) or "name" not in value:
            raise ValueError(f"a loss is a mapping with a 'name' key (valid names: {', '.join(loss_names())}), got {value!r}")
        params = dict(value)
        return cls(params.pop("name"), **params)

    @classmethod
    def updated(cls, loss: Any, updates: Mapping[str, Any]) -> LossConfig:
        """`loss` (any `from_value` input, None for DPO's defaults) with some hyperparameters changed: what a dotted
        key such as `model.loss.beta` sets. A `name` that differs from the loss's starts from that loss's defaults
        (the old hyperparameters belong to another loss)."""
        base = cls.from_value(loss).to_dict() if loss is not None else {"name": "dpo"}
        name = updates.get("name")
        if name is not None and name != base["name"]:
            base = {"name": name}
        return cls.from_value({**base, **updates})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    @property
    def needs_reference(self) -> bool:
        return self.spec.needs_reference or bool(getattr(self.spec.fn, "needs_reference", lambda p: False)(self.params))

    @property
    def paired(self) -> bool:
        hook = getattr(self.spec.fn, "paired", None)
        return bool(hook(self.params)) if hook is not None else self.spec.paired

    @property
    def reads(self) -> frozenset[str]:
        """The record fields this loss reads, with these hyperparameters (the scorer must produce them, or a state)."""
        hook = getattr(self.spec.fn, "reads", None)
        if hook is not None:
            return frozenset(hook(self.params))
        fields = BASE_FIELDS[self.paired] | self.spec.reads
        if self.needs_reference:
            fields |= REFERENCE_FIELDS[self.paired]
        if self.spec.options:
            fields |= option_reads(self.params, self.needs_reference)
        return fields

    @property
    def reads_labels(self) -> bool:
        """Does it read which response of a pair is chosen (else only their scores)?"""
        return self.spec.labels

    @property
    def on_policy(self) -> bool:
        """Does it train on samples of the policy being trained only (a policy gradient)?"""
        return self.spec.on_policy

    @property
    def state(self) -> tuple[StateFactory, ...]:
        """Factories of the running state this loss keeps (`prefopt.losses.state`), each once."""
        hook = getattr(self.spec.fn, "state", None)
        return tuple(dict.fromkeys(hook(self.params) if hook is not None else self.spec.state))

    @property
    def reward_scale(self) -> float:
        """The factor (beta, usually) that turns a log-ratio into this loss's reward, for the shared metrics."""
        hook = getattr(self.spec.fn, "reward_scale", None)
        if hook is not None:
            return float(hook(self.params))
        return float(self.params[self.spec.reward_scale]) if self.spec.reward_scale else 1.0

    def __call__(self, lp: PairLogps | UnpairedLogps) -> Tensor:
        """Per-example losses, shape (B,); the generic options (if any) are applied around the loss function."""
        own = {h.name: self.params[h.name] for h in self.spec.hyperparameters}
        if not self.spec.options:
            return self.spec.fn(lp, **own)
        options = {h.name: self.params[h.name] for h in self.spec.options}
        return apply_pair_options(self.spec.fn, lp, own, **options)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LossConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"LossConfig({self.name!r}{', ' if args else ''}{args})"


def _register_jsonargparse_type() -> None:
    from jsonargparse.typing import register_type

    register_type(LossConfig, serializer=LossConfig.to_dict, deserializer=LossConfig.from_value)


_register_jsonargparse_type()
