"""Unpaired rows made from preference pairs, for the losses that train on (prompt, completion, desirable?) rows.

By default each pair gives two rows: its chosen response as desirable and its rejected one as undesirable. The
scenario of unpaired and imbalanced labels (experiments/scenarios/unpaired.yaml; KTO's claim, arXiv 2402.01306) thins
them (`Unpairing`, `data.unpairing`): keep a seeded fraction of the desirable rows and of the undesirable rows (ratios
1:4, 4:1, 1:10 ...), or break the pairs (`unrelated`: each pair gives one row, its chosen or its rejected response by
a seeded coin, so no desirable row has its pair's undesirable row beside it). Exact counts: round(fraction x rows).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Unpairing:
    """Which rows the pairs give an unpaired loss (all off: two rows per pair).

    Args:
        desirable: the fraction of the desirable (chosen) rows kept, in (0, 1].
        undesirable: the fraction of the undesirable (rejected) rows kept, in (0, 1].
        unrelated: each pair gives one row, chosen or rejected by a seeded coin (before the fractions apply).
    """

    desirable: float = 1.0
    undesirable: float = 1.0
    unrelated: bool = False

    def __post_init__(self) -> None:
        for name in ("desirable", "undesirable"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"data.unpairing.{name} must be in (0, 1], got {getattr(self, name)}")


def unpaired_rows(examples: list[dict[str, Any]], unpairing: Unpairing | None, seed: int) -> list[dict[str, Any]]:
    """The unpaired rows of paired examples, in pair order (the sampler shuffles them), as `unpairing` says."""
    unpairing = unpairing or Unpairing()
    rng = random.Random(f"unpairing:{seed}")
    rows: list[dict[str, Any]] = []
    for e in examples:
        sides = [(e["chosen_ids"], True), (e["rejected_ids"], False)]
        if unpairing.unrelated:
            sides = [sides[rng.random() < 0.5]]
        rows += [{"prompt_ids": e["prompt_ids"], "completion_ids": ids, "desirable": d} for ids, d in sides]
    kept = []
    for label, fraction in ((True, unpairing.desirable), (False, unpairing.undesirable)):
        index = [i for i, r in enumerate(rows) if r["desirable"] == label]
        kept += rng.sample(index, round(fraction * len(index))) if fraction < 1 else index
    return [rows[i] for i in sorted(kept)]


def prompt_coin(prompt_ids: list[int], seed: int) -> float:
    """A seeded uniform draw in [0, 1) per prompt: holding out draws below a fraction keeps a prompt's rows together."""
    digest = hashlib.sha256(f"{seed}:{prompt_ids}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def regroup_pairs(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Validation pairs from unpaired rows: per prompt, the i-th desirable with the i-th undesirable row."""
    groups: dict[tuple[int, ...], tuple[list, list]] = {}
    for r in rows:
        groups.setdefault(tuple(r["prompt_ids"]), ([], []))[0 if r["desirable"] else 1].append(r["completion_ids"])
    pairs = [{"prompt_ids": list(p), "chosen_ids": c, "rejected_ids": r}
             for p, (good, bad) in groups.items() for c, r in zip(good, bad) if c != r]
    log.info("%s: %d validation pairs regrouped from %d unpaired rows", name, len(pairs), len(rows))
    return pairs
