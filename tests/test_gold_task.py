"""The built-in gold task: reward arithmetic, exact base probabilities, the exact frontier, the reference,
the pair files, sampling/scoring and the evaluation callback. Offline; one reference build per session."""

from __future__ import annotations

import concurrent.futures
import copy
import itertools
import json
import math
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from prefopt.gold import build as gold_build, task
from prefopt.gold.pairs import ensure_pairs
from prefopt.gold.build import (
    ReferenceRecipe,
    build_tokenizer,
    ensure_reference,
    load_reference,
    reference_key,
    sample_responses,
    score_responses,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: two threads gain little and stall badly when another process holds a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(gold_reference_dir):
    return load_reference(gold_reference_dir)  # (model, tokenizer)


def base_logprobs(responses) -> np.ndarray:
    """Exact log pi_base of sampled responses; one cut at the length cap (no <eos>) is outside the base."""
    return np.array([task.base_logprob(t, w) if ended else -math.inf for t, w, ended in responses])


# ------------------------------------------------------------------------------------------- definition


def test_vocabulary_and_topic_split():
    assert len(task.VOCAB) == 41 == len(set(task.VOCAB))  # docs/gold_task.md: 36 content words, 4 special tokens, ':'
    assert task.VOCAB[:5] == ("<pad>", "<bos>", "<eos>", "<unk>", ":")
    assert set(task.TRAIN_TOPICS) | set(task.HELDOUT_TOPICS) == set(task.TOPICS)
    assert len(task.TRAIN_TOPICS) == 8 and not set(task.TRAIN_TOPICS) & set(task.HELDOUT_TOPICS)
    assert task.prompt_text("film") == "film :"


@pytest.mark.parametrize(
    ("topic", "words", "expected"),
    [
        ("film", ["good", "film", "was", "great"], 3 * 2 / 4 + 1),  # 2 positive of 4, topic mentioned
        ("film", ["bad", "the", "dull", "awful"], 3 * -3 / 4),  # 3 negative of 4
        ("book", ["good", "film", "bad", "so"], 0.0),  # balanced; "film" is not this prompt's topic
        ("car", ["car"] * 12, 1.0),  # topic bonus counts once
        ("film", ["good", "good"], 3.0),  # any length is scored, even outside 4..12
        ("film", [], 0.0),  # empty: 0, no topic bonus
        ("film", ["great"] * 11 + ["film"], 3 * 11 / 12 + 1),  # the maximum, 3.75
    ],
)
def test_gold_reward_hand_checked(topic, words, expected):
    assert task.gold_reward(topic, words) == pytest.approx(expected)


def test_base_logprob_hand_checked():
    # "good film the bad" under topic film: per component q(good) q(film) q(the) q(bad), then the mixture.
    comps = [(0.45, 0.10, 0.30), (0.10, 0.45, 0.30), (0.22, 0.22, 0.41)]  # (pos, neg, neutral) weights
    mix = sum((p / 8) * 0.06 * (n0 / 8) * (q / 8) for p, q, n0 in comps) / 3
    assert task.base_logprob("film", ["good", "film", "the", "bad"]) == pytest.approx(math.log(mix / 9))
    assert task.base_logprob("film", ["good", "film", "the"]) == -math.inf  # L = 3 is outside 4..12
    assert task.base_logprob("film", ["good", ":", "the", "bad"]) == -math.inf  # not a content word


def test_base_logprob_sums_to_one_and_matches_the_compositions():
    """Exhaustively over all 36^4 responses of length 4: sum exp(logp) = P(L=4) = 1/9, and the mass of each
    (n_pos, n_neg, n_own) composition equals the frontier's composition table."""
    n = len(task.CONTENT_WORDS)
    ids = np.array(list(itertools.product(range(n), repeat=4)))  # (36^4, 4)
    prob = np.exp(task.base_logprob_indices("music", ids))
    assert prob.sum() == pytest.approx(1 / 9, rel=1e-9)
    pos = (ids < 8).sum(1)
    neg = ((ids >= 8) & (ids < 16)).sum(1)
    own = (ids == task.CONTENT_WORDS.index("music")).sum(1)
    mass = np.zeros((5, 5, 5))
    np.add.at(mass, (pos, neg, own), prob)
    comp = task.compositions()
    rows = comp.length == 4
    table = np.zeros((5, 5, 5))
    table[comp.n_pos[rows], comp.n_neg[rows], comp.n_own[rows]] = np.exp(comp.log_prob[rows])
    np.testing.assert_allclose(mass, table, rtol=1e-9, atol=1e-15)


def test_compositions_and_base_mean_reward():
    comp = task.compositions()
    p = np.exp(comp.log_prob)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    for length in range(task.MIN_LEN, task.MAX_LEN + 1):
        assert p[comp.length == length].sum() == pytest.approx(1 / 9, abs=1e-12)
    # By the pos/neg symmetry of the mixture only the topic bonus survives: E[R] = mean_L 1 - 0.94^L.
    expected = np.mean([1 - 0.94**length for length in range(4, 13)])
    assert task.base_mean_reward() == pytest.approx(expected, abs=1e-12)
    assert task.base_mean_reward() == pytest.approx(0.3826, abs=1e-4)


def test_base_sampler_matches_the_exact_distribution():
    g = torch.Generator().manual_seed(0)
    rng_before = torch.get_rng_state()
    samples = task.sample_base(["film"] * 20_000, g)
    assert torch.equal(rng_before, torch.get_rng_state())
    lengths = np.bincount([len(s) for s in samples], minlength=13)[4:]
    np.testing.assert_allclose(lengths / 20_000, 1 / 9, atol=0.012)  # ~5 sd of a binomial frequency
    rewards = np.array([task.gold_reward("film", s) for s in samples])
    assert abs(rewards.mean() - task.base_mean_reward()) < 4 * rewards.std() / math.sqrt(len(rewards))
    # The sampler and the exact log-prob agree on a single-sequence frequency: P(all four words are "the").
    p_the4 = math.exp(task.base_logprob("film", ["the"] * 4))
    counts = sum(s == ["the"] * 4 for s in task.sample_base(["film"] * 200_000, g))
    assert abs(counts / 200_000 - p_the4) < 5 * math.sqrt(p_the4 / 200_000)
    assert samples[:50] == task.sample_base(["film"] * 20_000, torch.Generator().manual_seed(0))[:50]


# ------------------------------------------------------------------------------------------- frontier


def test_frontier_is_normalized_monotone_and_starts_at_the_base():
    bs = np.geomspace(0.02, 100.0, 200)
    kl, reward = task.frontier_curve(bs)
    assert np.all(np.diff(kl) < 0) and np.all(np.diff(reward) < 0)  # larger b: less KL, less reward
    assert kl[-1] < 1e-3 and reward[-1] == pytest.approx(task.base_mean_reward(), abs=0.02)
    # KL from the closed form E*[R]/b - log Z equals the direct sum over the tilted distribution.
    comp = task.compositions()
    for b in (0.1, 0.5, 2.0):
        logits = comp.log_prob + comp.reward / b
        p = np.exp(logits - np.logaddexp.reduce(logits))
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        kl_b, reward_b = task.frontier_point(b)
        assert reward_b == pytest.approx(p @ comp.reward, abs=1e-10)
        assert kl_b == pytest.approx(np.sum(p * (np.log(p) - comp.log_prob)), abs=1e-9)


def test_frontier_reward_at_kl_inverts_the_curve():
    assert task.frontier_reward_at_kl(0.0) == task.frontier_reward_at_kl(-1.0) == task.base_mean_reward()
    for b in (0.1, 0.3, 1.0, 3.0):
        kl, reward = task.frontier_point(b)
        assert task.frontier_reward_at_kl(kl) == pytest.approx(reward, abs=1e-6)
    assert task.frontier_reward_at_kl(100.0) == pytest.approx(3.75)  # beyond reach: the maximum reward
    values = [task.frontier_reward_at_kl(k) for k in np.linspace(0.01, 8, 20)]
    assert np.all(np.diff(values) > 0)


def test_exact_frontier_agrees_with_importance_sampling(reference):
    """E*[R](b) by self-normalized importance sampling from the reference, w ∝ pi_base/pi_ref * exp(R/b).

    The pi_base/pi_ref factor (exact base log-prob, scored reference log-prob) makes the estimate unbiased
    up to O(1/n) for the base-tilted target even though ref != base. b in {0.5, 1, 2} keeps the effective
    sample size above ~1,500 of 20k (at b = 0.25 it falls to ~250 and the estimate gets noisy), so the SNIS
    standard error is ~0.02 or less against the 0.05 tolerance.
    """
    model, tok = reference
    responses = sample_responses(model, tok, task.TOPICS, 1700, torch.Generator().manual_seed(7))
    ref_lp = score_responses(model, tok, responses).double().numpy()
    base_lp = base_logprobs(responses)
    rewards = np.array([task.gold_reward(t, w) for t, w, _ in responses])
    for b in (0.5, 1.0, 2.0):
        log_w = base_lp - ref_lp + rewards / b
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        assert 1 / np.sum(w**2) > 1000
        assert np.sum(w * rewards) == pytest.approx(task.frontier_point(b)[1], abs=0.05)


# ------------------------------------------------------------------------------------------- reference


def test_reference_is_close_to_the_base(reference, gold_reference_dir):
    model, tok = reference
    meta = json.loads((gold_reference_dir / "prefopt_reference.json").read_text())
    assert meta["kl_base_ref"] < 0.05 and 70_000 < meta["num_parameters"] < 100_000
    # An independent estimate: KL(base || ref) = E_base[log pi_base - log pi_ref], fresh base samples.
    g = torch.Generator().manual_seed(123)
    topics = [task.TOPICS[i % 12] for i in range(6000)]
    words = task.sample_base(topics, g)
    responses = [(t, w, True) for t, w in zip(topics, words)]
    diff = base_logprobs(responses) - score_responses(model, tok, responses).double().numpy()
    assert diff.mean() < 0.05


def test_reference_is_cached_and_keyed_by_its_recipe(gold_reference_dir, tmp_path, monkeypatch):
    built = []
    real_build = gold_build._build_reference
    monkeypatch.setattr(gold_build, "_build_reference", lambda final, recipe: built.append(final) or real_build(final, recipe))
    assert ensure_reference(gold_reference_dir.parent) == gold_reference_dir
    assert built == []  # found in the cache, not rebuilt
    assert reference_key(ReferenceRecipe(steps=1501)) != reference_key(ReferenceRecipe())
    tiny = ReferenceRecipe(num_samples=512, steps=3, batch_size=16, kl_samples=64)
    # Two builders at once on a fresh cache (a grid's workers, parallel tests): one builds, the other waits for it.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(lambda _: ensure_reference(tmp_path, recipe=tiny), range(2)))
    tiny_dir = dirs[0]
    assert dirs == [tiny_dir, tiny_dir] and built == [tiny_dir]
    assert tiny_dir.name != gold_reference_dir.name and tiny_dir.name.endswith(reference_key(tiny))
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))  # the build's lock file stays
    assert left == [tiny_dir.name]  # no temp dir left behind
    model, tok = load_reference(tiny_dir)  # AutoModelForCausalLM / AutoTokenizer load it offline
    assert model.config.hidden_size == 64 and tok("film :")["input_ids"][0] == tok.bos_token_id


