"""The built-in gold-reward task: its vocabulary, base distribution, gold reward and exact KL frontier.

A controlled preference task whose true reward is known exactly (design and pitfalls: docs/gold_task.md):

- A sequence is ``<bos> TOPIC : w1 ... wL <eos>``; the prompt is ``"{topic} :"``.
- Base distribution pi_base(y | topic): L ~ Uniform{4..12}; a component c in {positive-leaning,
  negative-leaning, mixed} with probability 1/3 each; given c, words are i.i.d. with category weights
  (positive, negative, neutral, own topic, other topics) from `CATEGORY_WEIGHTS`, uniform within a category.
  pi_base(y) = p(L) * sum_c 1/3 * prod_i q_c(w_i)   (the mixture is marginalized exactly).
- Gold reward: R(topic, y) = 3 (n_pos - n_neg) / L + 1[topic in y], in [-3, 3.75]; mean 0.38 under the base.
  It is length-normalized, so it does not reward length.
- Exact frontier. For a temperature b > 0 the KL-regularized optimum is pi*_b ∝ pi_base exp(R / b). Because
  R depends only on counts, pi*_b can be summarized over the 1,785 count compositions
  (L, n_pos, n_neg, n_own, n_rest): with P(k) the base probability of composition k,
      Z(b) = sum_k P(k) exp(R_k / b),   E*[R] = sum_k P(k) exp(R_k / b) R_k / Z,   KL*(b) = E*[R] / b - log Z.
  (log pi*/pi_base = R/b - log Z.) Sweeping b traces the best reward any policy can reach at each KL from
  the base: the frontier that every run is compared against. DPO with Bradley-Terry labels at temperature T
  has its population optimum at b = T * beta, so a DPO run also has an exact target point.

Deliberate choices:
- The frontier is measured from the *base* distribution, while runs measure KL from the fine-tuned
  reference; the reference is trained to KL(base || ref) ~ 0.02 nats, which is the size of that mismatch.
- The reward is defined for any response length (including lengths outside 4..12 and responses holding
  non-content tokens, which count as neither positive nor negative); an empty response gets R = 0.
- No global RNG anywhere: samplers take an explicit `torch.Generator`, so evaluation can never perturb a
  training run's random stream.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# Vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SEP = ":"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
POSITIVE: tuple[str, ...] = ("good", "great", "love", "fun", "nice", "best", "happy", "superb")
NEGATIVE: tuple[str, ...] = ("bad", "awful", "hate", "dull", "poor", "worst", "sad", "boring")
NEUTRAL: tuple[str, ...] = ("the", "a", "it", "was", "and", "very", "quite", "so")
TOPICS: tuple[str, ...] = (
    "film", "book", "food", "music", "game", "trip", "phone", "car", "hotel", "show", "song", "class",
)
# Prompts used to train (and to evaluate on fresh samples: docs/gold_task.md, 'Evaluate on fresh samples for the
# training prompts') and prompts kept for generalization.
TRAIN_TOPICS: tuple[str, ...] = TOPICS[:8]
HELDOUT_TOPICS: tuple[str, ...] = TOPICS[8:]

# Token ids are positions in VOCAB: pad 0, bos 1, eos 2, unk 3, ":" 4, then the 36 content words.
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + (SEP,) + POSITIVE + NEGATIVE + NEUTRAL + TOPICS
CONTENT_WORDS: tuple[str, ...] = POSITIVE + NEGATIVE + NEUTRAL + TOPICS
_CONTENT_INDEX: dict[str, int] = {w: i for i, w in enumerate(CONTENT_WORDS)}
_POSITIVE_SET, _NEGATIVE_SET = frozenset(POSITIVE), frozenset(NEGATIVE)

# ----------------------------------------------------------------------------------------------------------
# Base distribution

MIN_LEN, MAX_LEN = 4, 12
COMPONENT_WEIGHTS: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
# Per component: weights of (positive, negative, neutral, own topic, other topics); each row sums to 1.
CATEGORY_WEIGHTS: tuple[tuple[float, float, float, float, float], ...] = (
    (0.45, 0.10, 0.30, 0.06, 0.09),  # positive-leaning
    (0.10, 0.45, 0.30, 0.06, 0.09),  # negative-leaning
    (0.22, 0.22, 0.41, 0.06, 0.09),  # mixed
)
_LOG_P_LEN = -math.log(MAX_LEN - MIN_LEN + 1)


def prompt_text(topic: str) -> str:
    """The prompt of a topic, e.g. ``"film :"`` (the tokenizer adds ``<bos>`` in front)."""
    return f"{topic} {SEP}"


@lru_cache(maxsize=None)
def _word_probs(topic: str) -> np.ndarray:
    """q_c(w) for the prompt `topic`: (3, 36) over CONTENT_WORDS, each row sums to 1."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; valid topics: {', '.join(TOPICS)}")
    probs = np.zeros((len(CATEGORY_WEIGHTS), len(CONTENT_WORDS)))
    n_pos, n_neg, n_neu = len(POSITIVE), len(NEGATIVE), len(NEUTRAL)
    topic_offset = n_pos + n_neg + n_neu
    for c, (w_pos, w_neg, w_neu, w_own, w_other) in enumerate(CATEGORY_WEIGHTS):
        probs[c, :n_pos] = w_pos / n_pos
        probs[c, n_pos : n_pos + n_neg] = w_neg / n_neg
        probs[c, n_pos + n_neg : topic_offset] = w_neu / n_neu
        probs[c, topic_offset:] = w_other / (len(TOPICS) - 1)
        probs[c, topic_offset + TOPICS.index(topic)] = w_own
    return probs


