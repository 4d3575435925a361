"""The gold evaluation's diagnostics of why a loss loses (`prefopt.gold.evaluation`): outside-support samples and
the share of the KL they carry, length beyond the base's maximum, next-token entropy and top-token probability.

Hand-checked on a fake causal LM whose next-token distribution is a fixed table per generated position, plus one
check on the built-in reference. No training.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from test_gold_task import one_thread  # noqa: F401  (autouse fixture: one thread)

from prefopt.gold import task
from prefopt.gold.build import build_tokenizer, load_reference
from prefopt.gold.evaluation import KL_FLOOR, evaluate_policy, kl_share, outside_support
from prefopt.gold.sampling import TokenStats, sample_responses, score_responses

PROMPT_LEN = 3  # <bos> TOPIC :


class TableLM(torch.nn.Module):
    """A causal LM whose next-token distribution depends only on the generated position: `table[k]` maps tokens to
    probabilities for the k-th generated token (the last row repeats); every other token has logit `floor` (the
    default, -1e4, has probability exactly 0 in float32 but keeps `score_responses`'s masked prompt positions finite).

    Works with the KV-cache calls of `sample_responses` (the "cache" is the number of tokens seen) and with the
    full-sequence forwards of `score_responses`."""

    def __init__(self, tokenizer, table: list[dict[str, float]], floor: float = -1e4) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # for `next(model.parameters()).device`
        logits = torch.full((len(table), len(tokenizer)), floor)
        for k, row in enumerate(table):
            for token, p in row.items():
                logits[k, tokenizer.convert_tokens_to_ids(token)] = math.log(p)
        self.register_buffer("logits", logits)

    def forward(self, input_ids: torch.Tensor, past_key_values: int | None = None, use_cache: bool = False):
        seen = past_key_values or 0
        position = seen + torch.arange(input_ids.shape[1])  # (T,): position of each input token
        k = (position - (PROMPT_LEN - 1)).clamp(0, len(self.logits) - 1)  # generated index each position predicts
        logits = self.logits[k].expand(input_ids.shape[0], -1, -1)  # (B, T, V)
        return SimpleNamespace(logits=logits, past_key_values=seen + input_ids.shape[1])




@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ------------------------------------------------------------------------------------------- outside the support


@pytest.mark.parametrize(
    ("words", "ended", "outside"),
    [
        (["good", "film", "was", "great"], True, False),  # 4 content words, ended: the base can produce it
        (["good"] * 12, True, False),  # the longest base length
        (["good", "film", "was"], True, True),  # too short: 3 words
        ([], True, True),  # empty
        (["good"] * 13, True, True),  # too long: 13 words
        (["good", ":", "was", "great"], True, True),  # the ':' separator
        (["good", "<unk>", "was", "great"], True, True),  # a special token
        (["good", "film", "was", "great"], False, True),  # unended: hit max_new_tokens
    ],
)
def test_outside_support_hand_made(words, ended, outside):
    assert outside_support([("film", words, ended)]).tolist() == [outside]


def test_outside_support_is_base_logprob_minus_inf_or_unended():
    responses = [("film", w, e) for w in (["good"] * 4, ["bad"] * 3, ["so"] * 13, ["the", ":", "a", "it"], [],
                                          ["car", "film", "love", "sad", "a", "a", "quite"]) for e in (True, False)]
    expected = [not e or not np.isfinite(task.base_logprob(t, w)) for t, w, e in responses]
    assert outside_support(responses).tolist() == expected
    assert outside_support(responses).sum() == 12 - 2  # all but the ended 4 and 7 content words


# ------------------------------------------------------------------------------------------- KL share


def test_kl_share_hand_made():
    logratio = torch.tensor([1.0, 2.0, -0.5, 0.5])  # total 3.0
    assert kl_share(logratio, np.array([True, False, False, False])) == pytest.approx(1 / 3)
    assert kl_share(logratio, np.array([False, True, True, False])) == pytest.approx(1.5 / 3)
    assert kl_share(logratio, np.array([False, True, False, True])) == pytest.approx(2.5 / 3)
    assert kl_share(logratio, np.array([True, True, False, True])) == pytest.approx(3.5 / 3)  # > 1: a negative term
    assert kl_share(logratio, np.zeros(4, dtype=bool)) == 0.0 and kl_share(logratio, np.ones(4, dtype=bool)) == 1.0
    assert kl_share(torch.tensor([1.0, -1.0]), np.array([True, False])) == 0.0  # total 0: defined as 0
    assert kl_share(torch.tensor([1.0, -2.0]), np.array([True, False])) == 0.0  # total < 0
    tiny = torch.tensor([KL_FLOOR, 0.0])  # mean KL_FLOOR / 2: rounding noise, not KL spent
    assert kl_share(tiny, np.array([True, False])) == 0.0 and kl_share(tiny, np.array([True, False]), floor=0) == 1.0


# ------------------------------------------------------------------------------------------- entropy, top token


def test_token_stats_hand_checked_and_the_samples_unchanged(tok):
    """Position 0: <eos> or "good" with 1/2 each (H = ln 2, top 1/2); position 1: <eos> for sure (H = 0, top 1);
    position 2 on: uniform over 4 words, never reached. A response that ends at once sums one position (ln 2, 1/2),
    "good <eos>" two (ln 2, 3/2): the finished rows add nothing at position 1. Logits of -inf add nothing either."""
    table = [{"<eos>": 0.5, "good": 0.5}, {"<eos>": 1.0}, dict.fromkeys(["a", "bad", "so", "it"], 0.25)]
    model = TableLM(tok, table, floor=-math.inf)
    args = (model, tok, ["film", "car"], 64)
    plain = sample_responses(*args, torch.Generator().manual_seed(0))
    responses, logps, stats = sample_responses(*args, torch.Generator().manual_seed(0), return_logps=True,
                                               return_token_stats=True)
    only_stats = sample_responses(*args, torch.Generator().manual_seed(0), return_token_stats=True)
    assert responses == plain == only_stats[0] and isinstance(stats, TokenStats)
    assert torch.equal(only_stats[1].entropy, stats.entropy) and torch.equal(only_stats[1].top_prob, stats.top_prob)
    assert {tuple(w) for _, w, _ in responses} == {(), ("good",)} and all(e for _, _, e in responses)
    one = torch.tensor([len(w) == 0 for _, w, _ in responses])
    assert torch.equal(stats.positions, torch.where(one, 1, 2))
    assert torch.allclose(stats.entropy, torch.full((128,), math.log(2)))
    assert torch.allclose(stats.top_prob, torch.where(one, 0.5, 1.5))
    assert torch.allclose(logps, torch.full((128,), math.log(0.5)))  # ln 1/2, then ln 1 for <eos>
    finite = TableLM(tok, table)  # the same probabilities, scorable: the fake scores what it samples
    assert torch.allclose(logps, score_responses(finite, tok, responses))

    capped = sample_responses(model, tok, ["film"], 8, torch.Generator().manual_seed(0), max_new_tokens=1,
                              return_token_stats=True)[1]  # one position per response, ended or not
    assert torch.equal(capped.positions, torch.ones(8, dtype=torch.long))
    assert torch.allclose(capped.top_prob, torch.full((8,), 0.5))


def test_evaluate_policy_diagnostics_hand_checked(tok):
    """Policy: first word ':' or "good" with 1/2 each, then "good" x 3, then <eos>: every response has 4 words and 5
    positions (H = ln 2 at the first only, top 1/2 there and 1 at the other four). The reference puts 1/4 on ':'.
    With f the fraction holding ':' (outside the support), sampled KL = f ln 2 + (1 - f) ln(2/3) and the outside
    share is f ln 2 / that (about ln 2 / ln(4/3) = 2.4 at f = 1/2: the in-support samples carry negative KL)."""
    rest = [{"good": 1.0}] * 3 + [{"<eos>": 1.0}]
    policy = TableLM(tok, [{":": 0.5, "good": 0.5}, *rest])
    reference = TableLM(tok, [{":": 0.25, "good": 0.75}, *rest])
    m = evaluate_policy(policy, reference, tok, task.TRAIN_TOPICS, num_samples=512, seed=0)
    f = m["outside_support_fraction"]
    assert 0.4 < f < 0.6 and m["mean_length"] == 4 and m["eos_rate"] == 1
    assert m["short_fraction"] == 0 and m["long_fraction"] == 0
    kl = f * math.log(2) + (1 - f) * math.log(2 / 3)
    assert m["sampled_kl"] == pytest.approx(kl, abs=1e-5)
    assert m["outside_support_kl_share"] == pytest.approx(f * math.log(2) / kl, rel=1e-4)
    assert m["entropy"] == pytest.approx(math.log(2) / 5, abs=1e-6)
    assert m["top_token_prob"] == pytest.approx((0.5 + 4) / 5, abs=1e-6)

    long = TableLM(tok, [{"good": 0.5, "bad": 0.5}] * 13 + [{"<eos>": 1.0}])  # 13 words: all long, all outside
    m = evaluate_policy(long, long, tok, ["film"], num_samples=64, seed=0)
    assert m["long_fraction"] == 1 == m["outside_support_fraction"] and m["short_fraction"] == 0
    assert m["outside_support_kl_share"] == 0  # the policy is the reference: no KL spent
    assert m["entropy"] == pytest.approx(13 * math.log(2) / 14, abs=1e-6)
    assert m["top_token_prob"] == pytest.approx((13 * 0.5 + 1) / 14, abs=1e-6)


# ------------------------------------------------------------------------------------------- the reference


def test_the_reference_stays_in_the_support_and_its_stats_match_a_full_forward(gold_reference_dir):
    model, tok = load_reference(gold_reference_dir)
    m = evaluate_policy(model, model, tok, task.TRAIN_TOPICS, num_samples=2048, seed=0)
    assert m["outside_support_fraction"] < 0.01 and m["long_fraction"] < 0.01
    assert m["outside_support_kl_share"] == 0  # the policy is the reference
    assert 0 < m["entropy"] < math.log(len(task.CONTENT_WORDS)) and 0 < m["top_token_prob"] < 1

    responses, stats = sample_responses(model, tok, ["film", "car"], 4, torch.Generator().manual_seed(2),
                                        max_new_tokens=6, return_token_stats=True)
    for (topic, words, ended), entropy, top, n in zip(responses, *stats):
        ids = tok(task.prompt_text(topic))["input_ids"] + tok.convert_tokens_to_ids(words)
        ids += [tok.eos_token_id] if ended else []
        with torch.no_grad():
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, PROMPT_LEN - 1 : -1], -1)  # (n, V)
        assert int(n) == len(words) + ended == len(p)
        assert float(entropy) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-4)
        assert float(top) == pytest.approx(float(p.max(-1).values.sum()), abs=1e-5)
