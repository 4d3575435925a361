"""The records the loss tests evaluate every loss on: the hand-worked record and the record at initialization.

The hand-worked record (3 pairs) is

    logp(y_w) = [-4, -6, -3]   ref_logp(y_w) = [-5, -5, -4]   |y_w| = [2, 3, 1]
    logp(y_l) = [-5, -5, -8]   ref_logp(y_l) = [-5, -6, -6]   |y_l| = [4, 2, 2]

so r_w = [1, -1, 1], r_l = [0, 1, -2], h = r_w - r_l = [1, -2, 3], logp_w - logp_l = [1, -1, 5],
avg(y_w) = [-2, -2, -3], avg(y_l) = [-1.25, -2.5, -4], per-token log-ratios r_w/|y_w| = [0.5, -1/3, 1] and
r_l/|y_l| = [0, 0.5, -1]. The running mean of log-ratios is 0.5. The sequential KLs (TDPO) are D_w = [0.2, 0.5, 0.1]
and D_l = [0.6, 0.3, 0.4], so D_l - D_w = [0.4, -0.2, 0.3]. The responses' scores are s_w = [2, 1, 0.5] and
s_l = [1, 1, 1.5]: score gaps D = [1, 0, -1] (a clear pair, a tie, and a pair whose label contradicts its scores).

At initialization the policy is the reference and every token has log-prob -1 (logp = -|y|, avg = -1); the score
gaps are S_GAP0 = [1, 1, 2] (clear pairs, labelled as their scores say).
Each loss family's test module contributes its own HAND and INIT entries (name -> (hyperparameters, values)):
tests/test_losses.py checks every registered name against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from prefopt.records import PairLogps, UnpairedLogps

LN2 = math.log(2)
PW, PL, RW, RL = [-4.0, -6.0, -3.0], [-5.0, -5.0, -8.0], [-5.0, -5.0, -4.0], [-5.0, -6.0, -6.0]
LW, LL = [2.0, 3.0, 1.0], [4.0, 2.0, 2.0]
R_W = [p - r for p, r in zip(PW, RW)]  # [1, -1, 1]
R_L = [p - r for p, r in zip(PL, RL)]  # [0, 1, -2]
H = [w - l for w, l in zip(R_W, R_L)]  # [1, -2, 3]
AVG_W = [p / n for p, n in zip(PW, LW)]  # [-2, -2, -3]
AVG_L = [p / n for p, n in zip(PL, LL)]  # [-1.25, -2.5, -4]
D_W, D_L = [0.2, 0.5, 0.1], [0.6, 0.3, 0.4]
S_W, S_L = [2.0, 1.0, 0.5], [1.0, 1.0, 1.5]
S_GAP = [w - l for w, l in zip(S_W, S_L)]  # [1, 0, -1]
D_GAP = [dl - dw for dw, dl in zip(D_W, D_L)]  # [0.4, -0.2, 0.3]
H_AVG = [rw / nw - rl / nl for rw, rl, nw, nl in zip(R_W, R_L, LW, LL)]  # [0.5, -5/6, 2]
MPO = {"terms": [{"name": "dpo", "weight": 0.8, "beta": 0.1}, {"name": "bco", "weight": 0.2, "beta": 0.1},
                 {"name": "sft", "weight": 1.0}]}


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def L(z: float) -> float:  # -log sigmoid(z)
    return math.log1p(math.exp(-z))


def t(xs: list[float], grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def t2(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


# Two further responses per pair (B, 2): logp, ref_logp, lengths and scores; log-ratios [[1, 0], [-1, 1], [0, 2]].
PX, RX = [[-3.0, -5.0], [-7.0, -2.0], [-4.0, -4.0]], [[-4.0, -5.0], [-6.0, -3.0], [-4.0, -6.0]]
LX, SX = [[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]], [[3.0, 0.0], [1.0, 2.0], [0.5, 0.5]]
PX0, SX0 = [[-2.0, -3.0], [-1.0, -4.0], [-5.0, -2.0]], [[0.0, 0.0], [0.0, 0.0], [-2.0, -2.0]]


def hand_pairs(grad: bool = False) -> PairLogps:
    """The record above; shared sums cover the first min(|y_w|, |y_l|) = [2, 2, 1] tokens."""
    return PairLogps(
        policy_chosen_logps=t(PW, grad), policy_rejected_logps=t(PL, grad),
        chosen_lengths=t(LW), rejected_lengths=t(LL),
        ref_chosen_logps=t(RW), ref_rejected_logps=t(RL),
        policy_chosen_shared_logps=t([-4.0, -4.0, -3.0]), policy_rejected_shared_logps=t([-2.0, -5.0, -5.0]),
        ref_chosen_shared_logps=t([-5.0, -3.5, -4.0]), ref_rejected_shared_logps=t([-3.0, -6.0, -2.0]),
        chosen_seq_kl=t(D_W), rejected_seq_kl=t(D_L),
        running_logratio_mean=torch.tensor(0.5, dtype=torch.float64),
        margin_ema_mean=torch.tensor(0.5, dtype=torch.float64),  # beta-DPO's running mean of the margins
        chosen_scores=t(S_W), rejected_scores=t(S_L),
        # SamPO's down-sampled sums, WPO's aligned sums and ORPO's prompt terms (tests/cases_token_level2.py explains them)
        policy_chosen_sampled_logps=t([-4.0, -4.5, -3.0], grad), policy_rejected_sampled_logps=t([-2.5, -5.0, -5.0], grad),
        ref_chosen_sampled_logps=t([-5.0, -3.0, -4.0]), ref_rejected_sampled_logps=t([-3.0, -6.0, -2.0]),
        policy_chosen_aligned_logps=t([-1.0, -0.6, 0.5]), policy_rejected_aligned_logps=t([-2.0, 0.2, 0.3]),
        policy_prompt_logps=t([-3.0, -2.0, -4.0], grad), prompt_lengths=t([2.0, 2.0, 3.0]),
        # two further responses per pair (tests/cases_extras.py explains them)
        policy_extra_logps=t2(PX, grad), ref_extra_logps=t2(RX), extra_lengths=t2(LX), extra_scores=t2(SX),
    )


def hand_rows(grad: bool = False) -> UnpairedLogps:
    """r = [1, -1, 1], desirable = [yes, no, yes]; mismatched rows' r = [0.6, 0.3, 0.6], so z0 = 0.5."""
    return UnpairedLogps(
        policy_logps=t(PW, grad), lengths=t(LW), desirable=torch.tensor([True, False, True]), ref_logps=t(RW),
        policy_kl_logps=t([-7.0, -8.0, -6.0], grad), ref_kl_logps=t([-7.6, -8.3, -6.6]),
    )


