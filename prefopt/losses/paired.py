"""Preference losses on (prompt, chosen, rejected) pairs that use a frozen reference.

Notation (shared/LOSSES.md): r_w = logp(y_w) - ref_logp(y_w), r_l likewise, h = r_w - r_l, L(z) = -log sigmoid(z).
Every function returns per-pair losses, shape (B,); the batch loss is their mean.
"""

from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.registry import Positive, Range, register
from prefopt.records import PairLogps

Epsilon = Annotated[float, Range(0.0, 0.5, high_inclusive=False)]


@register(
    "dpo",
    paper="Rafailov et al. 2023, arXiv 2305.18290, Eq. 7; label smoothing: Mitchell 2023, 'A note on DPO with noisy preferences' (cDPO)",
    formula="(1 - eps) L(beta h) + eps L(-beta h); eps = label_smoothing (0: plain DPO)",
    needs_reference=True,
    aliases=("cdpo",),
)
def dpo(lp: PairLogps, *, beta: Positive = 0.1, label_smoothing: Epsilon = 0.0) -> Tensor:
    """Direct Preference Optimization, with conservative (cDPO) label smoothing.

    With eps > 0 the labels are assumed flipped with probability eps; the optimum is then finite,
    beta h* = log((1 - eps) / eps). This is cDPO, not robust DPO (`robust`), which divides by (1 - 2 eps).
    """
    z = beta * lp.margins()  # (B,)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