def test_tokenizer_behaviour_survives_save_and_reload(tmp_path, gold_reference_dir):
    from transformers import AutoTokenizer

    built = build_tokenizer()
    built.save_pretrained(tmp_path)
    for tok in (built, AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(gold_reference_dir)):
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        assert (bos, eos, pad) == (1, 2, 0) and tok.unk_token_id == 3
        vocab = tok.get_vocab()
        assert tok("film :")["input_ids"] == [bos, vocab["film"], vocab[":"]]
        assert tok("good film", add_special_tokens=False)["input_ids"] == [vocab["good"], vocab["film"]]
        assert tok("good zzz", add_special_tokens=False)["input_ids"] == [vocab["good"], tok.unk_token_id]
        assert tok.decode([bos, vocab["film"], vocab[":"], vocab["good"], eos], skip_special_tokens=True) == (
            "film : good"
        )


# ------------------------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_leaves_global_rng_and_mode_alone(reference):
    model, tok = reference
    model.train()
    rng_before = torch.get_rng_state()
    a = sample_responses(model, tok, ["film", "car"], 64, torch.Generator().manual_seed(3))
    b = sample_responses(model, tok, ["film", "car"], 64, torch.Generator().manual_seed(3))
    c = sample_responses(model, tok, ["film", "car"], 64, torch.Generator().manual_seed(4))
    score_responses(model, tok, a)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert model.training
    model.eval()
    assert a == b and a != c and len(a) == 128
    assert [t for t, _, _ in a] == ["film"] * 64 + ["car"] * 64
    capped = sample_responses(model, tok, ["film"], 32, torch.Generator().manual_seed(3), max_new_tokens=2)
    assert all(len(w) <= 2 for _, w, _ in capped) and not any(e for _, w, e in capped if len(w) == 2)


