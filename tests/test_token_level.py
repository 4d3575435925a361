"""TDPO and what it proves about the layout: a loss declares the fields it reads, the scorer produces them (or the
config is refused when parsed), and running state is declared by the loss, not kept by the module.

TDPO's sequential KL D(y) = sum_t KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t)) is checked against a direct computation
from full logits in both batch layouts. The analytic check: with one-token responses to one prompt, both responses'
next-token distributions are the ones after the prompt, so D_w = D_l and TDPO_1 equals DPO in value and gradient,
while TDPO_2 keeps DPO's value but adds alpha beta grad D_l (it pulls that distribution toward the reference).
"""

from __future__ import annotations

import math

import pytest
import torch
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)

from prefopt.cli import main
from prefopt.fast.prefix_sharing import collate_shared_pairs
from prefopt.fast.scorer import Scorer, ScoringOptions, check_fields
from prefopt.losses import LossConfig, register
from prefopt.losses.state import GlobalBatch, RunningLogratioMean, SingleProcess
from prefopt.records import PairLogps
from prefopt.train.batching import collate_rows
from prefopt.train.models import load_causal_lm
from prefopt.train.module import PreferenceModule


def L(z: float) -> float:  # -log sigmoid(z)
    return math.log1p(math.exp(-z))


def _record(grad: bool = True) -> PairLogps:
    """r_w = 1, r_l = -1 (h = 2); D_w = 0.2, D_l = 0.6."""
    t = lambda v: torch.tensor([v], dtype=torch.float64, requires_grad=grad)  # noqa: E731
    return PairLogps(policy_chosen_logps=t(-3.0), policy_rejected_logps=t(-5.0), chosen_lengths=t(2.0),
                     rejected_lengths=t(2.0), ref_chosen_logps=t(-4.0), ref_rejected_logps=t(-4.0),
                     chosen_seq_kl=t(0.2), rejected_seq_kl=t(0.6))


def test_tdpo_by_hand_and_its_kl_gradients():
    lp = _record()
    # TDPO_1, beta 0.5: z = 0.5 * 2 - 0.5 * (0.6 - 0.2) = 0.8
    loss = LossConfig("tdpo1", beta=0.5)(lp)
    assert loss.item() == pytest.approx(L(0.8), abs=1e-12)
    loss.sum().backward()
    assert lp.rejected_seq_kl.grad.item() > 0 > lp.chosen_seq_kl.grad.item()  # keep D_l small, D_w may grow
    # dz/dD_l = -beta, dL/dz = -sigmoid(-z): dL/dD_l = 0.5 sigmoid(-0.8)
    assert lp.rejected_seq_kl.grad.item() == pytest.approx(0.5 / (1 + math.exp(0.8)), abs=1e-12)
    lp = _record()
    # TDPO_2, beta 0.5, alpha 0.5: z = 1 - 0.5 * (0.3 - 0.1) = 0.9; D_w is detached
    loss = LossConfig("tdpo2", beta=0.5, alpha=0.5)(lp)
    assert loss.item() == pytest.approx(L(0.9), abs=1e-12)
    loss.sum().backward()
    assert lp.chosen_seq_kl.grad is None or lp.chosen_seq_kl.grad.item() == 0
    assert lp.rejected_seq_kl.grad.item() == pytest.approx(0.25 / (1 + math.exp(0.9)), abs=1e-12)
    # alpha = 0 is DPO
    dpo = LossConfig("dpo", beta=0.5)(_record(grad=False))
    assert LossConfig("tdpo2", beta=0.5, alpha=0.0)(_record(grad=False)).item() == pytest.approx(dpo.item(), abs=1e-15)


def _moved_policy(micro_model) -> tuple[torch.nn.Module, torch.nn.Module]:
    reference = load_causal_lm(str(micro_model)).eval()
    policy = load_causal_lm(str(micro_model))
    with torch.no_grad():  # off the reference, so that the KLs and gradients are not zero
        for p in policy.parameters():
            p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape))
    return policy, reference


PROMPTS, CHOSEN, REJECTED = [[1, 5, 7], [1, 9]], [[6, 11, 2], [4, 2]], [[8, 2], [12, 13, 14, 2]]


def _batch(shared: bool) -> dict[str, torch.Tensor]:
    if shared:
        return collate_shared_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0)
    return collate_rows(PROMPTS + PROMPTS, CHOSEN + REJECTED, pad_id=0)


@pytest.mark.parametrize("shared", [False, True])
def test_the_scorers_sequential_kl_equals_a_direct_computation(micro_model, shared):
    policy, reference = _moved_policy(micro_model)
    scorer = Scorer(ScoringOptions(share_prompt=shared, reference_cache=False), LossConfig("tdpo2"))
    record = scorer.score(policy, reference, _batch(shared))
    plain = _batch(False)
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=plain["input_ids"]).logits[:, :-1].double(), -1)
        logq = torch.log_softmax(reference(input_ids=plain["input_ids"]).logits[:, :-1].double(), -1)
    per_token = (logq.exp() * (logq - logp)).sum(-1) * plain["completion_mask"][:, 1:]  # KL(ref || policy)
    expected = per_token.sum(-1).float()
    assert float(expected.min()) > 0
    torch.testing.assert_close(torch.cat([record.chosen_seq_kl, record.rejected_seq_kl]), expected,
                               rtol=1e-4, atol=1e-6)
    assert record.chosen_seq_kl.requires_grad  # the policy's gradient flows through it