def sample_base(topics: Sequence[str], generator: torch.Generator) -> list[list[str]]:
    """Draw one response from pi_base(. | topic) for each entry of `topics` (repeat a topic for more)."""
    n = len(topics)
    table = torch.from_numpy(np.stack([_word_probs(t) for t in TOPICS]))  # (12, 3, 36)
    topic_idx = torch.tensor([TOPICS.index(t) for t in topics], dtype=torch.long)  # (n,)
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n,), generator=generator)  # (n,)
    comp = torch.multinomial(torch.tensor(COMPONENT_WEIGHTS), n, replacement=True, generator=generator)  # (n,)
    # Draw MAX_LEN words per row and keep the first L: words are i.i.d. given the component.
    words = torch.multinomial(table[topic_idx, comp], MAX_LEN, replacement=True, generator=generator)  # (n, 12)
    return [[CONTENT_WORDS[j] for j in row[:length]] for row, length in zip(words.tolist(), lengths.tolist())]


def base_logprob_indices(topic: str, word_ids: np.ndarray) -> np.ndarray:
    """Exact log pi_base(y | topic) for a block of equal-length responses given as content-word indices.

    word_ids: (N, L) integer indices into CONTENT_WORDS. Returns (N,) float64; -inf when L is outside 4..12.
    """
    word_ids = np.asarray(word_ids)
    n, length = word_ids.shape
    if not MIN_LEN <= length <= MAX_LEN:
        return np.full(n, -np.inf)
    log_q = np.log(_word_probs(topic))  # (3, 36)
    per_comp = log_q[:, word_ids].sum(axis=2) + np.log(COMPONENT_WEIGHTS)[:, None]  # (3, N)
    return _LOG_P_LEN + np.logaddexp.reduce(per_comp, axis=0)  # (N,)


