"""Arithmetic of the losses and options that read per-token fields beyond the sums: SamPO, WPO's aligned weight and
ORPO's NLL over prompt and completion, on the records of tests/cases_token_level2.py (values written out there).

Expected values are computed with plain Python math from the papers' and the authors' formulas."""

from __future__ import annotations

import math

import pytest
import torch
from cases_token_level2 import (
    ALIGNED_L, ALIGNED_W, HAND, INIT, PROMPT, PROMPT_LENGTHS, hand_record, init_record,
)
from loss_records import AVG_L, AVG_W, H, LL, LW, PW, L, sig, t

from prefopt.losses import LossConfig
from prefopt.losses.options import wpo_weights


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_worked_values(name: str) -> None:
    params, expected = HAND[name]
    torch.testing.assert_close(LossConfig(name, **params)(hand_record()), t(expected), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(INIT))
def test_values_at_initialization(name: str) -> None:
    params, expected = INIT[name]
    torch.testing.assert_close(LossConfig(name, **params)(init_record()), t(expected()), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- SamPO
def test_sampo_gradient_signs_and_size_on_the_sampled_fields() -> None:
    """d/d sampled logp(y_w) = -beta sigmoid(-beta h~) < 0 and the opposite for y_l; the full sums get nothing."""
    for lp in (init_record(grad=True), hand_record(grad=True)):
        loss = LossConfig("sampo", beta=0.5)(lp)
        loss.sum().backward()
        z = 0.5 * ((lp.policy_chosen_sampled_logps - lp.ref_chosen_sampled_logps)
                   - (lp.policy_rejected_sampled_logps - lp.ref_rejected_sampled_logps)).detach()
        torch.testing.assert_close(lp.policy_chosen_sampled_logps.grad, -0.5 * torch.sigmoid(-z))
        torch.testing.assert_close(lp.policy_rejected_sampled_logps.grad, 0.5 * torch.sigmoid(-z))
        assert lp.policy_chosen_logps.grad is None and lp.policy_rejected_logps.grad is None


def test_sampo_is_dpo_when_the_responses_are_equally_long() -> None:
    """Equal lengths: the down-sample keeps every token, the sampled sums are the full sums, and SamPO is DPO."""
    lp = hand_record()
    full = lp.replace(policy_chosen_sampled_logps=lp.policy_chosen_logps,
                      policy_rejected_sampled_logps=lp.policy_rejected_logps,
                      ref_chosen_sampled_logps=lp.ref_chosen_logps, ref_rejected_sampled_logps=lp.ref_rejected_logps)
    torch.testing.assert_close(LossConfig("sampo", beta=0.3)(full), LossConfig("dpo", beta=0.3)(full), rtol=0, atol=0)


def test_sampo_refuses_ld_alpha_and_a_record_without_its_fields() -> None:
    with pytest.raises(ValueError, match="loss 'sampo': ld_alpha .* leave ld_alpha at 1"):
        LossConfig("sampo", ld_alpha=0.5)
    with pytest.raises(ValueError, match="sampled_logps"):
        LossConfig("sampo")(hand_record().replace(ref_rejected_sampled_logps=None))
    with pytest.raises(ValueError, match="beta"):
        LossConfig("sampo", beta=0.0)
    # WPO weights SamPO's pairs like any paired loss's
    weighted = LossConfig("sampo", beta=0.5, wpo="v1")(hand_record())
    torch.testing.assert_close(weighted, wpo_weights(hand_record()) * LossConfig("sampo", beta=0.5)(hand_record()))


# ---------------------------------------------------------------- WPO, sampling-aligned
def test_aligned_wpo_by_hand() -> None:
    """w = min(1, exp(aligned_w/|y_w| + aligned_l/|y_l|)) = [exp(-1), exp(-0.1), min(1, exp(0.65)) = 1]."""
    avg = [w / nw + l / nl for w, l, nw, nl in zip(ALIGNED_W, ALIGNED_L, LW, LL)]
    assert avg == pytest.approx([-1.0, -0.1, 0.65])
    weights = [min(1.0, math.exp(a)) for a in avg]
    torch.testing.assert_close(wpo_weights(hand_record(), "aligned"), t(weights))
    out = LossConfig("dpo", beta=0.1, wpo="aligned")(hand_record())
    torch.testing.assert_close(out, t([w * L(0.1 * h) for w, h in zip(weights, H)]))
    # v1 (and true, its old spelling) reads the plain averages: exp(avg_w + avg_l)
    v1 = [math.exp(w + v) for w, v in zip(AVG_W, AVG_L)]
    for mode in ("v1", True):
        torch.testing.assert_close(LossConfig("dpo", beta=0.1, wpo=mode)(hand_record()),
                                   t([w * L(0.1 * h) for w, h in zip(v1, H)]))


def test_aligned_wpo_weights_are_detached_and_read_only_when_chosen() -> None:
    lp = hand_record(grad=True).replace(policy_chosen_aligned_logps=t(ALIGNED_W, grad=True))
    plain = hand_record(grad=True)
    LossConfig("ipo", beta=0.5, wpo="aligned")(lp).sum().backward()
    LossConfig("ipo", beta=0.5)(plain).sum().backward()
    assert lp.policy_chosen_aligned_logps.grad is None
    w = wpo_weights(hand_record(), "aligned")
    torch.testing.assert_close(lp.policy_chosen_logps.grad, w * plain.policy_chosen_logps.grad)
    aligned = {"policy_chosen_aligned_logps", "policy_rejected_aligned_logps"}
    assert aligned <= LossConfig("dpo", wpo="aligned").reads
    assert not aligned & (LossConfig("dpo", wpo="v1").reads | LossConfig("dpo").reads)
    with pytest.raises(ValueError, match="aligned_logps"):
        LossConfig("dpo", wpo="aligned")(hand_record().replace(policy_rejected_aligned_logps=None))


@pytest.mark.parametrize("bad", [1, 0, 1.0, "v2", None])
def test_wpo_takes_its_choices_only(bad) -> None:
    with pytest.raises(ValueError, match="loss 'dpo'"):
        LossConfig("dpo", wpo=bad)


def test_wpo_round_trips_each_choice() -> None:
    for mode in (False, True, "v1", "aligned"):
        config = LossConfig("simpo", wpo=mode)
        assert LossConfig.from_value(config.to_dict()) == config
    with pytest.raises(ValueError, match="sorts the batch"):
        LossConfig("aot", wpo="aligned")


# ---------------------------------------------------------------- ORPO's NLL over prompt and completion
def test_orpo_prompt_and_completion_nll_by_hand() -> None:
    """The NLL is one token mean over the batch's chosen sequences: per pair -(logp(x) + logp(y_w)) * B / T with
    T = sum(|x| - 1) + sum|y_w| = 7 + 6 = 13: [7, 8, 7] * 3/13, whose mean is 22/13, the batch's mean NLL."""
    nll = [-(p + w) * 3 / 13 for p, w in zip(PROMPT, PW)]
    assert sum(nll) / 3 == pytest.approx(22 / 13) and sum(PROMPT_LENGTHS) + sum(LW) == 13

    def odds(a: float) -> float:
        return a - math.log(1 - math.exp(a))

    ratio = [math.log(sig(odds(w) - odds(v))) for w, v in zip(AVG_W, AVG_L)]
    got = LossConfig("orpo", lam=0.1, nll="prompt_and_completion")(hand_record())
    torch.testing.assert_close(got, t([n - 0.1 * r for n, r in zip(nll, ratio)]))
    paper = LossConfig("orpo", lam=0.1)(hand_record())  # the completion's per-pair mean, [2, 2, 3]
    torch.testing.assert_close(paper, t([-w - 0.1 * r for w, r in zip(AVG_W, ratio)]))


def test_orpo_prompt_nll_gradients_and_fields() -> None:
    """d/d logp(x) = d/d logp(y_w)'s NLL part = -B / T for every pair: the prompt is trained like the completion."""
    lp = hand_record(grad=True)
    LossConfig("orpo", lam=0.0, nll="prompt_and_completion")(lp).sum().backward()
    torch.testing.assert_close(lp.policy_prompt_logps.grad, t([-3 / 13] * 3))
    torch.testing.assert_close(lp.policy_chosen_logps.grad, t([-3 / 13] * 3))
    assert lp.policy_rejected_logps.grad is None or bool((lp.policy_rejected_logps.grad == 0).all())
    init = init_record(grad=True)
    LossConfig("orpo", nll="prompt_and_completion")(init).sum().backward()
    assert bool((init.policy_chosen_logps.grad < 0).all()) and bool((init.policy_rejected_logps.grad > 0).all())
    prompt = {"policy_prompt_logps", "prompt_lengths"}
    assert prompt <= LossConfig("orpo", nll="prompt_and_completion").reads
    assert not prompt & LossConfig("orpo").reads
    assert not LossConfig("orpo", nll="prompt_and_completion").needs_reference
    with pytest.raises(ValueError, match="prompt_logps"):
        LossConfig("orpo", nll="prompt_and_completion")(hand_record().replace(policy_prompt_logps=None))
    with pytest.raises(ValueError, match="loss 'orpo'"):
        LossConfig("orpo", nll="prompt")


def test_orpo_value_at_initialization_with_the_prompt() -> None:
    """Every token -1: the batch-mean NLL is 1 whatever is counted, and the odds term is lambda ln 2."""
    out = LossConfig("orpo", lam=0.1, nll="prompt_and_completion")(init_record())
    total = sum(2.0 + n for n in [4.0, 5.0, 6.0])  # prompt 2 + |y_w| predicted tokens per pair
    torch.testing.assert_close(out.mean(), torch.tensor(1.0 + 0.1 * math.log(2), dtype=torch.float64))
    torch.testing.assert_close(out, t([(2 + n) * 3 / total + 0.1 * math.log(2) for n in [4.0, 5.0, 6.0]]))
