"""TR-DPO's moving reference (`model.reference_update`, prefopt/train/reference.py): the update rules by hand, a run's
reference after its updates, the cached log-probs never read stale, resume across an update, the shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)
from run_helpers import EVERY_STEP, fit, policy_weights
from torch import nn

from prefopt.train.reference import ReferenceUpdate, mix_into, rescore_pays

ROOT = Path(__file__).resolve().parents[1]
def test_one_soft_and_one_hard_update_by_hand():
    """policy 1, reference 3: after a soft update with alpha 0.25 the reference is 0.25 * 1 + 0.75 * 3 = 2.5; after a
    hard one, 1; the policy never changes."""
    policy, reference = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        for p in policy.parameters():
            p.fill_(1.0)
        for p in reference.parameters():
            p.fill_(3.0)
    mix_into(reference, policy, 0.25)
    assert all(torch.equal(p, torch.full_like(p, 2.5)) for p in reference.parameters())
    mix_into(reference, policy, 1.0)
    assert all(torch.equal(p, torch.ones_like(p)) for p in reference.parameters())
    assert all(torch.equal(p, torch.ones_like(p)) for p in policy.parameters())


def test_when_an_update_is_due():
    every2 = ReferenceUpdate(every=2)
    assert [every2.due(s) for s in range(6)] == [False, False, True, False, True, False]
    assert [every2.due(s, start=3) for s in (3, 4, 5, 7)] == [False, False, True, True]  # counted from the stage
    assert not any(ReferenceUpdate().due(s) for s in range(6))
    with pytest.raises(ValueError, match="alpha in"):
        ReferenceUpdate(every=2, alpha=0.0)
    with pytest.raises(ValueError, match="every must be >= 0"):
        ReferenceUpdate(every=-1)
    assert rescore_pays(5, 4, 20) and not rescore_pays(4, 4, 20)  # a rescoring costs 20 / 4 = 5 steps' live reads


def test_a_run_soft_updates_its_reference_every_tau_steps(micro_base, tmp_path):
    """every 2, alpha 0.5, 4 steps: one update, before step 3: the final reference is 0.5 pi_2 + 0.5 pi_0."""
    cli, _ = fit("--model.reference_update={every: 2, alpha: 0.5}", EVERY_STEP % (tmp_path / "ckpts"))
    at2 = policy_weights(next((tmp_path / "ckpts").glob("*step=2.ckpt")))
    from prefopt.train.models import load_causal_lm

    start = load_causal_lm(cli.model.hparams.model).state_dict()  # pi_0, from the model's source
    reference = dict(cli.model.reference.named_parameters())
    for name, value in reference.items():
        torch.testing.assert_close(value, 0.5 * at2[name] + 0.5 * start[name], rtol=0, atol=1e-7)
    assert "reference_state_dict" in torch.load(next((tmp_path / "ckpts").glob("*step=3.ckpt")), weights_only=False)
    assert "reference_state_dict" not in torch.load(next((tmp_path / "ckpts").glob("*step=2.ckpt")), weights_only=False)


@pytest.mark.parametrize("update, steps", [
    ("{every: 2, alpha: 0.5}", 4),  # updates closer than a rescoring pays for: the reference is read live
    ("{every: 5, alpha: 1.0}", 8),  # 5 steps x 4 pairs >= 18 pairs: the moved reference's table is rescored
])
def test_a_moved_reference_gives_the_same_run_with_the_reference_cache_as_without(update, steps, micro_base):
    """The cached table of the starting reference is never read once the reference moved."""
    args = (f"--model.reference_update={update}", f"--trainer.max_steps={steps}")
    cached, with_cache = fit(*args, "--model.scoring.reference_cache=true")
    assert cached.model.scorer.live_reference == (steps == 4)  # which path the run ended on
    _, without = fit(*args, "--model.scoring.reference_cache=false")
    for key, value in without["final"].items():
        assert with_cache["final"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_run_resumed_after_an_update_ends_like_an_uninterrupted_one(micro_base, tmp_path):
    update = "--model.reference_update={every: 2, alpha: 0.5}"
    _, full = fit(update, EVERY_STEP % (tmp_path / "ckpts"))
    _, resumed = fit(update, f"--ckpt_path={next((tmp_path / 'ckpts').glob('*step=3.ckpt'))}")
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_a_moving_reference_refuses_lora():
    from prefopt.train.lora import LoraOptions
    from prefopt.train.module import PreferenceModule

    with pytest.raises(ValueError, match="full fine-tuning"):
        PreferenceModule(reference_update=ReferenceUpdate(every=2), lora=LoraOptions(r=4))


@pytest.mark.parametrize("name", ["tr_dpo", "tr_dpo_hard"])
def test_the_shipped_tr_dpo_files_fit_on_the_built_in_task(name, gold_reference_dir):
    """configs/base.yaml and the experiment file, shrunk: 6 steps, and tau shrunk to 2 so that updates happen."""
    path = ROOT / "experiments" / "online" / f"{name}.yaml"
    cli, metrics = fit(f"--config={ROOT / 'configs' / 'base.yaml'}", f"--config={path}", "--trainer.max_steps=6",
                        "--trainer.val_check_interval=6", "--model.reference_update.every=2")
    assert cli.model._reference_moved and cli.model._moved_at == 4
    assert cli.model.reference_update.alpha == (0.6 if name == "tr_dpo" else 1.0)
    assert metrics["final"]["val/gold/sampled_kl"] > 0


# ---------------------------------------------------------------- sDPO: the pairs in chunks, a stage per chunk
def test_sdpo_stages_draw_each_stage_from_its_own_chunk():
    """3 stages of 4 steps of 5 pairs over 26 pairs: the chunks partition the pairs; stage t draws from chunk t
    only, every pair of its chunk before any twice; two ranks together take the single process's global batches."""
    from prefopt.train.chunks import StagedSampler

    one = StagedSampler(26, stages=3, steps=4, batch_size=5, seed=7)
    chunks = one.chunks()
    assert sorted(i for c in chunks for i in c) == list(range(26)) and [len(c) for c in chunks] == [9, 9, 8]
    order = list(one)
    assert len(order) == len(one) == 3 * 4 * 5
    for t, chunk in enumerate(chunks):
        stage = order[t * 20 : (t + 1) * 20]
        assert set(stage) <= set(chunk) and len(set(stage[: len(chunk)])) == len(chunk)
    ranks = [list(StagedSampler(26, 3, 4, 5, seed=7, rank=r, world_size=2)) for r in (0, 1)]
    two = StagedSampler(26, 3, 4, 10, seed=7)  # the global batch of two ranks of 5
    assert sorted(ranks[0][:5] + ranks[1][:5]) == sorted(list(two)[:10])