def test_scores_match_a_token_by_token_computation(reference):
    model, tok = reference
    responses = [("film", ["good", "film", "was", "great"], True), ("car", ["bad"] * 9, False), ("book", [], True)]
    batched = score_responses(model, tok, responses)
    for (topic, words, ended), score in zip(responses, batched):
        ids = tok(task.prompt_text(topic))["input_ids"] + tok.convert_tokens_to_ids(words)
        ids += [tok.eos_token_id] if ended else []
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)  # (T, V)
        expected = sum(float(logps[t - 1, ids[t]]) for t in range(3, len(ids)))  # completion tokens only
        assert float(score) == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------- pairs


def test_pairs_are_seeded_valid_and_cached(gold_reference_dir, tmp_path):
    def make(seed: int, where: str, temperature: float = 1.0):
        train, val = ensure_pairs(gold_reference_dir, seed, 20, 4, temperature, cache_dir=tmp_path / where)
        return train.read_text(), val.read_text(), train

    train_a, val_a, path_a = make(0, "a")
    train_b, val_b, _ = make(0, "b")
    train_c, val_c, _ = make(1, "a")
    assert (train_a, val_a) == (train_b, val_b)  # same seed, separate caches: identical
    assert train_a != train_c and val_a != val_c  # a new seed redraws the pairs
    assert make(0, "a")[2] == path_a  # cached
    rows = [json.loads(line) for line in train_a.splitlines()]
    assert len(rows) == 20 * 8 and len(val_a.splitlines()) == 4 * 8
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "topic"}
        assert row["topic"] in task.TRAIN_TOPICS and row["prompt"] == f"{row['topic']} :"
        assert row["chosen"] and row["rejected"]  # no empty completions
        assert row["chosen_reward"] == task.gold_reward(row["topic"], row["chosen"].split())
        assert row["rejected_reward"] == task.gold_reward(row["topic"], row["rejected"].split())
    hard = [json.loads(line) for line in make(0, "a", temperature=0.0)[0].splitlines()]
    assert all(r["chosen_reward"] >= r["rejected_reward"] for r in hard)  # T = 0: the gold order


