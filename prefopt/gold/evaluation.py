"""Evaluate a policy on the gold task: true reward, KL from the reference, gap to the exact frontier.

For fresh samples y ~ pi(. | x) on a set of prompts (the training prompts, and separately the held-out prompts as a
generalization number). The quoted titles are sections of docs/gold_task.md, 'Pitfalls':

- gold_reward:     mean R(x, y), with its standard error gold_reward_se ('Sample enough': use >= 2,048 samples);
- sampled_kl:      mean over samples of log pi(y|x) - log pi_ref(y|x), completion tokens only (a Monte-Carlo
                   KL(pi || pi_ref); single terms can be negative, only the mean is a KL). In a run, pi_ref is the
                   task's reference (the frontier's anchor), whatever the run's own reference is: a weak start
                   (`gold_weak`) or a reference reset to the policy mid-run moves the run's reference, not the axis;
- frontier_reward: the best reward any policy reaches at that KL (`gold_task.frontier_reward_at_kl`, KL
                   clamped at 0), and frontier_gap = frontier_reward - gold_reward ('Over-optimization shows in
                   the frontier gap': it exposes over-optimization that reward alone hides);
- mean_length, short_fraction (< 4 words), long_fraction (> 12 words), distinct_ratio, eos_rate: degeneration
  signals ('Watch length and degeneration').

Why a loss loses (diagnostics from the same samples and the same sampling pass: no extra forward):

- outside_support_fraction: the fraction of samples outside the base distribution's support (`outside_support`:
  not 4..12 words, a token that is not a content word, or no <eos>), where no KL-regularized optimum of the
  base puts any mass: the frontier cannot be reached from there;
- outside_support_kl_share: sum of log pi - log pi_ref over those samples / the sum over all samples (`kl_share`):
  the share of sampled_kl spent outside the support; 0 when no KL was spent (sampled_kl <= KL_FLOOR, 1e-4 nats:
  below it the sum is float rounding); single terms can be negative, so the share can fall outside [0, 1];
- entropy, top_token_prob: the policy's temperature-1 next-token entropy (nats) and the probability of its most
  likely next token, averaged over all generated positions of all samples pooled (every drawn token, <eos>
  included): a collapsing, "squeezed" distribution (Ren and Sutherland 2024, arXiv 2407.10490) lowers the one and
  raises the other.

Why the training prompts: 'Evaluate on fresh samples for the training prompts'. Deviation to keep in mind: the
frontier is measured from the base distribution while sampled_kl is from the reference; they differ by
KL(base || ref) ~ 0.02 nats. A response that reaches `max_new_tokens` without <eos> is scored as the truncated
prefix (no forced <eos>, 'KL bookkeeping'), under both models alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefopt.gold import task
from prefopt.gold.build import ensure_reference, load_reference
from prefopt.gold.sampling import Response, sample_responses, score_responses

log = logging.getLogger(__name__)
SHORT_WORDS = 4  # fewer words than the base's minimum length counts as "short"
# Below this mean log-ratio (nats) no KL was spent: with policy = reference the sampling pass's and the scoring pass's
# float32 log-probs differ by rounding (~1e-6), and a share of that noise would be a meaningless number.
KL_FLOOR = 1e-4
CONTENT = frozenset(task.CONTENT_WORDS)  # the only tokens the base distribution ever emits (besides <eos>)
SCORE_CHUNK = 512  # responses per reference forward in the evaluation (sorted by length)


def evaluate_policy(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    topics: Sequence[str],
    num_samples: int = 2048,
    seed: int = 0,
    max_new_tokens: int = 16,
) -> dict[str, float]:
    """Gold-task metrics of `policy` on fresh temperature-1 samples, spread evenly over `topics`.

    num_samples is rounded up to a multiple of len(topics). Sampling uses its own generator seeded by `seed`
    (the global RNG is untouched), so equal seeds give comparable numbers across training steps.
    """
    per_topic = math.ceil(num_samples / len(topics))
    generator = torch.Generator().manual_seed(seed)
    responses, policy_logps, stats = sample_responses(policy, tokenizer, topics, per_topic, generator,
                                                      max_new_tokens=max_new_tokens, return_logps=True,
                                                      return_token_stats=True)
    logratio = policy_logps - reference_logps(reference, tokenizer, responses)
    rewards = np.array([task.gold_reward(topic, words) for topic, words, _ in responses])
    lengths = np.array([len(words) for _, words, _ in responses])
    # An empty response has no words; count its distinct ratio as 0 (degenerate) rather than drop it.
    distinct = np.array([len(set(words)) / max(len(words), 1) for _, words, _ in responses])
    kl = float(logratio.double().mean())
    reward = float(rewards.mean())
    frontier = task.frontier_reward_at_kl(max(kl, 0.0))
    outside = outside_support(responses)
    positions = max(float(stats.positions.sum()), 1.0)  # >= 1 per response unless max_new_tokens is 0
    return {
        "gold_reward": reward,
        "gold_reward_se": float(rewards.std(ddof=1) / math.sqrt(len(rewards))),
        "sampled_kl": kl,
        "frontier_reward": frontier,
        "frontier_gap": frontier - reward,
        "mean_length": float(lengths.mean()),
        "short_fraction": float((lengths < SHORT_WORDS).mean()),
        "distinct_ratio": float(distinct.mean()),
        "eos_rate": float(np.mean([ended for _, _, ended in responses])),
        "long_fraction": float((lengths > task.MAX_LEN).mean()),
        "outside_support_fraction": float(outside.mean()),
        "outside_support_kl_share": kl_share(logratio, outside),
        "entropy": float(stats.entropy.double().sum()) / positions,
        "top_token_prob": float(stats.top_prob.double().sum()) / positions,
    }


def outside_support(responses: Sequence[Response]) -> np.ndarray:
    """(N,) bool: True for a response the base distribution cannot produce, i.e. one with no <eos> (it reached
    `max_new_tokens`), with a length outside task.MIN_LEN..task.MAX_LEN words, or with any token that is not a
    content word (a special token, the ':' separator). For ended responses, exactly those with
    task.base_logprobs = -inf.
    """
    return np.array([not ended or not task.MIN_LEN <= len(words) <= task.MAX_LEN or not CONTENT.issuperset(words)
                     for _, words, ended in responses], dtype=bool)


def kl_share(logratio: torch.Tensor, mask: np.ndarray, floor: float = KL_FLOOR) -> float:
    """sum(logratio[mask]) / sum(logratio): the share of the sampled KL carried by the masked samples; 0 when the
    mean log-ratio is <= `floor` nats (no KL spent, so nothing to share; with floor 0, when the total is <= 0).
    logratio: (N,) log pi - log pi_ref; mask: (N,) bool."""
    values = logratio.double()
    total = float(values.sum())
    return float(values[torch.as_tensor(mask, dtype=torch.bool)].sum()) / total if total > floor * len(values) else 0.0


def reference_logps(reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, responses: list) -> torch.Tensor:
    """`score_responses` under the reference, in chunks of similar lengths (sorted, then put back in order): the
    padding that a chunk of mixed lengths carries to its longest response is most of a full chunk's positions."""
    order = sorted(range(len(responses)), key=lambda i: len(responses[i][1]) + responses[i][2])
    scored = score_responses(reference, tokenizer, [responses[i] for i in order], batch_size=SCORE_CHUNK)
    out = torch.empty_like(scored)
    out[torch.tensor(order, dtype=torch.long)] = scored
    return out