def base_logprobs(topic: str, responses: Sequence[Sequence[str]]) -> np.ndarray:
    """Exact log pi_base(y | topic) for many responses (lists of words); -inf outside the base's support."""
    out = np.full(len(responses), -np.inf)
    by_length: dict[int, list[int]] = {}
    for i, words in enumerate(responses):
        if all(w in _CONTENT_INDEX for w in words):  # a non-content token has base probability 0
            by_length.setdefault(len(words), []).append(i)
    for length, rows in by_length.items():
        ids = np.array([[_CONTENT_INDEX[w] for w in responses[i]] for i in rows], dtype=np.int64)
        out[rows] = base_logprob_indices(topic, ids.reshape(len(rows), length))
    return out


def base_logprob(topic: str, words: Sequence[str]) -> float:
    """Exact log pi_base(words | topic), the mixture over components marginalized; -inf outside the support."""
    return float(base_logprobs(topic, [words])[0])


# ----------------------------------------------------------------------------------------------------------
# Gold reward


def gold_reward(topic: str, words: Sequence[str]) -> float:
    """R = 3 (n_pos - n_neg) / L + 1[topic in words]; 0 for an empty response (no topic bonus either).

    Defined for any length L >= 1; tokens that are neither positive nor negative (neutral words, topics,
    even special tokens a policy might emit) only count towards L.
    """
    if not words:
        return 0.0
    n_pos = sum(w in _POSITIVE_SET for w in words)
    n_neg = sum(w in _NEGATIVE_SET for w in words)
    return 3.0 * (n_pos - n_neg) / len(words) + float(topic in words)


# ----------------------------------------------------------------------------------------------------------
# Exact frontier


@dataclass(frozen=True)
class Compositions:
    """Every count composition k = (L, n_pos, n_neg, n_own, n_rest) of a base response, as (K,) arrays.

    "own" is the prompt's topic word; "rest" is neutral words and other topics (they do not affect R).
    By symmetry the table is the same for every topic.
    """

    length: np.ndarray
    n_pos: np.ndarray
    n_neg: np.ndarray
    n_own: np.ndarray
    log_prob: np.ndarray  # log P_base(k), logsumexp over k is 0
    reward: np.ndarray  # R_k