# ------------------------------------------------------------------------------------------- evaluation


def test_evaluate_policy_on_the_reference_and_a_perturbed_policy(reference):
    from prefopt.gold.evaluation import evaluate_policy

    model, tok = reference
    rng_before = torch.get_rng_state()
    m = evaluate_policy(model, model, tok, task.TRAIN_TOPICS, num_samples=2048, seed=0)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert m["sampled_kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference
    assert abs(m["gold_reward"] - task.base_mean_reward()) < 4 * m["gold_reward_se"] + 0.02
    assert m["frontier_reward"] == pytest.approx(task.base_mean_reward(), abs=1e-3)
    assert m["frontier_gap"] == pytest.approx(m["frontier_reward"] - m["gold_reward"])
    assert 7.5 < m["mean_length"] < 8.5 and m["short_fraction"] < 0.02 and m["eos_rate"] > 0.99
    assert 0.8 < m["distinct_ratio"] < 0.95
    assert m == evaluate_policy(model, model, tok, task.TRAIN_TOPICS, num_samples=2048, seed=0)

    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    m2 = evaluate_policy(policy, model, tok, task.HELDOUT_TOPICS, num_samples=512, seed=0)
    assert m2["sampled_kl"] > 0.01 and m2["frontier_reward"] > task.base_mean_reward()


def test_the_evaluation_reads_the_policy_off_its_samples_and_scores_the_reference_sorted(reference):
    """The two evaluation levers change no number beyond float rounding: the policy's log-probs taken from the
    sampling pass equal a separate scoring forward, the samples are the same with or without them, and the
    reference scored in length-sorted chunks equals scoring in order."""
    from prefopt.gold.evaluation import reference_logps

    model, tok = reference
    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    responses, logps = sample_responses(policy, tok, task.TRAIN_TOPICS, 128, torch.Generator().manual_seed(5),
                                        max_new_tokens=6, return_logps=True)
    assert responses == sample_responses(policy, tok, task.TRAIN_TOPICS, 128, torch.Generator().manual_seed(5),
                                         max_new_tokens=6)
    assert any(not ended for _, _, ended in responses) and any(ended for _, _, ended in responses)  # both kinds
    assert torch.allclose(logps, score_responses(policy, tok, responses), atol=1e-4, rtol=0)
    assert torch.allclose(reference_logps(model, tok, responses), score_responses(model, tok, responses), atol=1e-4,
                          rtol=0)


def test_callback_logs_both_prompt_sets_and_skips_the_sanity_check(reference):
    from prefopt.gold.evaluation import GoldTaskEvaluation

    model, tok = reference
    logged: dict[str, float] = {}
    module = SimpleNamespace(policy=model, reference=model, log=lambda k, v, **_: logged.__setitem__(k, v))
    trainer = SimpleNamespace(sanity_checking=True, datamodule=SimpleNamespace(tokenizer=tok))
    callback = GoldTaskEvaluation(num_samples=64)
    callback.on_validation_epoch_end(trainer, module)
    assert logged == {}
    trainer.sanity_checking = False
    callback.on_validation_epoch_end(trainer, module)
    assert len(logged) == 28  # 14 metrics x 2 prompt sets
    assert {"val/gold/gold_reward", "val/gold_heldout/frontier_gap", "val/gold/sampled_kl"} <= set(logged)


def test_best_of_n_is_exact_below_the_textbook_bound_and_the_frontier():
    """N = 1 is the base; the exact KL sits below log N - (N-1)/N (levels are shared by many responses) and its reward
    below the frontier's at the same KL, the best any policy can do there; both grow with N."""
    import math

    import numpy as np

    from prefopt.gold.task import base_mean_reward, best_of_n_curve, frontier_reward_at_kl

    ns = [1, 2, 4, 16, 64, 256]
    kl, reward = best_of_n_curve(ns)
    assert kl[0] == 0.0 and abs(reward[0] - base_mean_reward()) < 1e-12
    for n, k, r in zip(ns[1:], kl[1:], reward[1:]):
        assert 0 < k < math.log(n) - (n - 1) / n
        assert r < frontier_reward_at_kl(k)
    assert np.all(np.diff(kl) > 0) and np.all(np.diff(reward) > 0)
    # two responses: q = F_j^2 - F_{j-1}^2 by hand from the level probabilities
    from prefopt.gold.task import compositions

    comp = compositions()
    levels, level = np.unique(np.round(comp.reward, 9), return_inverse=True)
    p = np.bincount(level, weights=np.exp(comp.log_prob))
    p = p / p.sum()
    cdf = np.cumsum(p)
    q = cdf**2 - np.concatenate([[0.0], cdf[:-1]]) ** 2
    assert abs(float(q @ levels) - reward[1]) < 1e-12 and abs(float((q * np.log(q / p)).sum()) - kl[1]) < 1e-12
