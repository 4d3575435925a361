"""The metrics every loss is measured by, on the same reference-based scale.

`pair_metrics` is a pure function of a `PairLogps` record (with reference log-probs): the DPO-style implicit
reward margin scaled by the loss's own beta, the raw log-ratio margin h in nats (comparable across beta and
losses), preference accuracy with a strict h > 0 (so it reads 0 at step 0, when the policy is the reference),
the mean chosen/rejected log-ratios, and the policy's mean chosen log-prob (falling chosen log-probs are
"likelihood displacement"). `MeanMetrics` accumulates them over an epoch with torchmetrics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from prefopt.records import PairLogps

PAIR_METRICS = (
    "reward_margin", "margin_nats", "accuracy", "chosen_logratio", "rejected_logratio",
    "chosen_logps", "rejected_logps", "chosen_logps_per_token",
)


def pair_metrics(lp: PairLogps, reward_scale: float) -> dict[str, Tensor]:
    """Batch means of the shared pair metrics; every value is a detached scalar."""
    with torch.no_grad():
        out = {
            "chosen_logps": lp.policy_chosen_logps.mean(),
            "rejected_logps": lp.policy_rejected_logps.mean(),
            "chosen_logps_per_token": (lp.policy_chosen_logps / lp.chosen_lengths).mean(),
        }
        if lp.has_reference:
            r_w, r_l = lp.chosen_logratios(), lp.rejected_logratios()  # (B,)
            h = r_w - r_l
            out |= {
                "reward_margin": reward_scale * h.mean(),
                "margin_nats": h.mean(),
                "accuracy": (h > 0).float().mean(),
                "chosen_logratio": r_w.mean(),
                "rejected_logratio": r_l.mean(),
            }
    return out


class MeanMetrics(nn.Module):
    """One torchmetrics `MeanMetric` per name, created on first use; `log` hands them to Lightning."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict({n: MeanMetric() for n in names})

    def update(self, values: dict[str, Tensor], weight: float | Tensor = 1.0) -> None:
        for name, value in values.items():
            self.metrics[name].update(value, weight)

    def items(self):
        return self.metrics.items()