@lru_cache(maxsize=1)
def compositions() -> Compositions:
    """Enumerate the 1,785 count compositions with their exact base probability and gold reward."""
    rows = [
        (length, n_pos, n_neg, n_own)
        for length in range(MIN_LEN, MAX_LEN + 1)
        for n_pos, n_neg, n_own in itertools.product(range(length + 1), repeat=3)
        if n_pos + n_neg + n_own <= length
    ]
    length, n_pos, n_neg, n_own = (np.array(col, dtype=np.int64) for col in zip(*rows))  # (K,) each
    n_rest = length - n_pos - n_neg - n_own
    counts = np.stack([n_pos, n_neg, n_own, n_rest])  # (4, K)
    lgamma = np.vectorize(math.lgamma)
    log_multinomial = lgamma(length + 1) - lgamma(counts + 1).sum(axis=0)  # (K,)
    # Category probabilities (pos, neg, own, rest) of each component: (3, 4).
    cat = np.array([[w[0], w[1], w[3], w[2] + w[4]] for w in CATEGORY_WEIGHTS])
    per_comp = np.log(COMPONENT_WEIGHTS)[:, None] + np.log(cat) @ counts  # (3, K)
    log_prob = _LOG_P_LEN + log_multinomial + np.logaddexp.reduce(per_comp, axis=0)  # (K,)
    reward = 3.0 * (n_pos - n_neg) / length + (n_own > 0)
    return Compositions(length, n_pos, n_neg, n_own, log_prob, reward.astype(np.float64))


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def frontier_curve(bs: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (KL*(b), E*[R](b)) of pi*_b ∝ pi_base exp(R / b) for each b > 0; b = inf gives the base.

    Returns two float64 arrays shaped like `bs`. KL is in nats per sequence, from pi_base.
    """
    b = np.asarray(bs, dtype=np.float64)
    if np.any(b <= 0):
        raise ValueError("every b must be > 0")
    comp = compositions()
    inv_b = (1.0 / b).reshape(-1, 1)  # (nb, 1); b = inf gives 0, the base itself
    logits = comp.log_prob + comp.reward * inv_b  # (nb, K)
    log_z = _logsumexp(logits)  # (nb,)
    p = np.exp(logits - log_z[:, None])  # (nb, K), rows sum to 1
    reward = p @ comp.reward  # (nb,)
    # KL = E*[log pi*/pi_base] = E*[R]/b - log Z; clamp the ~1e-16 rounding below 0 at huge b.
    kl = np.maximum(reward * inv_b[:, 0] - log_z, 0.0)
    return kl.reshape(b.shape), reward.reshape(b.shape)


def best_of_n_curve(ns: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (KL, E[R]) of best-of-N sampling from pi_base for each N >= 1 (ties broken at random).

    With the reward levels r_1 < ... < r_m, p_j = P_base(R = r_j) and F_j = p_1 + ... + p_j, best-of-N lands on level j
    with probability q_j = F_j^N - F_{j-1}^N and, within a level, follows pi_base; so KL(bon || pi_base) =
    sum_j q_j log(q_j / p_j) and E[R] = sum_j q_j r_j. The textbook log N - (N - 1)/N is only an upper bound on it
    (equal when every response has its own reward).
    """
    comp = compositions()
    levels, level = np.unique(np.round(comp.reward, 9), return_inverse=True)  # 3(n_pos - n_neg)/L: exact rationals
    p = np.bincount(level, weights=np.exp(comp.log_prob), minlength=len(levels))
    cdf = np.minimum(np.cumsum(p) / p.sum(), 1.0)
    below = np.concatenate([[0.0], cdf[:-1]])
    n = np.asarray(ns, dtype=np.float64).reshape(-1, 1)  # (k, 1)
    if np.any(n < 1):
        raise ValueError("every N must be >= 1")
    q = cdf**n - below**n  # (k, m)
    kl = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0) / p), 0.0).sum(axis=1)
    return np.maximum(kl, 0.0).reshape(np.shape(ns)), (q @ levels).reshape(np.shape(ns))


def frontier_point(b: float) -> tuple[float, float]:
    """(KL*, E*[R]) at temperature b; for DPO with label temperature T the target is b = T * beta."""
    kl, reward = frontier_curve([b])
    return float(kl[0]), float(reward[0])


def base_mean_reward() -> float:
    """E_base[R], the frontier at KL 0 (about 0.38)."""
    comp = compositions()
    return float(np.exp(comp.log_prob) @ comp.reward)


# Bisection range on log b: at b = 1e-3 the tilt already puts all but e^-20 of the mass on the maximum
# reward; at b = 1e6 the KL is ~1e-12, indistinguishable from the base.
_LOG_B_MIN, _LOG_B_MAX = math.log(1e-3), math.log(1e6)


def frontier_reward_at_kl(kl: float) -> float:
    """The best expected gold reward at KL(pi || pi_base) = kl: invert KL*(b) by bisection on log b.

    KL*(b) decreases and E*[R](b) decreases as b grows, so the frontier is monotone in KL. kl <= 0 gives the
    base mean reward; a kl beyond the largest reachable KL (-log P_base(R = max)) gives the maximum reward.
    """
    if kl <= 0.0:
        return base_mean_reward()
    lo, hi = _LOG_B_MIN, _LOG_B_MAX  # KL(e^lo) >= kl >= KL(e^hi) is kept invariant
    kl_lo, reward_lo = frontier_point(math.exp(lo))
    if kl >= kl_lo:
        return reward_lo
    for _ in range(60):  # the interval shrinks 2^60-fold: far below float precision of the reward
        mid = 0.5 * (lo + hi)
        kl_mid, _ = frontier_point(math.exp(mid))
        if kl_mid >= kl:
            lo = mid
        else:
            hi = mid
    return frontier_point(math.exp(0.5 * (lo + hi)))[1]
