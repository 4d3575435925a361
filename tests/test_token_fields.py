"""The per-token record fields beyond the sums (WPO's aligned sums, SamPO's down-sampled sums, ORPO's prompt sums):
checked against a direct computation from full logits, then every speed lever that produces them (prompt sharing,
the chunked LM head, the trimmed last layer, the reference cache) against the plain path, in value and gradient.
No lever is refused for them: each produces them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures)

from prefopt.cli import main
from prefopt.fast.prefix_sharing import collate_shared_pairs
from prefopt.fast.reference_cache import FIELDS, compute_reference_logps
from prefopt.fast.scorer import ALIGNED, PROMPT, SAMPLED, Scorer, ScoringOptions, check_fields
from prefopt.logps import sampled_mask
from prefopt.losses import LossConfig
from prefopt.train.batching import collate_rows
from prefopt.train.data import PreferenceDataModule
from prefopt.train.models import load_causal_lm

# One loss that reads every new field: SamPO, ORPO with the prompt NLL, DPO with the aligned WPO weight.
EVERY = LossConfig("composite", terms=[{"name": "sampo"}, {"name": "orpo", "nll": "prompt_and_completion"},
                                       {"name": "dpo", "wpo": "aligned"}])
NEW_FIELDS = sorted(ALIGNED | SAMPLED | PROMPT)
LEVERS = {
    "chunked head": ({"logps_chunk_size": 3}, False),
    "prompt sharing": ({"share_prompt": True}, True),
    "prompt sharing, chunked": ({"share_prompt": True, "logps_chunk_size": 2}, True),
    "prompt sharing, trimmed last layer": ({"share_prompt": True, "trim_last_layer": True}, True),
    "every lever": ({"share_prompt": True, "trim_last_layer": True, "logps_chunk_size": 5}, True),
}


def test_every_new_field_is_read_by_the_composite_and_no_lever_is_refused():
    assert set(NEW_FIELDS) <= EVERY.reads
    for options, _ in LEVERS.values():
        check_fields(ScoringOptions(**options, reference_cache=True), EVERY)


# ---------------------------------------------------------------- SamPO's down-sample
def test_sampled_mask_by_hand_keeps_the_shorter_response_and_as_many_tokens_of_the_longer():
    """Pair 0: |y_w| = 2 < |y_l| = 4 (prompt 1 token); pair 1: |y_w| = 3 > |y_l| = 1 (prompt 2 tokens)."""
    batch = collate_rows([[1], [1, 5], [1], [1, 5]], [[6, 2], [7, 8, 2], [9, 10, 11, 2], [2]], pad_id=0)
    mask = sampled_mask(batch["completion_mask"], torch.tensor([0, 1]))
    slots = batch["completion_mask"][:, 1:].float()
    assert mask.sum(-1).tolist() == [2.0, 1.0, 2.0, 1.0]
    assert torch.equal(mask[0], slots[0]) and torch.equal(mask[3], slots[3])  # the shorter ones: all tokens
    assert bool((mask <= slots).all())  # completion tokens only
    assert torch.equal(mask, sampled_mask(batch["completion_mask"], torch.tensor([0, 1])))  # a function of the keys
    others = [sampled_mask(batch["completion_mask"], torch.tensor([k, k]))[2] for k in range(20)]
    assert len({tuple(m.tolist()) for m in others}) > 3  # the keys pick different subsets


def test_sampled_subsets_are_uniform_over_keys():
    """A 6-token response against a 2-token one: over 6000 keys each of the 15 two-token subsets comes up 1/15 of
    the time, within 5 binomial standard deviations (sd = 12.5 counts of 400)."""
    rows = collate_rows([[1]] * 2, [[3] * 6, [4, 2]], pad_id=0)["completion_mask"]
    mask = rows.repeat_interleave(6000, 0)  # (2 * 6000, T): the 6000 chosen rows, then the 6000 rejected ones
    chosen = sampled_mask(mask, torch.arange(6000))[:6000]
    assert bool((chosen.sum(-1) == 2).all())
    counts = torch.unique(chosen, dim=0, return_counts=True)[1]
    assert counts.numel() == 15 and int((counts - 400).abs().max()) < 5 * 12.5, counts.tolist()


def _dm(micro_model, micro_pairs) -> PreferenceDataModule:
    dm = PreferenceDataModule(dataset=str(micro_pairs), tokenizer=str(micro_model), val_fraction=0.25, batch_size=4)
    dm.setup("fit")
    return dm


def _models(micro_model) -> tuple[torch.nn.Module, torch.nn.Module]:
    reference = load_causal_lm(str(micro_model)).eval()
    policy = load_causal_lm(str(micro_model))
    with torch.no_grad():  # off the reference, so that log-ratios and gradients are not zero
        for p in policy.parameters():
            p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape))
    return policy, reference


# ---------------------------------------------------------------- against a direct computation
def test_the_plain_path_matches_a_direct_computation(micro_model, micro_pairs):
    dm = _dm(micro_model, micro_pairs)
    policy, reference = _models(micro_model)
    examples = dm.train_examples[:6]
    batch = dm.collate_pairs(examples)
    record = Scorer(ScoringOptions(reference_cache=False), EVERY).score(policy, reference, batch)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=ids, attention_mask=batch["attention_mask"]).logits.double(), -1)
    label = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (2B, T-1)
    collision = torch.logsumexp(2 * logp[:, :-1], -1)  # log sum_v p_v^2
    slots = mask[:, 1:].double()
    aligned = ((label - collision) * slots).sum(-1)
    torch.testing.assert_close(torch.cat([record.policy_chosen_aligned_logps, record.policy_rejected_aligned_logps]),
                               aligned.float(), rtol=1e-5, atol=1e-5)
    assert not record.policy_chosen_aligned_logps.requires_grad
    b, plens = len(examples), [len(e["prompt_ids"]) for e in examples]
    prompt = [float(label[i, : plens[i] - 1].sum()) for i in range(b)]  # tokens 2..|x| of the chosen rows
    torch.testing.assert_close(record.policy_prompt_logps.double(), torch.tensor(prompt, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    assert record.prompt_lengths.tolist() == [p - 1.0 for p in plens] and record.policy_prompt_logps.requires_grad
    chosen, rejected = [len(e["chosen_ids"]) for e in examples], [len(e["rejected_ids"]) for e in examples]
    picked = sampled_mask(mask, batch["index"])
    assert picked.sum(-1).tolist() == [float(min(c, r)) for c, r in zip(chosen, rejected)] * 2
    sampled = (label * picked).sum(-1)
    torch.testing.assert_close(torch.cat([record.policy_chosen_sampled_logps, record.policy_rejected_sampled_logps]),
                               sampled.float(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = torch.log_softmax(reference(input_ids=ids, attention_mask=batch["attention_mask"]).logits.double(), -1)
    ref_sampled = (ref[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * picked).sum(-1)
    torch.testing.assert_close(torch.cat([record.ref_chosen_sampled_logps, record.ref_rejected_sampled_logps]),
                               ref_sampled.float(), rtol=1e-5, atol=1e-5)


def test_the_sampled_subset_is_the_same_in_both_layouts():
    prompts, chosen, rejected = [[1, 5, 7], [1, 9]], [[6, 11, 2], [4, 2]], [[8, 2], [12, 13, 14, 15, 2]]
    standard = collate_rows(prompts + prompts, chosen + rejected, pad_id=0)["completion_mask"]
    shared = collate_shared_pairs(prompts, chosen, rejected, pad_id=0)["completion_mask"]
    keys = torch.tensor([7, 3])
    in_order = lambda m, c: sampled_mask(m, keys)[c[:, 1:].bool()]  # noqa: E731  (row-major completion slots)
    assert torch.equal(in_order(standard, standard), in_order(shared, shared))


# ---------------------------------------------------------------- every lever against the plain path
def _scored(options: dict, shared: bool, policy, reference, dm, examples):
    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    scorer = Scorer(ScoringOptions(**options, reference_cache=False), EVERY)
    scorer.prepare(policy, reference)  # the trimmed last layer, where asked
    batch = dm.collate_shared_pairs(examples) if shared else dm.collate_pairs(examples)
    record = scorer.score(policy, reference, batch)
    mix = (record.policy_prompt_logps - 0.7 * record.policy_chosen_sampled_logps
           + 0.4 * record.policy_rejected_sampled_logps).sum()
    return record, torch.autograd.grad(mix, list(policy.parameters()))


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_each_lever_gives_the_plain_paths_fields_and_gradients(micro_model, micro_pairs, lever):
    dm = _dm(micro_model, micro_pairs)
    policy, reference = _models(micro_model)
    examples = dm.train_examples[:5]
    plain, plain_grads = _scored({}, False, policy, reference, dm, examples)
    options, shared = LEVERS[lever]
    fast, fast_grads = _scored(options, shared, policy, reference, dm, examples)
    for field in NEW_FIELDS:
        torch.testing.assert_close(getattr(fast, field), getattr(plain, field), rtol=1e-5, atol=1e-5, msg=field)
    for a, b in zip(plain_grads, fast_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not fast.policy_rejected_aligned_logps.requires_grad


def test_the_reference_cache_holds_the_live_references_sampled_sums(micro_model, micro_pairs):
    """The table (computed 3 pairs at a time, keyed by each pair's index) and a live reference on a prompt-shared
    batch give the same sums, and SamPO the same loss; a table of examples without an index keys by position."""
    dm = _dm(micro_model, micro_pairs)
    policy, reference = _models(micro_model)
    table = compute_reference_logps(reference, dm.train_examples, dm.collate_pairs, batch_size=3)
    assert {"ref_chosen_sampled_logps", "ref_rejected_sampled_logps"} <= set(table) == set(FIELDS)
    unindexed = [{k: v for k, v in e.items() if k != "index"} for e in dm.train_examples]
    no_index = compute_reference_logps(reference, unindexed, dm.collate_pairs, batch_size=5)
    for field in FIELDS:
        torch.testing.assert_close(no_index[field], table[field], rtol=0, atol=0)
    examples = dm.train_examples[4:9]
    sampo = LossConfig("sampo", beta=0.5)
    live = Scorer(ScoringOptions(reference_cache=False), sampo).score(policy, reference, dm.collate_pairs(examples))
    cached_scorer = Scorer(ScoringOptions(reference_cache=True, share_prompt=True), sampo)
    assert cached_scorer.caches_reference
    cached_scorer.use_reference_table(table)
    cached = cached_scorer.score(policy, None, dm.collate_shared_pairs(examples))
    for field in SAMPLED:
        torch.testing.assert_close(getattr(cached, field), getattr(live, field), rtol=1e-5, atol=1e-5, msg=field)
    torch.testing.assert_close(sampo(cached), sampo(live), rtol=1e-5, atol=1e-6)


def test_validation_records_carry_the_fields_keyed_by_position(micro_model, micro_pairs):
    """Validation pairs have no index: their down-sample is keyed by their position in the batch."""
    dm = _dm(micro_model, micro_pairs)
    policy, reference = _models(micro_model)
    batch = dm.collate_pairs(dm.val_examples[:4])
    assert "index" not in batch
    scorer = Scorer(ScoringOptions(reference_cache=False), EVERY)
    record, _, _ = scorer.evaluate(policy, reference, batch)
    trained = scorer.score(policy, reference, {**batch, "index": torch.arange(4)})
    for field in NEW_FIELDS:
        torch.testing.assert_close(getattr(record, field), getattr(trained, field), rtol=1e-5, atol=1e-6, msg=field)


# ---------------------------------------------------------------- whole runs and parse-time checks
def test_a_run_reading_every_field_with_every_lever_matches_a_run_without(micro_base, tmp_path):
    every = EVERY.to_dict()
    runs = []
    levers = ["--model.scoring.share_prompt=true", "--model.scoring.logps_chunk_size=3",
              "--model.scoring.trim_last_layer=true", "--model.scoring.reference_cache=true"]
    for args in (["--model.scoring.reference_cache=false"], levers):
        cli = main(["fit", f"--model.loss={json.dumps(every)}", *args])
        runs.append(json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text()))
    for key, value in runs[0]["final"].items():
        assert runs[1]["final"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_settings_that_make_no_sense_are_refused_when_parsed(micro_base, capsys):
    for loss, message in (("{name: sampo, ld_alpha: 0.5}", "leave ld_alpha at 1"),
                          ("{name: dpo, wpo: 1}", "wpo is one of"),
                          ("{name: orpo, nll: prompt}", "'prompt' is not one of")):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", f"--model.loss={loss}", "--print_config"])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err, loss
