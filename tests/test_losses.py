"""Loss arithmetic: hand-worked values, values at initialization, identities, gradient signs, config errors.

Every expected value is computed on plain Python floats with `math`, from the formula in the loss's paper,
independently of the implementation, on the records of tests/loss_records.py (the hand-worked record is written out
there). The losses added after the first 27 keep their cases beside their own tests (`FAMILIES` below); every
registered name must have a hand-worked value, a value at initialization and gradient signs.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from loss_records import (  # noqa: F401
    AVG_L, AVG_W, D_GAP, H, H_AVG, L, LL, LN2, LW, LW0, LL0, MPO, PL, PW, R_L, R_W, RL, RW, _const, hand_pairs,
    hand_rows, init_pairs, init_rows, sig, t,
)

from prefopt.losses import LOSSES, LossConfig, loss_names
from prefopt.records import PairLogps, UnpairedLogps

# tests/cases_<family>.py: the HAND and INIT cases of each later loss family.
CASE_MODULES = sorted(p.stem for p in Path(__file__).parent.glob("cases_*.py"))


def _exo(z: float, eps: float) -> float:
    return sig(z) * (math.log(sig(z)) - math.log(1 - eps)) + sig(-z) * (math.log(sig(-z)) - math.log(eps))


def _log_odds(a: float) -> float:
    return a - math.log(1 - math.exp(a))


# name -> (hyperparameters, expected per-example losses on the hand-worked record)
HAND: dict[str, tuple[dict, list[float]]] = {
    "dpo": ({"beta": 0.1}, [L(0.1 * h) for h in H]),  # L(0.1) = 0.6444, L(-0.2) = 0.7981, L(0.3) = 0.5544
    "cdpo": ({"beta": 0.5, "label_smoothing": 0.2}, [0.8 * L(0.5 * h) + 0.2 * L(-0.5 * h) for h in H]),
    "robust": ({"beta": 0.5, "label_smoothing": 0.2}, [(0.8 * L(0.5 * h) - 0.2 * L(-0.5 * h)) / 0.6 for h in H]),
    "ipo": ({"beta": 0.5}, [0.0, 9.0, 4.0]),  # (h - 1/(2 * 0.5))^2 = (h - 1)^2
    "hinge": ({"beta": 0.5}, [0.5, 2.0, 0.0]),  # max(0, 1 - h/2)
    "rso": ({"beta": 0.5}, [0.5, 2.0, 0.0]),
    "dpo_norm": ({"beta": 1.0}, [L(h) for h in H_AVG]),
    # |y_w| - |y_l| = [-2, 1, -1]; the paper adds alpha * that to beta h
    "rdpo": ({"beta": 0.1, "alpha": 0.05}, [L(0.1 * h + 0.05 * (nw - nl)) for h, nw, nl in zip(H, LW, LL)]),
    # penalty max(0, -r_w) = [0, 1, 0]: margins h - 2 * penalty = [1, -4, 3]
    "dpop": ({"beta": 0.1, "lam": 2.0}, [L(0.1), L(-0.4), L(0.3)]),
    # NLL(y_w)/|y_w| = [2, 2, 3]
    "rpo": ({"beta": 0.1, "alpha": 1.0}, [L(0.1 * h) + nll for h, nll in zip(H, [2.0, 2.0, 3.0])]),
    "nca": ({"beta": 1.0}, [L(w) + 0.5 * L(-w) + 0.5 * L(-l) for w, l in zip(R_W, R_L)]),
    "exo": ({"beta": 1.0, "epsilon": 1e-3}, [_exo(h, 1e-3) for h in H]),
    # delta = beta * 0.5
    "bco": ({"beta": 1.0}, [L(w - 0.5) + L(-(l - 0.5)) for w, l in zip(R_W, R_L)]),
    "sppo": ({"beta": 1.0}, [0.5, 4.5, 2.5]),  # (r_w - 1/2)^2 + (r_l + 1/2)^2
    "apo_zero": ({"beta": 1.0}, [1 - sig(w) + sig(l) for w, l in zip(R_W, R_L)]),
    "apo_down": ({"beta": 1.0}, [sig(w) + 1 - sig(h) for w, h in zip(R_W, H)]),
    # sort(logp_w - logp_l) = [-1, 1, 5], sort(ref_w - ref_l) = [0, 1, 2]: d = [-1, 0, 3]
    "aot": ({"beta": 1.0}, [L(-1.0), L(0.0), L(3.0)]),
    # sort(r_w) = [-1, 1, 1], sort(r_l) = [-2, 0, 1]: d = [1, 1, 0]
    "aot_unpaired": ({"beta": 1.0}, [L(1.0), L(1.0), L(0.0)]),
    # m = sigmoid(h / 2)
    "discopop": ({"beta": 1.0, "tau": 2.0}, [(1 - sig(h / 2)) * L(h) + sig(h / 2) * math.exp(-h) for h in H]),
    # avg_w - avg_l = [-0.75, 0.5, 1]; 2 * that - gamma (= 0.5 * 2) = [-2.5, 0, 1]
    "simpo": ({"beta": 2.0, "gamma_beta_ratio": 0.5}, [L(-2.5), L(0.0), L(1.0)]),
    "orpo": ({"lam": 0.1}, [-w - 0.1 * math.log(sig(_log_odds(w) - _log_odds(l))) for w, l in zip(AVG_W, AVG_L)]),
    # logp_w - logp_l = [1, -1, 5]; summed NLL = [4, 6, 3]
    "cpo": ({"beta": 0.1}, [L(0.1) + 4.0, L(-0.1) + 6.0, L(0.5) + 3.0]),
    # max(0, 1 - [1, -1, 5]) = [0, 2, 0]; + 0.1 * [4, 6, 3]
    "slic": ({"delta": 1.0, "lam": 0.1}, [0.4, 2.6, 0.3]),
    "sft": ({}, [2.0, 3.0, 1.5]),  # -logp_w * 3 / sum|y_w| = -logp_w / 2; mean 6.5/3 = 13/6 = sum(-logp_w)/sum|y_w|
    "composite": (MPO, [0.8 * L(0.1 * h) + 0.2 * (L(0.1 * w - 0.05) + L(-(0.1 * l - 0.05))) + s
                        for h, w, l, s in zip(H, R_W, R_L, [2.0, 3.0, 1.5])]),
    # z0 = 0.5; rows: desirable 1 - sig(1 - 0.5); undesirable 2 (1 - sig(0.5 - (-1))); desirable again
    "kto": ({"beta": 1.0, "undesirable_weight": 2.0}, [1 - sig(0.5), 2 * (1 - sig(1.5)), 1 - sig(0.5)]),
    "apo_zero_unpaired": ({"beta": 1.0, "undesirable_weight": 2.0}, [1 - sig(1.0), 2 * sig(-1.0), 1 - sig(1.0)]),
    # -exp(avg_w) + exp(avg_l): avg_w = [-2, -2, -3], avg_l = [-1.25, -2.5, -4]
    "simper": ({}, [-math.exp(w) + math.exp(v) for w, v in zip(AVG_W, AVG_L)]),
    # (avg_w - avg_l - 1/(2 * 0.5))^2 = ([-0.75, 0.5, 1] - 1)^2; + token-mean NLL(y_w) = -logp_w * 3 / 6 = [2, 3, 1.5]
    "ipo_ref_free": ({"beta": 0.5, "alpha": 1.0}, [3.0625 + 2.0, 0.25 + 3.0, 0.0 + 1.5]),
    # beta (h - (D_l - D_w)) = 0.5 * [0.6, -1.8, 2.7]; TDPO2 halves the KL gap (alpha = 0.5): 0.5 * [0.8, -1.9, 2.85]
    "tdpo1": ({"beta": 0.5}, [L(0.5 * (h - d)) for h, d in zip(H, D_GAP)]),
    "tdpo2": ({"beta": 0.5, "alpha": 0.5}, [L(0.5 * h - 0.5 * 0.5 * d) for h, d in zip(H, D_GAP)]),
}


@pytest.mark.parametrize("name", loss_names())
def test_hand_worked_values(name: str) -> None:
    if name not in HAND:
        pytest.fail(f"add a hand-worked value for the new loss {name!r} to HAND")
    params, expected = HAND[name]
    config = LossConfig(name, **params)
    record = hand_pairs() if config.paired else hand_rows()
    torch.testing.assert_close(config(record), t(expected), rtol=1e-9, atol=1e-12)


def test_extra_hand_worked_options() -> None:
    lp = hand_pairs()
    # IPO on per-token log-ratios: (h_avg - 1)^2
    ipo_averaged = LossConfig("ipo", beta=0.5, average_log_probs=True)(lp)
    torch.testing.assert_close(ipo_averaged, t([(h - 1) ** 2 for h in H_AVG]))
    # R-DPO as most implementations write it: minus the length term
    expected = [L(0.1 * h - 0.05 * (nw - nl)) for h, nw, nl in zip(H, LW, LL)]
    torch.testing.assert_close(LossConfig("rdpo", alpha=0.05, length_term="subtract")(lp), t(expected))
    # CPO with TRL's token-mean NLL: -logp_w * 3 / 6
    torch.testing.assert_close(LossConfig("cpo", nll="token_mean")(lp), t([L(0.1) + 2.0, L(-0.1) + 3.0, L(0.5) + 1.5]))
    torch.testing.assert_close(LossConfig("sft", token_mean="pair")(lp), t([2.0, 2.0, 3.0]))
    no_shift = LossConfig("bco", beta=1.0, reward_shift=False)(lp)
    torch.testing.assert_close(no_shift, t([L(w) + L(-l) for w, l in zip(R_W, R_L)]))


EPS_EXO = 1e-3
# name -> (hyperparameters, expected values at init, h = r = 0); the formula's value there, or the data-dependent value
INIT: dict[str, tuple[dict, Callable[[], list[float]]]] = {
    "dpo": ({}, _const(LN2)),
    "cdpo": ({"label_smoothing": 0.1}, _const(LN2)),
    "robust": ({"label_smoothing": 0.1}, _const(LN2)),
    "ipo": ({"beta": 0.1}, _const(1 / (4 * 0.1**2))),
    "hinge": ({}, _const(1.0)),
    "rso": ({}, _const(1.0)),
    "dpo_norm": ({}, _const(LN2)),
    "rdpo": ({"alpha": 0.05}, lambda: [L(0.05 * (a - b)) for a, b in zip(LW0, LL0)]),  # depends on lengths
    "dpop": ({}, _const(LN2)),
    "rpo": ({"alpha": 1.0}, _const(LN2 + 1.0)),  # + NLL(y_w)/|y_w| = 1 here
    "nca": ({}, _const(2 * LN2)),
    "exo": ({"epsilon": EPS_EXO}, _const(-LN2 - 0.5 * math.log(EPS_EXO * (1 - EPS_EXO)))),
    "bco": ({}, _const(2 * LN2)),  # delta = 0 at init
    "sppo": ({"beta": 0.1}, _const(1 / (2 * 0.1**2))),
    "apo_zero": ({}, _const(1.0)),
    "apo_down": ({}, _const(1.0)),
    "aot": ({}, _const(LN2)),
    "aot_unpaired": ({}, _const(LN2)),
    "discopop": ({}, _const((LN2 + 1) / 2)),
    # reference-free: avg(y_w) = avg(y_l) = -1
    "simpo": ({"beta": 2.0, "gamma_beta_ratio": 0.5}, _const(L(-1.0))),
    "orpo": ({"lam": 0.1}, _const(1.0 + 0.1 * LN2)),
    "cpo": ({"beta": 0.1}, lambda: [L(0.1 * (b - a)) + a for a, b in zip(LW0, LL0)]),
    "slic": ({"delta": 1.0, "lam": 0.1}, lambda: [max(0.0, 1 + a - b) + 0.1 * a for a, b in zip(LW0, LL0)]),
    "sft": ({}, lambda: [a / 5.0 for a in LW0]),  # -logp_w * 3 / 15; mean 1 = the per-token NLL
    "composite": (MPO, lambda: [0.8 * LN2 + 0.2 * 2 * LN2 + a / 5.0 for a in LW0]),
    "kto": ({"desirable_weight": 1.0, "undesirable_weight": 1.5}, lambda: [0.5, 0.75, 0.5]),  # lambda / 2
    "apo_zero_unpaired": ({"undesirable_weight": 1.5}, lambda: [0.5, 0.75, 0.5]),
    "simper": ({}, _const(0.0)),
    "ipo_ref_free": ({"beta": 0.1}, _const(1 / (4 * 0.1**2))),  # margin 0: (0 - 1/(2 beta))^2  # avg(y_w) = avg(y_l) = -1: the two inverse perplexities cancel
    "tdpo1": ({}, _const(LN2)),  # h = 0 and both sequential KLs 0
    "tdpo2": ({}, _const(LN2)),
}


@pytest.mark.parametrize("name", loss_names())
def test_value_at_initialization(name: str) -> None:
    if name not in INIT:
        pytest.fail(f"add the value at initialization of the new loss {name!r} to INIT")
    params, expected = INIT[name]
    config = LossConfig(name, **params)
    record = init_pairs() if config.paired else init_rows()
    torch.testing.assert_close(config(record), t(expected()), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- gradient signs
# chosen: d loss / d logp(y_w) < 0 unless listed; rejected: d loss / d logp(y_l) > 0 unless listed.
CHOSEN_SIGN_EXEMPT = {
    "apo_down": "lowers both likelihoods: d/d logp_w = beta (s'(beta r_w) - s'(beta h)), 0 at init",
    "discopop": "non-monotone near h = 0: its derivative there is m'(0)(1 - ln 2) - 3/4 > 0 for tau = 0.05",
}
REJECTED_SIGN_EXEMPT = {"sft": "ignores the rejected response", "discopop": CHOSEN_SIGN_EXEMPT["discopop"]}


# The loss families added later keep their cases beside their tests: each module has HAND and INIT dicts like the ones
# above, and may exempt a loss from the gradient-sign rule (CHOSEN_SIGN_EXEMPT, REJECTED_SIGN_EXEMPT), with the reason.
FAMILIES = [importlib.import_module(m) for m in CASE_MODULES]
for _family in FAMILIES:
    for _mine, _theirs in ((HAND, "HAND"), (INIT, "INIT"), (CHOSEN_SIGN_EXEMPT, "CHOSEN_SIGN_EXEMPT"),
                           (REJECTED_SIGN_EXEMPT, "REJECTED_SIGN_EXEMPT")):
        _clash = set(_mine) & set(getattr(_family, _theirs, {}))
        assert not _clash, f"{_family.__name__}.{_theirs} repeats {sorted(_clash)}"
        _mine.update(getattr(_family, _theirs, {}))


@pytest.mark.parametrize("name", loss_names())
def test_gradient_signs(name: str) -> None:
    config = LossConfig(name, **INIT[name][0])
    if not config.paired:  # desirable rows' loss falls, undesirable rows' rises, as their logp increases
        rows = init_rows(grad=True)
        config(rows).sum().backward()
        g = rows.policy_logps.grad
        assert bool((g[rows.desirable] < 0).all()) and bool((g[~rows.desirable] > 0).all()), g
        return
    lp = init_pairs(grad=True)
    config(lp).sum().backward()
    g_w, g_l = lp.policy_chosen_logps.grad, lp.policy_rejected_logps.grad
    if name not in CHOSEN_SIGN_EXEMPT:
        assert bool((g_w < 0).all()), g_w
    if name == "sft":
        assert g_l is None or bool((g_l == 0).all()), g_l
    elif name not in REJECTED_SIGN_EXEMPT:
        assert bool((g_l > 0).all()), g_l


def test_simper_gradients_are_its_inverse_perplexities_over_the_length() -> None:
    """d/d logp(y_w) = -exp(avg_w)/|y_w| and d/d logp(y_l) = exp(avg_l)/|y_l|: each response is weighted by its own
    inverse perplexity, so a rejected response that is already unlikely gets almost no push (bounded by 1/|y|)."""
    lp = hand_pairs(grad=True)
    LossConfig("simper")(lp).sum().backward()
    torch.testing.assert_close(lp.policy_chosen_logps.grad, t([-math.exp(a) / n for a, n in zip(AVG_W, LW)]))
    torch.testing.assert_close(lp.policy_rejected_logps.grad, t([math.exp(a) / n for a, n in zip(AVG_L, LL)]))


def test_discopop_is_monotone_away_from_zero() -> None:
    """Past the bump around h = 0 DiscoPOP decreases in logp_w and increases in logp_l like the others."""
    lp = init_pairs(grad=True)
    lp = lp.replace(ref_chosen_logps=lp.ref_chosen_logps - 5.0)  # h = 5: beta h / tau = 50, m ~ 1, loss ~ exp(-beta h)
    LossConfig("discopop", beta=0.5)(lp).sum().backward()
    assert bool((lp.policy_chosen_logps.grad < 0).all()) and bool((lp.policy_rejected_logps.grad > 0).all())


def test_discopop_descends_from_the_reference_into_a_reversed_local_minimum() -> None:
    """At h = 0, m = 1/2 and m' = 1/(4 tau): dL/dh = beta ((1/2)(-1/2) + (1/2)(-1) + (1 - ln 2)/(4 tau)) = beta
    (-3/4 + (1 - ln 2)/(4 tau)) = 0.7843 beta at tau = 0.05, so descent lowers the margin first; the slope in z = beta h
    changes sign back at z* = -0.1186 (bisection on the autograd slope): a local minimum at a reversed margin."""
    beta, tau = 0.5, 0.05

    def slope(z: float) -> float:
        lp = init_pairs()  # policy = reference: h = 0 in every pair; then h = z / beta
        chosen = (lp.ref_chosen_logps + z / beta).requires_grad_()
        LossConfig("discopop", beta=beta, tau=tau)(lp.replace(policy_chosen_logps=chosen)).mean().backward()
        return float(chosen.grad.sum()) / beta  # dL/dz, L the batch mean

    assert slope(0.0) == pytest.approx(-0.75 + (1 - LN2) / (4 * tau), rel=1e-9)
    assert slope(0.0) == pytest.approx(0.7843, abs=1e-4)
    low, high = -0.3, 0.0  # slope < 0 at -0.3 (the logistic side), > 0 at 0
    assert slope(low) < 0 < slope(high)
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if slope(mid) < 0 else (low, mid)
    assert low == pytest.approx(-0.1186, abs=1e-4)


# ---------------------------------------------------------------- identities
def _same(a: LossConfig, b: LossConfig, lp: PairLogps | None = None) -> None:
    lp = lp or hand_pairs()
    torch.testing.assert_close(a(lp), b(lp), rtol=0, atol=1e-12)


def test_identities() -> None:
    dpo = LossConfig("dpo", beta=0.3)
    _same(LossConfig("cdpo", beta=0.3, label_smoothing=0.0), dpo)
    _same(LossConfig("robust", beta=0.3, label_smoothing=0.0), dpo)
    _same(LossConfig("rpo", beta=0.3, alpha=0.0), dpo)
    _same(LossConfig("dpop", beta=0.3, lam=0.0), dpo)
    _same(LossConfig("rdpo", beta=0.3, alpha=0.0), dpo)
    _same(LossConfig("dpo", beta=0.3, ld_alpha=1.0), dpo)
    _same(LossConfig("dpo", beta=0.3, f_divergence="reverse_kl", f_alpha=0.9), dpo)
    _same(LossConfig("composite", terms=[{"name": "dpo", "weight": 1.0, "beta": 0.3}]), dpo)
    _same(LossConfig("composite", terms=[{"name": "simpo"}]), LossConfig("simpo"))


def test_simpo_without_margin_is_reference_free_length_normalized_dpo() -> None:
    lp = hand_pairs()
    no_reference = lp.replace(ref_chosen_logps=torch.zeros(3, dtype=torch.float64),
                              ref_rejected_logps=torch.zeros(3, dtype=torch.float64))
    simpo = LossConfig("simpo", beta=2.5, gamma_beta_ratio=0.0)(lp)
    torch.testing.assert_close(simpo, LossConfig("dpo_norm", beta=2.5)(no_reference))


def test_alpha_divergence_tends_to_reverse_kl_and_forward_kl() -> None:
    lp = hand_pairs()
    small = LossConfig("dpo", beta=1.0, f_divergence="alpha", f_alpha=1e-7)(lp)
    torch.testing.assert_close(small, LossConfig("dpo", beta=1.0)(lp), rtol=1e-5, atol=1e-6)
    near_one = LossConfig("dpo", beta=1.0, f_divergence="alpha", f_alpha=1 - 1e-9)(lp)
    forward_kl = LossConfig("dpo", beta=1.0, f_divergence="forward_kl")(lp)
    torch.testing.assert_close(near_one, forward_kl, rtol=1e-6, atol=1e-7)


def test_paired_apo_zero_is_the_sum_of_its_two_rows() -> None:
    lp = hand_pairs()
    rows = UnpairedLogps(
        policy_logps=torch.cat([lp.policy_chosen_logps, lp.policy_rejected_logps]), lengths=t(LW + LL),
        desirable=torch.tensor([True] * 3 + [False] * 3),
        ref_logps=torch.cat([lp.ref_chosen_logps, lp.ref_rejected_logps]),
    )
    per_row = LossConfig("apo_zero_unpaired", beta=0.7)(rows)
    torch.testing.assert_close(per_row[:3] + per_row[3:], LossConfig("apo_zero", beta=0.7)(lp))


# ---------------------------------------------------------------- what gets gradients
def test_kto_reference_point_is_detached() -> None:
    rows = hand_rows(grad=True)
    LossConfig("kto")(rows).sum().backward()
    assert rows.policy_kl_logps.grad is None and rows.policy_logps.grad is not None


def test_bco_reward_shift_is_detached() -> None:
    lp = hand_pairs(grad=True).replace(running_logratio_mean=torch.tensor(0.5, dtype=torch.float64, requires_grad=True))
    LossConfig("bco")(lp).sum().backward()
    assert lp.running_logratio_mean.grad is None


@pytest.mark.parametrize("name", [n for n in loss_names() if not LossConfig(n, **INIT[n][0]).needs_reference])
def test_reference_free_losses_never_read_the_reference(name: str) -> None:
    lp = hand_pairs(grad=True).replace(ref_chosen_logps=t(RW, grad=True), ref_rejected_logps=t(RL, grad=True))
    LossConfig(name, **INIT[name][0])(lp).sum().backward()
    assert lp.ref_chosen_logps.grad is None and lp.ref_rejected_logps.grad is None
    assert lp.policy_chosen_logps.grad is not None


# ---------------------------------------------------------------- config errors and metadata
def test_unknown_name_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'dpoo'.*valid names: .*dpo.*simpo"):
        LossConfig("dpoo")
    with pytest.raises(ValueError, match="valid names"):
        LossConfig.from_value({"beta": 0.1})


@pytest.mark.parametrize("bad", [{"beta": 0.0}, {"beta": -1.0}, {"beta": "big"}, {"beta": float("nan")},
                                 {"label_smoothing": 0.5}, {"label_smoothing": -0.1}, {"f_divergence": "kl"},
                                 {"f_alpha": 1.0}, {"ld_alpha": 1.5}, {"wpo": 1}])
def test_bad_values_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError, match="loss 'dpo'"):
        LossConfig("dpo", **bad)


def test_epsilon_ranges_of_other_losses() -> None:
    for bad in (0.5, 0.7, -0.01):
        with pytest.raises(ValueError, match=r"outside the valid range \[0, 0.5\)"):
            LossConfig("robust", label_smoothing=bad)
    with pytest.raises(ValueError, match=r"\(0, 0.5\)"):
        LossConfig("exo", epsilon=0.0)


def test_unknown_hyperparameter_is_rejected() -> None:
    with pytest.raises(ValueError, match="has no hyperparameter betta; its hyperparameters: beta"):
        LossConfig("dpo", betta=0.1)
    with pytest.raises(ValueError, match="no hyperparameter ld_alpha"):
        LossConfig("kto", ld_alpha=0.5)  # the generic options are for paired losses only


def test_composite_validates_its_terms() -> None:
    with pytest.raises(ValueError, match=r"terms\[1\]: unknown loss 'bcoo'"):
        LossConfig("composite", terms=[{"name": "dpo"}, {"name": "bcoo"}])
    with pytest.raises(ValueError, match=r"terms\[0\]: .*beta"):
        LossConfig("composite", terms=[{"name": "dpo", "beta": -1}])
    with pytest.raises(ValueError, match=r"terms\[0\]: weight"):
        LossConfig("composite", terms=[{"name": "dpo", "weight": -1}])
    with pytest.raises(ValueError, match="at least one"):
        LossConfig("composite", terms=[])
    assert LossConfig("composite") == LossConfig("composite", **MPO)  # the default is MPO
    with pytest.raises(ValueError, match="mix paired and unpaired"):
        LossConfig("composite", terms=[{"name": "dpo"}, {"name": "kto"}])
    nested = LossConfig("composite", terms=[{"name": "composite", "terms": [{"name": "ipo", "beta": 0.5}]}])
    assert nested.needs_reference and nested.paired and nested.reward_scale == 0.5


def test_wpo_is_rejected_for_losses_that_sort_the_batch() -> None:
    with pytest.raises(ValueError, match="sorts the batch"):
        LossConfig("aot", wpo=True)


def test_round_trip_and_metadata() -> None:
    assert len(LOSSES) >= 25
    for name in loss_names():
        config = LossConfig(name, **INIT[name][0])
        assert LossConfig.from_value(config.to_dict()) == config
        spec = config.spec
        assert spec.paper and spec.formula and spec.aggregation and spec.reward and spec.summary, name
        # The pair options (LD-DPO, WPO) reweight a pair's log-probs; RLOO reads a group of K sampled responses.
        assert bool(spec.options) == (spec.paired and name != "composite" and not spec.on_policy), name
    assert LossConfig.from_value("{name: ipo, beta: 0.5}") == LossConfig("ipo", beta=0.5)
    assert LossConfig.from_value("sft").reward_scale == 1.0
    assert LossConfig("simpo").needs_reference is False and LossConfig("kto").paired is False
    assert LossConfig("orpo", lam=0.3).reward_scale == 1.0 and LossConfig("cpo", beta=0.2).reward_scale == 0.2


def test_jsonargparse_rejects_a_bad_loss_at_parse_time() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=LossConfig)
    assert parser.parse_args(["--loss", "{name: ipo, beta: 0.5}"]).loss == LossConfig("ipo", beta=0.5)
    for bad in ("{name: ipo, beta: -1}", "{name: dpoo}", "{name: dpo, betta: 1}"):
        with pytest.raises(Exception):
            parser.parse_args(["--loss", bad])


def test_docs_are_up_to_date() -> None:
    from pathlib import Path

    from prefopt.losses.docs import COMMAND, render

    page = Path(__file__).resolve().parents[1] / "docs" / "losses.md"
    assert page.is_file() and page.read_text() == render(), f"docs/losses.md is stale; regenerate it with: {COMMAND}"
