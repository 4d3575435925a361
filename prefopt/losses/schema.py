"""The hyperparameter schema of a loss: read from its keyword-only signature, with types and valid ranges.

A loss function's keyword-only parameters are its hyperparameters; each is typed, its valid range an
`Annotated[float, Range(...)]` (or a `Literal[...]` for closed choices). `Hyperparameter.validate` checks one value
against it when a config is parsed, so that a bad value fails before any model loads.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal


@dataclass(frozen=True)
class Range:
    """Valid range of a numeric hyperparameter: low < x (or <=) and x < high (or <=); None is unbounded."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def contains(self, x: float) -> bool:
        if self.low is not None and (x < self.low or (x == self.low and not self.low_inclusive)):
            return False
        if self.high is not None and (x > self.high or (x == self.high and not self.high_inclusive)):
            return False
        return True

    def __str__(self) -> str:
        lo = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + ("]" if self.high_inclusive else ")")
        return f"{lo}, {hi}"


# Shorthands for the common ranges.
Positive = Annotated[float, Range(0.0, None, low_inclusive=False)]
NonNegative = Annotated[float, Range(0.0, None)]
UnitInterval = Annotated[float, Range(0.0, 1.0)]


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    type: Any  # the base type: float, int, bool, str, list, ...
    default: Any
    range: Range | None = None
    choices: tuple[Any, ...] | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {', '.join(map(repr, self.choices))}"
        if self.range is not None:
            return f"{getattr(self.type, '__name__', self.type)} in {self.range}"
        return getattr(self.type, "__name__", str(self.type))

    def validate(self, value: Any, where: str) -> Any:
        """Return `value` coerced to this hyperparameter's type, or raise ValueError naming `where`."""
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, self.choices))}")
            return value
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected true or false, got {value!r}")
            return value
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: expected a number, got {value!r}")
            if self.type is int and not float(value).is_integer():
                raise ValueError(f"{where}: expected an integer, got {value!r}")
            value = self.type(value)
            if not math.isfinite(value) or (self.range is not None and not self.range.contains(value)):
                raise ValueError(f"{where}: {value!r} is outside the valid range {self.range}")
            return value
        if self.type is list and not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return value


def hyperparameters(fn: Callable) -> tuple[Hyperparameter, ...]:
    """Read the keyword-only parameters of `fn` (with their annotations) as hyperparameters."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"hyperparameter {fn.__name__}.{p.name} needs a default")
        hint, rng, choices = hints[p.name], None, None
        if typing.get_origin(hint) is Annotated:
            hint, *extras = typing.get_args(hint)
            rng = next((e for e in extras if isinstance(e, Range)), None)
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            hint = type(choices[0])
        base = typing.get_origin(hint) or hint
        if base is types.UnionType or base is typing.Union:
            base = object
        out.append(Hyperparameter(p.name, base, p.default, rng, choices))
    return tuple(out)
