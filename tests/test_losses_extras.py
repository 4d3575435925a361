"""Losses that read further responses per prompt (TPO's gold response, InfoNCA with K responses): their optima and
limits, and the data path that brings the responses, on local files and on the built-in task.

Optimum: InfoNCA's K-way cross-entropy of softmax(beta r) against softmax(s / alpha), with the K responses drawn from
pi_ref and scored by R, is smallest at r = R / (alpha beta) + c, so its tabular optimum is pi_ref exp(R / (alpha
beta)) / Z for every K (Chen et al. 2024, arXiv 2402.05369).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from loss_records import L, LX, PL, PW, PX, hand_pairs, t, t2
from micro_fixtures import micro_model, micro_pairs  # noqa: F401  (fixtures)
from test_loss_bandits import MU, R, one_thread, record, tv  # noqa: F401  (one_thread: fixture)

from prefopt.fast.scorer import ScoringOptions, Scorer
from prefopt.losses import LossConfig
from prefopt.train.data import PreferenceDataModule
from prefopt.train.formats import DataError

K = MU.numel()


def test_infonca_k_lands_on_its_optimum_with_three_responses_per_prompt() -> None:
    """Every ordered triple (a, b, c) of arms drawn from mu, scored by R: the policy tends to mu exp(R / (alpha beta))."""
    a, b, c = (x.reshape(-1) for x in torch.meshgrid(*[torch.arange(K)] * 3, indexing="ij"))  # (K^3,) each
    weights = MU[a] * MU[b] * MU[c]
    beta, alpha = 0.5, 2.0
    loss = LossConfig("infonca_k", beta=beta, alpha=alpha)
    theta = MU.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        logp = torch.log_softmax(theta, -1)
        lp = record(theta, a, b).replace(
            chosen_scores=R[a], rejected_scores=R[b], extra_scores=R[c][:, None],
            policy_extra_logps=logp[c][:, None], ref_extra_logps=MU.log()[c][:, None])
        (weights * loss(lp)).sum().backward()
        opt.step()
    target = torch.softmax(MU.log() + R / (alpha * beta), -1)
    assert tv(torch.softmax(theta.detach(), -1), target) < 2e-3


def test_infonca_k_without_further_responses_is_infonca() -> None:
    lp = hand_pairs()
    empty = torch.zeros(3, 0, dtype=torch.float64)
    no_extras = lp.replace(policy_extra_logps=empty, ref_extra_logps=empty, extra_scores=empty)
    torch.testing.assert_close(LossConfig("infonca_k", beta=0.3, alpha=1.5)(no_extras),
                               LossConfig("infonca", beta=0.3, alpha=1.5)(lp))


def test_infonca_k_ignores_which_response_is_called_chosen() -> None:
    lp = hand_pairs()
    swapped = lp.replace(policy_chosen_logps=lp.policy_rejected_logps, policy_rejected_logps=lp.policy_chosen_logps,
                         ref_chosen_logps=lp.ref_rejected_logps, ref_rejected_logps=lp.ref_chosen_logps,
                         chosen_scores=lp.rejected_scores, rejected_scores=lp.chosen_scores)
    torch.testing.assert_close(LossConfig("infonca_k")(swapped), LossConfig("infonca_k")(lp))


def test_tpo_options() -> None:
    lp = hand_pairs()
    # alpha = 0: reference-free DPO on the pair, which is CPO without its NLL
    torch.testing.assert_close(LossConfig("tpo", beta=0.3, alpha=0.0)(lp), LossConfig("cpo", beta=0.3, alpha=0.0)(lp))
    # TPO-L: length-averaged log-probs against a margin; avg(y_w) - avg(y_l) = [-0.75, 0.5, 1]
    tpo_l = LossConfig("tpo", beta=2.0, alpha=0.0, gamma=0.5, length_normalize=True)(lp)
    torch.testing.assert_close(tpo_l, t([L(2.0 * m - 0.5) for m in (-0.75, 0.5, 1.0)]))
    # the authors' token mean: -sum of the batch's gold log-probs / its gold tokens = 25 / 11, spread over 3 pairs
    token = LossConfig("tpo", beta=0.5, alpha=1.0, nll="token_mean")(lp)
    nll = [-sum(x) / 2 * 3 / (sum(sum(n) for n in LX) / 2) for x in PX]
    torch.testing.assert_close(token, t([L(0.5 * (w - l)) + n for w, l, n in zip(PW, PL, nll)]))
    assert abs(sum(nll) / 3 - 25 / 11) < 1e-12


def test_tpo_pulls_the_gold_response_up() -> None:
    lp = hand_pairs().replace(policy_extra_logps=t2(PX, grad=True))
    LossConfig("tpo")(lp).sum().backward()
    assert bool((lp.policy_extra_logps.grad < 0).all())


# ---------------------------------------------------------------- the data path
def _extra_rows(micro_pairs, count=2, scores=True):
    rows = [json.loads(line) for line in micro_pairs.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["more"] = ["good fun film", "the dull book"][:count]
        if scores:
            r["more_scores"] = [3.0, -1.0 + i][:count]
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_further_responses_reach_the_batches_and_the_record(micro_model, micro_pairs, tmp_path):
    path = _write(tmp_path / "extras.jsonl", _extra_rows(micro_pairs))
    dm = PreferenceDataModule(dataset=str(path), tokenizer=str(micro_model), val_fraction=0.25, batch_size=4,
                              extras=True, scores=True, columns={"extra": "more", "extra_scores": "more_scores"})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["extra_input_ids"].shape[0] == 8 and batch["extra_scores"].shape == (4, 2)
    expected = [dm.train_examples[i]["extra_scores"] for i in batch["index"].tolist()]
    assert batch["extra_scores"].tolist() == expected
    tok = dm.tokenizer
    first, second = (batch["extra_input_ids"][i][batch["extra_completion_mask"][i].bool()].tolist() for i in (0, 1))
    assert tok.convert_ids_to_tokens(first) == ["good", "fun", "film", "<eos>"]  # pair-major: pair 0's two responses
    assert tok.convert_ids_to_tokens(second) == ["the", "dull", "book", "<eos>"]
    # the scorer's sums equal the plain pair path's sums of the same sequences
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_model).eval()
    for options in (ScoringOptions(), ScoringOptions(logps_chunk_size=3)):
        scorer = Scorer(options, LossConfig("infonca_k"))
        with torch.no_grad():
            lp = scorer.score(model, model, batch)
        as_pairs = dict(batch, input_ids=batch["extra_input_ids"], attention_mask=batch["extra_attention_mask"],
                        completion_mask=batch["extra_completion_mask"])
        with torch.no_grad():
            plain = Scorer(ScoringOptions(), LossConfig("dpo")).evaluate(model, model, as_pairs)[0]
        sums = torch.cat([plain.policy_chosen_logps, plain.policy_rejected_logps])  # rows in the batch's order
        torch.testing.assert_close(lp.policy_extra_logps.reshape(-1), sums, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp.ref_extra_logps, lp.policy_extra_logps)
        assert lp.extra_scores.shape == (4, 2) and lp.extra_lengths.min() >= 2


def test_bad_further_responses_are_named_before_training(micro_model, micro_pairs, tmp_path):
    kw = dict(tokenizer=str(micro_model), extras=True, columns={"extra": "more"})
    plain = _write(tmp_path / "plain.jsonl", [json.loads(x) for x in micro_pairs.read_text().splitlines()])
    with pytest.raises(DataError, match=r"plain.jsonl: .*no column 'more' \(field 'extra'"):
        PreferenceDataModule(dataset=str(plain), **kw).setup("fit")
    rows = _extra_rows(micro_pairs, scores=False)
    rows[6]["more"] = ["good fun film"]  # one further response where the others have two
    with pytest.raises(DataError, match=r"row 7 \(counting from 1\), field 'extra': 1 further responses where most"):
        PreferenceDataModule(dataset=str(_write(tmp_path / "uneven.jsonl", rows)), **kw).setup("fit")
    rows = _extra_rows(micro_pairs, scores=False)
    rows[2]["more"] = ["good", 7]
    with pytest.raises(DataError, match=r"bad.jsonl: row 3 \(counting from 1\), field 'more': expected a string"):
        PreferenceDataModule(dataset=str(_write(tmp_path / "bad.jsonl", rows)), **kw).setup("fit")
    rows = _extra_rows(micro_pairs)
    rows[1]["more_scores"] = [1.0]
    with pytest.raises(DataError, match=r"row 2 \(counting from 1\), field 'more_scores': expected 2 scores"):
        PreferenceDataModule(dataset=str(_write(tmp_path / "scores.jsonl", rows)), scores=True,
                             **{**kw, "columns": {"extra": "more", "extra_scores": "more_scores"}}).setup("fit")
    with pytest.raises(DataError, match="set data.gold.extra_responses"):
        PreferenceDataModule(tokenizer="gold", extras=True).setup("fit")


def test_built_in_further_responses_leave_the_pairs_unchanged(gold_reference_dir, tmp_path):
    from prefopt.gold import task
    from prefopt.gold.pairs import ensure_pairs

    def rows(path):
        return [json.loads(x) for x in path.read_text().splitlines()]

    plain, _ = ensure_pairs(gold_reference_dir, 3, 12, 2, cache_dir=tmp_path)
    assert ensure_pairs(gold_reference_dir, 3, 12, 2, extra_responses=0, extra_best_of=5, cache_dir=tmp_path)[0] == plain
    best, val = ensure_pairs(gold_reference_dir, 3, 12, 2, extra_responses=2, extra_best_of=4, cache_dir=tmp_path)
    one, _ = ensure_pairs(gold_reference_dir, 3, 12, 2, extra_responses=2, cache_dir=tmp_path)
    pairs, with_best, with_one = rows(plain), rows(best), rows(one)
    assert [{k: r[k] for k in pairs[0]} for r in with_best] == pairs  # same pairs, same labels
    for r in with_best + rows(val):
        assert len(r["extra"]) == 2 and r["extra_rewards"] == [task.gold_reward(r["topic"], e.split()) for e in r["extra"]]
    mean = lambda rs, key: sum(sum(r[key]) for r in rs) / sum(len(r[key]) for r in rs)  # noqa: E731
    assert mean(with_best, "extra_rewards") > mean(with_one, "extra_rewards") + 0.5  # best of 4 vs single samples


def test_conversational_further_responses_are_rendered_with_the_chat_template(tmp_path):
    """One gold response per row as a list of assistant messages (TPO's layout on a chat dataset)."""
    from chat_fixtures import GOOD, message_rows, save_byte_model, write_jsonl

    model = save_byte_model(tmp_path / "byte_model")
    rows = [{**r, "gold": [{"role": "assistant", "content": GOOD[i % 6] + " Really."}]}
            for i, r in enumerate(message_rows(12, style="explicit"))]
    dm = PreferenceDataModule(dataset=str(write_jsonl(tmp_path / "chat.jsonl", rows)), tokenizer=str(model),
                              val_fraction=0.25, max_length=256, batch_size=2, extras=True, columns={"extra": "gold"})
    dm.setup("fit")
    tok = dm.tokenizer
    for example in dm.train_examples[:3]:
        row = rows[[i for i, r in enumerate(rows) if tok.apply_chat_template(
            r["prompt"], tokenize=False, add_generation_prompt=True) == tok.decode(example["prompt_ids"])][0]]
        whole = tok(tok.apply_chat_template(row["prompt"] + row["gold"], tokenize=False), add_special_tokens=False)
        assert example["prompt_ids"] + example["extra_ids"][0] == whole["input_ids"]  # ends in <|end|>, the eos
