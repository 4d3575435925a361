"""Hand-worked values and values at initialization of the losses that read per-token fields beyond the sums
(prefopt/losses/token_level.py: sampo; the options wpo: aligned and orpo's nll: prompt_and_completion are checked in
tests/test_losses_token_level2.py).

The records of tests/loss_records.py with these fields (`HAND_FIELDS`, `INIT_FIELDS`; `hand_record()` and
`init_record()` build them). On the hand record, |y_w| = [2, 3, 1], |y_l| = [4, 2, 2], so SamPO keeps
min = [2, 2, 1] tokens per response: all of the shorter one (its sampled sums are its full sums) and a subset of the
longer one:

    sampled logp(y_w) = [-4, -4.5, -3]   sampled ref_logp(y_w) = [-5, -3, -4]    -> r~_w = [1, -1.5, 1]
    sampled logp(y_l) = [-2.5, -5, -5]   sampled ref_logp(y_l) = [-3, -6, -2]    -> r~_l = [0.5, 1, -3]

so h~ = r~_w - r~_l = [0.5, -2.5, 4]. WPO's aligned sums (log p(y_t) - log sum_v p(v)^2 over the completion) are
[-1, -0.6, 0.5] (y_w) and [-2, 0.2, 0.3] (y_l): aligned averages [-0.5, -0.2, 0.5] and [-0.5, 0.1, 0.15]. The
prompt's summed log-probs are [-3, -2, -4] over |x| - 1 = [2, 2, 3] predicted tokens.

At initialization (every token -1, |y_w| = [4, 5, 6], |y_l| = [3, 2, 4]) the sampled sums are -min = [-3, -2, -4] for
both responses and both models; each aligned token is -0.5; the prompts have 2 predicted tokens of log-prob -1.
"""

from __future__ import annotations

from loss_records import LL0, LN2, LW0, L, hand_pairs, init_pairs, t

from prefopt.records import PairLogps

PWS, RWS, PLS, RLS = [-4.0, -4.5, -3.0], [-5.0, -3.0, -4.0], [-2.5, -5.0, -5.0], [-3.0, -6.0, -2.0]
H_SAMPLED = [(pw - rw) - (pl - rl) for pw, rw, pl, rl in zip(PWS, RWS, PLS, RLS)]  # [0.5, -2.5, 4]
ALIGNED_W, ALIGNED_L = [-1.0, -0.6, 0.5], [-2.0, 0.2, 0.3]
PROMPT, PROMPT_LENGTHS = [-3.0, -2.0, -4.0], [2.0, 2.0, 3.0]

HAND_FIELDS = {
    "policy_chosen_sampled_logps": PWS, "policy_rejected_sampled_logps": PLS,
    "ref_chosen_sampled_logps": RWS, "ref_rejected_sampled_logps": RLS,
    "policy_chosen_aligned_logps": ALIGNED_W, "policy_rejected_aligned_logps": ALIGNED_L,
    "policy_prompt_logps": PROMPT, "prompt_lengths": PROMPT_LENGTHS,
}
_MIN0 = [-min(a, b) for a, b in zip(LW0, LL0)]  # [-3, -2, -4]
INIT_FIELDS = {
    "policy_chosen_sampled_logps": _MIN0, "policy_rejected_sampled_logps": _MIN0,
    "ref_chosen_sampled_logps": _MIN0, "ref_rejected_sampled_logps": _MIN0,
    "policy_chosen_aligned_logps": [-0.5 * n for n in LW0], "policy_rejected_aligned_logps": [-0.5 * n for n in LL0],
    "policy_prompt_logps": [-2.0] * 3, "prompt_lengths": [2.0] * 3,
}
GRAD_FIELDS = ("policy_chosen_sampled_logps", "policy_rejected_sampled_logps", "policy_prompt_logps")


def _with(record: PairLogps, fields: dict[str, list[float]], grad: bool) -> PairLogps:
    return record.replace(**{k: t(v, grad and k in GRAD_FIELDS) for k, v in fields.items()})


def hand_record(grad: bool = False) -> PairLogps:
    """tests/loss_records.py's hand record with the fields above (grad: on the full sums and GRAD_FIELDS)."""
    return _with(hand_pairs(grad), HAND_FIELDS, grad)


def init_record(grad: bool = False) -> PairLogps:
    return _with(init_pairs(grad), INIT_FIELDS, grad)


HAND = {
    "sampo": ({"beta": 0.5}, [L(0.5 * h) for h in H_SAMPLED]),  # L(0.25), L(-1.25), L(2)
}

INIT = {
    "sampo": ({}, lambda: [LN2] * 3),  # the same tokens for policy and reference: h~ = 0
}

# tests/test_losses.py differentiates with respect to the full sums; SamPO reads the sampled ones, whose signs
# tests/test_losses_token_level2.py checks (d/d sampled logp(y_w) < 0 < d/d sampled logp(y_l)).
CHOSEN_SIGN_EXEMPT = {"sampo": "reads the down-sampled sums, not the full ones: signs checked on the sampled fields"}
REJECTED_SIGN_EXEMPT = dict(CHOSEN_SIGN_EXEMPT)
