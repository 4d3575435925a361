"""prefopt: compare preference-optimization losses for causal language models, fairly and with evidence."""

from prefopt.losses import LOSSES, LossConfig
from prefopt.records import PairLogps, UnpairedLogps

__all__ = ["LOSSES", "LossConfig", "PairLogps", "UnpairedLogps"]