@pytest.mark.parametrize("shared", [False, True])
def test_with_one_token_responses_tdpo1_is_dpo_and_tdpo2_adds_a_pull_on_the_rejected_kl(micro_model, shared):
    prompts, chosen, rejected = [[1, 5, 7], [1, 9]], [[6], [4]], [[8], [12]]
    batch = (collate_shared_pairs(prompts, chosen, rejected, pad_id=0) if shared
             else collate_rows(prompts + prompts, chosen + rejected, pad_id=0))
    policy, reference = _moved_policy(micro_model)
    grads, values = {}, {}
    for name in ("dpo", "tdpo1", "tdpo2"):
        policy.zero_grad()
        scorer = Scorer(ScoringOptions(share_prompt=shared, reference_cache=False), LossConfig(name, beta=0.5))
        record = scorer.score(policy, reference, batch)
        if name != "dpo":
            torch.testing.assert_close(record.chosen_seq_kl, record.rejected_seq_kl)  # the same context
        loss = LossConfig(name, beta=0.5)(record).mean()
        loss.backward()
        values[name] = loss.item()
        grads[name] = torch.cat([p.grad.flatten() for p in policy.parameters()])
    assert values["tdpo1"] == pytest.approx(values["dpo"], abs=1e-6)
    assert values["tdpo2"] == pytest.approx(values["dpo"], abs=1e-6)
    torch.testing.assert_close(grads["tdpo1"], grads["dpo"], rtol=1e-4, atol=1e-6)
    assert (grads["tdpo2"] - grads["dpo"]).abs().max() > 1e-4  # TDPO_2's extra term acts


def test_a_loss_reading_full_distributions_is_refused_with_a_chunked_head_when_parsed(micro_base, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model.loss={name: tdpo2}", "--model.scoring.logps_chunk_size=8"])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "'tdpo2' reads chosen_seq_kl" in message and "model.scoring.logps_chunk_size: null" in message
    check_fields(ScoringOptions(logps_chunk_size=8), LossConfig("dpo"))  # a loss reading sums only is fine


def test_a_loss_reading_full_distributions_uses_a_live_reference_not_the_cache():
    options = ScoringOptions(reference_cache=True)
    assert Scorer(options, LossConfig("dpo")).caches_reference
    assert not Scorer(options, LossConfig("tdpo2")).caches_reference
    assert not Scorer(options, LossConfig("simpo")).with_reference  # reference-free: no reference at all


def test_registering_a_loss_that_reads_a_field_no_record_has_fails():
    with pytest.raises(TypeError, match="not fields of its record"):
        register("reads_nothing_real", paper="-", formula="-", needs_reference=False, reward_scale=None,
                 reads=("token_entropy",))(
            lambda lp: lp.policy_chosen_logps)


# ---------------------------------------------------------------- running state
def test_the_running_log_ratio_mean_spans_batches_and_ranks():
    state = RunningLogratioMean()

    class TwoRanks(SingleProcess):  # the other rank saw the same log-ratios
        def sum(self, tensor):
            return 2 * tensor

    lp = _record(grad=False)  # log-ratios 1 and -1
    assert state.update(lp, SingleProcess()).running_logratio_mean.item() == 0.0
    lp = lp.replace(policy_chosen_logps=torch.tensor([-1.0], dtype=torch.float64))  # log-ratios 3 and -1
    assert state.update(lp, TwoRanks()).running_logratio_mean.item() == pytest.approx((0 + 2 * 2) / 6)
    assert state.read(_record(grad=False)).running_logratio_mean.item() == pytest.approx(4 / 6)


def test_a_global_batch_state_gathers_its_fields_detached():
    class Doubling(SingleProcess):
        def gather(self, tensor):
            return torch.cat([tensor, tensor + 1])

    lp = _record()
    out = GlobalBatch("chosen_seq_kl").update(lp, Doubling())
    assert out.chosen_seq_kl.tolist() == [0.2, 1.2] and not out.chosen_seq_kl.requires_grad
    assert out.rejected_seq_kl is lp.rejected_seq_kl


def test_the_module_keeps_the_state_its_loss_declares_and_reads_old_checkpoints():
    assert not list(PreferenceModule(loss=LossConfig("dpo")).buffers())
    module = PreferenceModule(loss=LossConfig("bco"))
    assert set(module.state_dict()) == {"loss_state.0.total", "loss_state.0.count"}
    def old_checkpoint() -> dict:  # written before the loss-state modules
        return {"state_dict": {"logratio_sum": torch.tensor(3.0, dtype=torch.float64),
                               "logratio_count": torch.tensor(6.0, dtype=torch.float64)}}

    old = old_checkpoint()
    module.on_load_checkpoint(old)
    module.load_state_dict(old["state_dict"])
    assert module.loss_state[0].read(_record(grad=False)).running_logratio_mean.item() == 0.5
    dpo, old = PreferenceModule(loss=LossConfig("dpo")), old_checkpoint()
    dpo.on_load_checkpoint(old)
    assert old["state_dict"] == {}  # dropped: DPO keeps no state