LW0, LL0 = [4.0, 5.0, 6.0], [3.0, 2.0, 4.0]  # every token has log-prob -1: logp = -|y|, avg = -1
S_W0, S_L0 = [1.5, 2.0, 1.0], [0.5, 1.0, -1.0]
S_GAP0 = [w - l for w, l in zip(S_W0, S_L0)]  # [1, 1, 2]


def init_pairs(grad: bool = False) -> PairLogps:
    pw, pl = [-n for n in LW0], [-n for n in LL0]
    shared = [-min(a, b) for a, b in zip(LW0, LL0)]
    return PairLogps(
        policy_chosen_logps=t(pw, grad), policy_rejected_logps=t(pl, grad),
        chosen_lengths=t(LW0), rejected_lengths=t(LL0),
        ref_chosen_logps=t(pw), ref_rejected_logps=t(pl),
        policy_chosen_shared_logps=t(shared), policy_rejected_shared_logps=t(shared),
        ref_chosen_shared_logps=t(shared), ref_rejected_shared_logps=t(shared),
        chosen_seq_kl=t([0.0] * 3), rejected_seq_kl=t([0.0] * 3),  # the policy is the reference: no KL
        running_logratio_mean=torch.tensor(0.0, dtype=torch.float64),
        margin_ema_mean=torch.tensor(0.0, dtype=torch.float64),
        chosen_scores=t(S_W0), rejected_scores=t(S_L0),
        policy_chosen_sampled_logps=t(shared, grad), policy_rejected_sampled_logps=t(shared, grad),
        ref_chosen_sampled_logps=t(shared), ref_rejected_sampled_logps=t(shared),
        policy_chosen_aligned_logps=t([-0.5 * n for n in LW0]), policy_rejected_aligned_logps=t([-0.5 * n for n in LL0]),
        policy_prompt_logps=t([-2.0] * 3, grad), prompt_lengths=t([2.0] * 3),
        policy_extra_logps=t2(PX0, grad), ref_extra_logps=t2(PX0), extra_lengths=t2([[-x for x in r] for r in PX0]),
        extra_scores=t2(SX0),
    )


def init_rows(grad: bool = False) -> UnpairedLogps:
    logps = [-n for n in LW0]
    return UnpairedLogps(
        policy_logps=t(logps, grad), lengths=t(LW0), desirable=torch.tensor([True, False, True]), ref_logps=t(logps),
        policy_kl_logps=t([-3.0, -7.0, -2.0]), ref_kl_logps=t([-3.0, -7.0, -2.0]),
    )


def _const(value: float) -> Callable[[], list[float]]:
    return lambda: [value] * 3