class GoldTaskEvaluation(L.Callback):
    """Logs `evaluate_policy` at the end of every validation epoch (not during the sanity check).

    Metrics go to ``val/gold/<key>`` (fresh samples on the training prompts) and ``val/gold_heldout/<key>``
    (the held-out prompts). Expects ``pl_module.policy`` (an HF causal LM) and ``trainer.datamodule.tokenizer``;
    the KL is measured from the task's reference (`anchor`), not from ``pl_module.reference``. Every rank computes the same numbers from the same
    seed, so ``sync_dist`` averaging is a no-op that keeps the loggers consistent.
    """

    def __init__(self, num_samples: int = 2048, max_new_tokens: int = 16, seed: int = 1234) -> None:
        """
        Args:
            num_samples: fresh samples per prompt set; at 2,048 the reward's standard error is ~0.027
                (R has sd 1.24 under the reference); the same `seed` at every step keeps the samples of
                nearby checkpoints correlated, so step-to-step changes are less noisy than that.
            max_new_tokens: sampling cap; base responses need at most 13 (12 words and <eos>).
            seed: the evaluation generator's seed, the same at every step so evaluations are comparable.
        """
        super().__init__()
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.active = True  # set per fit in `setup`
        self._anchor: PreTrainedModel | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """On for the built-in task's data only: its prompts, reward and frontier mean nothing for other data."""
        datamodule = trainer.datamodule
        self.active = bool(getattr(datamodule, "builtin_task", False))
        if not self.active and trainer.is_global_zero:
            dataset = getattr(getattr(datamodule, "hparams", None), "dataset", None)
            log.info("the built-in task's evaluation (val/gold/*) is off: data.dataset is %r, not the built-in task", dataset)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.active:
            return
        tokenizer, anchor = trainer.datamodule.tokenizer, self.anchor(pl_module.policy)
        for prefix, topics in (("val/gold", task.TRAIN_TOPICS), ("val/gold_heldout", task.HELDOUT_TOPICS)):
            metrics = evaluate_policy(
                pl_module.policy, anchor, tokenizer, topics,
                num_samples=self.num_samples, seed=self.seed, max_new_tokens=self.max_new_tokens,
            )
            for key, value in metrics.items():
                pl_module.log(f"{prefix}/{key}", value, sync_dist=True)

    def anchor(self, policy: PreTrainedModel) -> PreTrainedModel:
        """The task's reference (`ensure_reference`, the pairs' source), which the frontier is measured from, on the
        policy's device and in its dtype: for a run that starts from it (`model.model: gold`) the same weights as
        the run's reference, so the numbers are those a KL to the run's reference gives."""
        if self._anchor is None:
            self._anchor = load_reference(ensure_reference())[0]
        weight = next(policy.parameters())
        return self._anchor.to(device=weight.device, dtype=weight.dtype)