def test_the_shipped_sdpo_file_resets_the_reference_at_its_second_stage(gold_reference_dir, tmp_path):
    """configs/base.yaml and experiments/online/sdpo.yaml shrunk to 4 steps (so the stage length, reference_update's
    every, shrinks to 2 with them): after the run the reference is the step-2 policy, and a stage length that does not
    match max_steps / stages is refused."""
    path = ROOT / "experiments" / "online" / "sdpo.yaml"
    base = (f"--config={ROOT / 'configs' / 'base.yaml'}", f"--config={path}", "--trainer.max_steps=4",
            "--trainer.val_check_interval=4")
    cli, _ = fit(*base, "--model.reference_update.every=2", EVERY_STEP % (tmp_path / "ckpts"))
    step2 = policy_weights(next((tmp_path / "ckpts").glob("*step=2.ckpt")))
    assert cli.model._moved_at == 2 and cli.datamodule.hparams.stages == 2
    for name, weight in cli.model.reference.named_parameters():
        torch.testing.assert_close(weight, step2[name], rtol=0, atol=0)
    from prefopt.cli import main

    with pytest.raises(SystemExit):
        main(["fit", *base])  # every: 150 for a 4-step run
    with pytest.raises(SystemExit):
        main(["fit", *base, "--model.reference_update.every=2", "--model.reference_update.alpha=0.5"])
