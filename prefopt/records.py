"""The log-prob records that every loss reads.

The LightningModule computes these once per step, in one place (`prefopt.logps`), the same way for every
loss, and hands them to the loss function. A loss never calls a model: it is a pure function of a record
and its float hyperparameters.

Conventions (docs/loss_pitfalls.md, 'Notation'):
- a `*_logps` field is the *sum* over completion tokens of log pi(y_t | x, y_<t); the prompt is excluded
  (`policy_prompt_logps`, the prompt's own sum, is the exception);
- a `*_lengths` field is the completion token count |y| as a float tensor (a loss that wants averages
  divides by it);
- `*_shared_logps` is the same sum restricted to the first min(|y_w|, |y_l|) completion tokens of the pair
  (what LD-DPO needs); equal to the full sum for the shorter response;
- every tensor is (B,) and lies on the same device; `ref_*` fields are None when the loss does not need a
  reference and none was computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs of a batch of (prompt, chosen, rejected) pairs; every field is (B,)."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    policy_chosen_shared_logps: Tensor | None = None
    policy_rejected_shared_logps: Tensor | None = None
    ref_chosen_shared_logps: Tensor | None = None
    ref_rejected_shared_logps: Tensor | None = None
    # Sum over completion tokens of KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t)) between the reference's and the policy's
    # next-token distributions (TDPO's sequential KL), with the policy's gradient; needs both models' full logits.
    chosen_seq_kl: Tensor | None = None
    rejected_seq_kl: Tensor | None = None
    # Running mean (over training so far) of the log-ratios r = logp - ref_logp of all responses, detached;
    # a scalar tensor. BCO's reward shift is beta times this. Filled by the loss's running state
    # (`prefopt.losses.state`), not by the scorer.
    running_logratio_mean: Tensor | None = None
    # Exponential moving averages (over training steps, from 0) of a training batch's mean and standard deviation of a
    # pair margin over all ranks: of h = r_w - r_l (`margin_ema_*`: beta-DPO's threshold M_0 = beta * mean and its
    # filter's spread) and of r_w/|y_w| - r_l/|y_l| (`avg_margin_ema_*`: alpha-DPO's normalization). Detached scalars,
    # filled by the loss's running state (`prefopt.losses.state.MarginMoments`).
    margin_ema_mean: Tensor | None = None
    margin_ema_std: Tensor | None = None
    avg_margin_ema_mean: Tensor | None = None
    avg_margin_ema_std: Tensor | None = None
    # (B,) bool: the pairs a loss's running filter keeps this training step (beta-DPO's Gaussian filter,
    # `prefopt.losses.state.GaussianPairFilter`); None keeps every pair (validation).
    kept_pairs: Tensor | None = None
    # The data's scalar score of each response, not a log-prob: the built-in task's exact gold reward, or a dataset's
    # score columns (`data.columns`: chosen_score, rejected_score). Read by the losses that use reward values (ODPO,
    # reward-aware PO, DPO with ties); no gradient.
    chosen_scores: Tensor | None = None
    rejected_scores: Tensor | None = None
    # Per-token quantities beyond the label log-probs (`prefopt.logps.token_fields`), each filled only when a loss
    # reads it. WPO's aligned sums, detached: sum over completion tokens of log pi(y_t|.) - log sum_v pi(v|.)^2.
    policy_chosen_aligned_logps: Tensor | None = None
    policy_rejected_aligned_logps: Tensor | None = None
    # SamPO's down-sampled sums: over a fixed pseudo-random subset of min(|y_w|, |y_l|) completion tokens of each
    # response, the same tokens for policy and reference (`prefopt.logps.sampled_mask`, keyed by the example index).
    policy_chosen_sampled_logps: Tensor | None = None
    policy_rejected_sampled_logps: Tensor | None = None
    ref_chosen_sampled_logps: Tensor | None = None
    ref_rejected_sampled_logps: Tensor | None = None
    # The prompt's summed log-prob under the policy (tokens 2..|x|, each given its prefix; with gradient) and its count
    # |x| - 1 (the first token predicts nothing): ORPO's NLL over prompt and completion, as TRL and its authors' code.
    policy_prompt_logps: Tensor | None = None
    prompt_lengths: Tensor | None = None
    # The fraction of the run's optimizer steps done before this step, in [0, 1): a detached scalar for a loss whose
    # hyperparameter follows a schedule over training (DPO-Shift's linear f(lambda)); filled by `TrainingProgress`.
    training_progress: Tensor | None = None
    # The data's further responses to each pair's prompt (`data.extras`): M per pair, the same M for every pair, all
    # (B, M). Their summed completion log-probs under the policy (with gradient) and the reference, their token counts,
    # and their scores (the data's `extra_scores`; on the built-in task, the gold rewards). TPO reads one gold response
    # (M = 1), InfoNCA with K responses reads K - 2 scored ones besides the pair.
    policy_extra_logps: Tensor | None = None
    ref_extra_logps: Tensor | None = None
    extra_lengths: Tensor | None = None
    extra_scores: Tensor | None = None

    def replace(self, **changes: Tensor | None) -> PairLogps:
        return dataclasses.replace(self, **changes)

    @property
    def num_pairs(self) -> float:
        """The pairs this record scores: the throughput's unit, whatever the batch's row layout."""
        return float(self.policy_chosen_logps.shape[0])

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None and self.ref_rejected_logps is not None

    def chosen_logratios(self) -> Tensor:
        """r_w = logp(y_w) - ref_logp(y_w), shape (B,)."""
        assert self.ref_chosen_logps is not None, "this loss needs reference log-probs"
        return self.policy_chosen_logps - self.ref_chosen_logps

    def rejected_logratios(self) -> Tensor:
        """r_l = logp(y_l) - ref_logp(y_l), shape (B,)."""
        assert self.ref_rejected_logps is not None, "this loss needs reference log-probs"
        return self.policy_rejected_logps - self.ref_rejected_logps

    def margins(self) -> Tensor:
        """h = r_w - r_l, the log-ratio margin in nats, shape (B,)."""
        return self.chosen_logratios() - self.rejected_logratios()

    def avg_margins(self) -> Tensor:
        """r_w/|y_w| - r_l/|y_l|: the margin of per-token log-ratios, shape (B,); empty completions count as 1 token."""
        chosen = self.chosen_logratios() / self.chosen_lengths.clamp(min=1)
        return chosen - self.rejected_logratios() / self.rejected_lengths.clamp(min=1)


@dataclass(frozen=True)
class UnpairedLogps:
    """Summed completion log-probs of a batch of (prompt, completion, desirable?) rows; every field is (B,).

    `policy_kl_logps` / `ref_kl_logps` score *mismatched* (prompt i, completion j != i) rows of the same batch:
    KTO estimates its reference point z0 = KL(pi || pi_ref) from them.
    """

    policy_logps: Tensor
    lengths: Tensor
    desirable: Tensor  # (B,) bool
    ref_logps: Tensor | None = None
    policy_kl_logps: Tensor | None = None
    ref_kl_logps: Tensor | None = None

    def replace(self, **changes: Tensor | None) -> UnpairedLogps:
        return dataclasses.replace(self, **changes)

    @property
    def num_pairs(self) -> float:
        """Pair equivalents: two scored rows (not KTO's mismatched KL rows) count as one pair, so that paired and
        unpaired runs on the same pairs report comparable throughputs."""
        return self.policy_logps.shape[0] / 2

    def logratios(self) -> Tensor:
        """r = logp(y) - ref_logp(y), shape (B,)."""
        assert self.ref_logps is not None, "this loss needs reference log-probs"
        return self.policy_logps - self.ref_logps
