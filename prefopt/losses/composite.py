"""A weighted sum of registered losses, e.g. MPO = DPO + BCO + SFT.

`{name: composite, terms: [{name: dpo, weight: 0.8, beta: 0.1}, {name: bco, weight: 0.2, beta: 0.1},
{name: sft, weight: 1.0}]}`. Each term is a full loss config plus a `weight` (default 1), validated when the
composite is built (an unknown name or a bad value fails at config-parse time, naming the term), and run through
`LossConfig`, so each term's own generic options (ld_alpha, wpo) apply to that term only. Its metadata follows
its terms: it needs a reference if any term does, it is paired or unpaired as its terms are (all alike), it reads
the fields and keeps the state that its terms do, and its reward scale for the shared metrics is that of its first
term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from prefopt.losses.registry import LossConfig, register
from prefopt.records import PairLogps, UnpairedLogps


# MPO (Wang et al. 2024): preference (DPO) 0.8, quality (BCO) 0.2, generation (SFT) 1.0. Never mutated.
MPO_TERMS: list[dict[str, Any]] = [
    {"name": "dpo", "weight": 0.8, "beta": 0.1},
    {"name": "bco", "weight": 0.2, "beta": 0.1},
    {"name": "sft", "weight": 1.0},
]


def _split(term: Mapping[str, Any]) -> tuple[float, LossConfig]:
    params = dict(term)
    weight = params.pop("weight", 1.0)
    return weight, LossConfig.from_value(params)


@register(
    "composite",
    paper="a weighted sum of registered losses; MPO: Wang et al. 2024, 'Enhancing the Reasoning Ability of Multimodal "
    "LLMs via Mixed Preference Optimization', arXiv 2411.10442 (DPO + BCO + SFT)",
    formula="sum_k weight_k * loss_k",
    needs_reference=False,
    aggregation="per term",
    reward="that of its first term",
    reward_scale=None,
    options=False,
)
def composite(lp: PairLogps | UnpairedLogps, *, terms: list[dict[str, Any]] = MPO_TERMS) -> Tensor:  # noqa: B006
    """Weighted sum of per-example losses of its terms, shape (B,).

    terms: a list of loss configs, each with an optional `weight` (>= 0, default 1); at least one. The default
    is MPO's mix (its paper's weights 0.8 / 0.2 / 1), so `{name: composite}` alone is MPO.
    """
    total: Tensor | float = 0.0
    for term in terms:
        weight, config = _split(term)
        total = total + weight * config(lp)
    assert isinstance(total, Tensor)
    return total


def _check_params(params: dict[str, Any], where: str) -> None:
    """Validate every term recursively and store them normalized: {name, weight, every hyperparameter}."""
    terms = params["terms"]
    if not terms:
        raise ValueError(f"{where}: terms needs at least one entry such as {{name: dpo, weight: 1.0, beta: 0.1}}")
    normalized = []
    for i, term in enumerate(terms):
        if isinstance(term, LossConfig):
            term = term.to_dict()
        if not isinstance(term, Mapping) or "name" not in term:
            raise ValueError(f"{where}, terms[{i}]: expected a mapping with a 'name' key, got {term!r}")
        weight = term.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}, terms[{i}]: weight must be a finite number >= 0, got {weight!r}")
        try:
            _, config = _split(term)
        except ValueError as err:
            raise ValueError(f"{where}, terms[{i}]: {err}") from None
        normalized.append({"name": config.name, "weight": float(weight), **config.params})
    kinds = {_split(t)[1].paired for t in normalized}
    if len(kinds) > 1:
        raise ValueError(f"{where}: terms mix paired and unpaired losses; a batch holds one kind of record")
    params["terms"] = normalized


def _configs(params: dict[str, Any]) -> list[LossConfig]:
    return [_split(t)[1] for t in params["terms"]]


composite.check_params = _check_params  # type: ignore[attr-defined]
composite.needs_reference = lambda params: any(c.needs_reference for c in _configs(params))  # type: ignore
composite.paired = lambda params: _configs(params)[0].paired  # type: ignore[attr-defined]
composite.reward_scale = lambda params: _configs(params)[0].reward_scale  # type: ignore[attr-defined]
composite.reads = lambda params: frozenset().union(*(c.reads for c in _configs(params)))  # type: ignore
composite.state = lambda params: tuple(s for c in _configs(params) for s in c.state)  # type: ignore
