"""The generic options (LD-DPO, WPO) and DPO's f-divergences, by hand on the record of tests/test_losses.py.

    logp(y_w) = [-4, -6, -3]   ref_logp(y_w) = [-5, -5, -4]   |y_w| = [2, 3, 1]
    logp(y_l) = [-5, -5, -8]   ref_logp(y_l) = [-5, -6, -6]   |y_l| = [4, 2, 2]
    shared sums over the first [2, 2, 1] tokens: policy  y_w [-4, -4, -3], y_l [-2, -5, -5]
                                                 reference y_w [-5, -3.5, -4], y_l [-3, -6, -2]
"""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.losses import LossConfig
from prefopt.losses.options import ld_logps, wpo_weights
from test_losses import H, L, R_L, R_W, hand_pairs, t


def test_ld_dpo_by_hand() -> None:
    """ld_alpha = 0.5: logp' = shared + 0.5 (full - shared) on the longer response of each pair.

    pair 0 (y_l longer): y_l policy -2 + 0.5 (-5 + 2) = -3.5, ref -3 + 0.5 (-5 + 3) = -4 -> r_l = 0.5, h = 0.5
    pair 1 (y_w longer): y_w policy -4 + 0.5 (-6 + 4) = -5, ref -3.5 + 0.5 (-5 + 3.5) = -4.25 -> r_w = -0.75, h = -1.75
    pair 2 (y_l longer): y_l policy -5 + 0.5 (-8 + 5) = -6.5, ref -2 + 0.5 (-6 + 2) = -4 -> r_l = -2.5, h = 3.5
    """
    out = LossConfig("dpo", beta=1.0, ld_alpha=0.5)(hand_pairs())
    torch.testing.assert_close(out, t([L(0.5), L(-1.75), L(3.5)]))
    ld = ld_logps(hand_pairs(), 0.5)  # weighted token counts: min + 0.5 (|y| - min)
    torch.testing.assert_close(ld.chosen_lengths, t([2.0, 2.5, 1.0]))
    torch.testing.assert_close(ld.rejected_lengths, t([3.0, 2.0, 1.5]))


def test_ld_alpha_zero_on_an_averaging_loss_uses_the_shared_tokens_only() -> None:
    """SimPO with ld_alpha = 0: averages over the first [2, 2, 1] tokens of both responses.

    avg_w = [-4/2, -4/2, -3/1] = [-2, -2, -3], avg_l = [-2/2, -5/2, -5/1] = [-1, -2.5, -5]
    z = 2 (avg_w - avg_l) - 1 = [-3, 0, 3]
    """
    out = LossConfig("simpo", beta=2.0, gamma_beta_ratio=0.5, ld_alpha=0.0)(hand_pairs())
    torch.testing.assert_close(out, t([L(-3.0), L(0.0), L(3.0)]))


def test_ld_dpo_needs_the_shared_fields() -> None:
    lp = hand_pairs().replace(policy_chosen_shared_logps=None)
    with pytest.raises(ValueError, match="shared_logps"):
        LossConfig("dpo", ld_alpha=0.5)(lp)
    LossConfig("dpo", ld_alpha=1.0)(lp)  # plain: the fields are not needed


def test_wpo_by_hand() -> None:
    """w = exp(avg(y_w) + avg(y_l)) = exp([-2 - 1.25, -2 - 2.5, -3 - 4]) times the plain loss."""
    weights = [math.exp(-3.25), math.exp(-4.5), math.exp(-7.0)]
    torch.testing.assert_close(wpo_weights(hand_pairs()), t(weights))
    out = LossConfig("dpo", beta=0.1, wpo=True)(hand_pairs())
    torch.testing.assert_close(out, t([w * L(0.1 * h) for w, h in zip(weights, H)]))


def test_wpo_weights_are_detached() -> None:
    """The gradient of the weighted loss is the weight times the plain loss's gradient: none flows through w."""
    weighted, plain = hand_pairs(grad=True), hand_pairs(grad=True)
    LossConfig("ipo", beta=0.5, wpo=True)(weighted).sum().backward()
    LossConfig("ipo", beta=0.5)(plain).sum().backward()
    w = wpo_weights(hand_pairs())
    for field in ("policy_chosen_logps", "policy_rejected_logps"):
        torch.testing.assert_close(getattr(weighted, field).grad, w * getattr(plain, field).grad)


def test_f_divergences_by_hand() -> None:
    """f'(u) from r = log u: forward KL -exp(-r); JS r - log(1 + e^r); alpha (1 - exp(-a r)) / a."""
    lp = hand_pairs()

    def expected(f: callable) -> torch.Tensor:
        return t([L(f(w) - f(l)) for w, l in zip(R_W, R_L)])

    def forward_kl(r: float) -> float:
        return -math.exp(-r)

    def js(r: float) -> float:
        return math.log(2 * math.exp(r) / (1 + math.exp(r)))  # log(2u / (1 + u)); the log 2 cancels

    def alpha(r: float) -> float:
        return (1 - math.exp(-0.3 * r)) / 0.3

    torch.testing.assert_close(LossConfig("dpo", beta=1.0, f_divergence="forward_kl")(lp), expected(forward_kl))
    torch.testing.assert_close(LossConfig("dpo", beta=1.0, f_divergence="js")(lp), expected(js))
    torch.testing.assert_close(LossConfig("dpo", beta=1.0, f_divergence="alpha", f_alpha=0.3)(lp), expected(alpha))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_every_divergence_is_ln2_at_init_and_finite_far_away(divergence: str) -> None:
    lp = hand_pairs()
    at_init = lp.replace(ref_chosen_logps=lp.policy_chosen_logps, ref_rejected_logps=lp.policy_rejected_logps)
    out = LossConfig("dpo", f_divergence=divergence)(at_init)
    torch.testing.assert_close(out, torch.full_like(out, math.log(2)))
    far = lp.replace(policy_rejected_logps=lp.policy_rejected_logps - 1000.0,
                     policy_chosen_logps=lp.policy_chosen_logps - 2000.0)
    assert bool(torch.isfinite(LossConfig("dpo", f_divergence=divergence)(far)).all())


def test_options_compose_with_composite_terms() -> None:
    """Each term carries its own options; the composite applies none of its own."""
    lp = hand_pairs()
    terms = [{"name": "dpo", "beta": 1.0, "ld_alpha": 0.5}, {"name": "sft", "wpo": True}]
    composite = LossConfig("composite", terms=terms)
    expected = LossConfig("dpo", beta=1.0, ld_alpha=0.5)(lp) + LossConfig("sft", wpo=True)(lp)
    torch.testing.assert_close(composite(lp), expected)
