"""The log-prob computation: checked against a plain log_softmax on hand-made tensors."""

from __future__ import annotations

import torch

from prefopt.train.batching import collate_rows
from prefopt.logps import pair_logps, shared_prefix_mask, token_kl, token_logps, unpaired_logps


def _batch():
    # Two pairs. Pair 0: prompt [1, 5], chosen [6, 7, 2], rejected [8, 2]. Pair 1: prompt [1, 5, 9], chosen [6, 2],
    # rejected [7, 7, 7, 2]. Rows: chosen 0, chosen 1, rejected 0, rejected 1.
    prompts = [[1, 5], [1, 5, 9]] * 2
    completions = [[6, 7, 2], [6, 2], [8, 2], [7, 7, 7, 2]]
    return collate_rows(prompts, completions, pad_id=0)


def test_collate_masks_prompt_and_padding_out_of_the_completion():
    b = _batch()
    assert b["input_ids"].tolist()[0] == [1, 5, 6, 7, 2, 0, 0]
    assert b["completion_mask"].tolist() == [
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1],
    ]
    assert b["attention_mask"].sum(-1).tolist() == [5, 5, 4, 7]


def test_token_logps_match_a_plain_log_softmax():
    torch.manual_seed(0)
    b = _batch()
    logits = torch.randn(4, 7, 11)
    got = token_logps(logits, b["input_ids"], b["completion_mask"])
    full = torch.log_softmax(logits, -1)
    # Row 0: completion tokens 6, 7, 2 at positions 2, 3, 4 are predicted by logits at positions 1, 2, 3.
    expected = full[0, 1, 6] + full[0, 2, 7] + full[0, 3, 2]
    assert torch.allclose(got[0].sum(), expected)
    assert got[0, 0] == 0 and got[0, 4:].abs().sum() == 0  # prompt and padding contribute nothing


def test_pair_record_sums_counts_and_shared_prefix():
    b = _batch()
    tok = b["completion_mask"][:, 1:].float() * torch.arange(1.0, 7.0)  # distinct per-position "log-probs"
    lp = pair_logps(tok, b["completion_mask"], ref_token_logps=torch.zeros_like(tok))
    assert lp.chosen_lengths.tolist() == [3, 2] and lp.rejected_lengths.tolist() == [2, 4]
    # chosen 0 occupies label positions 1, 2, 3 (values 2, 3, 4); rejected 0 positions 1, 2 (values 2, 3).
    assert lp.policy_chosen_logps.tolist() == [2 + 3 + 4, 3 + 4]
    assert lp.policy_rejected_logps.tolist() == [2 + 3, 3 + 4 + 5 + 6]
    # Shared prefix = the first min(|y_w|, |y_l|) tokens: pair 0 -> 2 tokens, pair 1 -> 2 tokens.
    assert lp.policy_chosen_shared_logps.tolist() == [2 + 3, 3 + 4]
    assert lp.policy_rejected_shared_logps.tolist() == [2 + 3, 3 + 4]
    assert shared_prefix_mask(b["completion_mask"]).sum(-1).tolist() == [2, 2, 2, 2]
    assert lp.margins().tolist() == [9 - 5, 7 - 18]


def test_unpaired_record_splits_examples_from_kl_rows():
    b = _batch()
    tok = b["completion_mask"][:, 1:].float()
    lp = unpaired_logps(tok, b["completion_mask"], torch.tensor([True, False]), ref_token_logps=tok * 0)
    assert lp.policy_logps.tolist() == [3, 2] and lp.policy_kl_logps.tolist() == [2, 4]
    assert lp.lengths.tolist() == [3, 2] and lp.logratios().tolist() == [3, 2]


def test_token_kl_is_zero_for_identical_models_and_matches_the_definition():
    b = _batch()
    torch.manual_seed(1)
    p, q = torch.randn(4, 7, 5), torch.randn(4, 7, 5)
    total, tokens = token_kl(p, p, b["completion_mask"])
    assert total.abs() < 1e-6 and tokens == 11
    total, _ = token_kl(p, q, b["completion_mask"])
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    per_position = (lp.exp() * (lp - lq)).sum(-1)[:, :-1]
    assert torch.allclose(total, (per_position * b["completion_mask"][:, 1:]).sum())
