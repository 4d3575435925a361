"""The scoring boundary: one object turns a batch into the log-prob record that a loss reads.

The `Scorer` owns every speed and memory lever, so that nothing else in a run knows about them: the batch layout
(two rows per pair, or one prompt-shared row, `prefopt.fast.prefix_sharing`), the LM head (full logits, or label
positions only in chunks, `prefopt.fast.head`), the reference's source (a live forward, or the on-disk table read by
example index and field name, `prefopt.fast.reference_cache`), the trimmed last layer, and compilation. Their
switches are one config group, `model.scoring` (`ScoringOptions`); none changes a number beyond float rounding
(`tests/test_speed_levers.py` compares each with the plain path).

A loss declares the record fields it reads (`LossConfig.reads`); `check_fields` refuses, before any model loads, a
loss that reads a field these settings cannot produce, naming the loss, the field and the setting to change. Fields
beyond the sums are computed only for a loss that reads them: the per-token KL (both models' full distributions:
no chunked head, no cache), and WPO's aligned sums, SamPO's down-sampled sums and ORPO's prompt sums, which every
layout and head produces and the cache holds where they are the reference's (`tests/test_token_fields.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.fast.head import decoder_and_head, head_token_scores
from prefopt.fast.prefix_sharing import shared_token_scores, trim_last_layer
from prefopt.losses import LossConfig
from prefopt.logps import (
    TokenScores, forward_logits, pair_logps, response_sums, scores_from_logits, sequence_kl, token_fields, token_kl,
    unpaired_logps,
)
from prefopt.records import PairLogps, UnpairedLogps

# Per-token quantities beyond the label log-probs (`prefopt.logps.token_fields`), computed only when a loss reads
# them, in every layout and with every LM head: WPO's aligned sums, SamPO's down-sampled sums, ORPO's prompt sums.
ALIGNED = frozenset({"policy_chosen_aligned_logps", "policy_rejected_aligned_logps"})
SAMPLED = frozenset({"policy_chosen_sampled_logps", "policy_rejected_sampled_logps", "ref_chosen_sampled_logps",
                     "ref_rejected_sampled_logps"})
PROMPT = frozenset({"policy_prompt_logps", "prompt_lengths"})
# The further responses per pair (`data.extras`): scored on their own rows, in a plain forward (any LM head).
EXTRA = frozenset({"policy_extra_logps", "extra_lengths", "ref_extra_logps"})
# The fields a scorer can produce, by batch kind; DISTRIBUTION fields need both models' full next-token logits.
PAIR_FIELDS = frozenset({"policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths",
                         "policy_chosen_shared_logps", "policy_rejected_shared_logps", "ref_chosen_logps",
                         "ref_rejected_logps", "ref_chosen_shared_logps", "ref_rejected_shared_logps"}
                        ) | ALIGNED | SAMPLED | PROMPT | EXTRA
DISTRIBUTION = frozenset({"chosen_seq_kl", "rejected_seq_kl"})
# Fields the data carries as they are (no model involved): record field -> batch key (`data.scores` puts them there).
FROM_DATA = {"chosen_scores": "chosen_score", "rejected_scores": "rejected_score", "extra_scores": "extra_scores"}
UNPAIRED_FIELDS = frozenset({"policy_logps", "lengths", "desirable", "ref_logps", "policy_kl_logps", "ref_kl_logps"})
REFERENCE_FIELDS = frozenset(f for f in PAIR_FIELDS | UNPAIRED_FIELDS if f.startswith("ref_")) | DISTRIBUTION


@dataclass(frozen=True)
class ScoringOptions:
    """How batches become records: each switch trades speed or memory, and none changes a number beyond float
    rounding. Measurements: benchmarks/README.md.

    Args:
        share_prompt: paired training batches hold one row prompt + chosen + rejected per pair, so the prompt is
            computed once (exact up to float rounding; needs attn_implementation sdpa, eager or flex_attention).
        reference_cache: compute the reference's log-probs of the training pairs once, store them on disk keyed by
            the reference weights and the tokenized data, and reuse them (every run of a grid shares them). Paired
            losses that read only the reference's sums; otherwise a live reference forward every step.
        logps_chunk_size: training log-probs run the LM head on completion positions only, this many at a time,
            recomputing each chunk's logits in the backward (never more than chunk x vocabulary logits). null: one
            piece. Losses that read per-token KLs need null (full logits).
        trim_last_layer: with prompt-shared batches, the last decoder layer runs its MLP only at the positions whose
            log-probs are read (Llama-structured layers; others unchanged).
        compile: `torch.compile` the decoder stacks of policy and reference (dynamic shapes); needs a C++ compiler
            and pays only once a run has more than a few dozen steps.
        attn_implementation: transformers attention backend ("sdpa", "eager", "flex_attention", ...); null: its
            default.
        gradient_checkpointing: recompute the policy's activations in the backward pass (less memory, more time).
        keep_freed_host_memory: freed host memory stays in the process for the next step instead of being returned
            to the OS and page-faulted in again (glibc malloc thresholds, whole process; `prefopt.fast.allocator`).
        check_finite_every_n_steps: stop on a non-finite training loss, checked every N steps (the check waits for
            the device; the error then names the step range). 0: never.
    """

    share_prompt: bool = False
    reference_cache: bool = True
    logps_chunk_size: int | None = None
    trim_last_layer: bool = False
    compile: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    keep_freed_host_memory: bool = False
    check_finite_every_n_steps: int = 1

    def __post_init__(self) -> None:
        if self.check_finite_every_n_steps < 0:
            raise ValueError(f"check_finite_every_n_steps must be >= 0, got {self.check_finite_every_n_steps}")
        if self.logps_chunk_size is not None and self.logps_chunk_size < 1:
            raise ValueError(f"logps_chunk_size must be >= 1 or null, got {self.logps_chunk_size}")


def check_fields(options: ScoringOptions, loss: LossConfig) -> None:
    """Refuse a loss that reads a record field that these settings (or its declared state) cannot produce."""
    from_state = {f for factory in loss.state for f in getattr(factory, "fields", ())}
    producible = (PAIR_FIELDS | DISTRIBUTION | set(FROM_DATA)) if loss.paired else UNPAIRED_FIELDS
    for field in sorted(loss.reads - from_state):
        if field not in producible:
            kind = "paired" if loss.paired else "unpaired"
            raise ValueError(f"loss {loss.name!r} reads {field}, which no scorer produces for {kind} batches")
        if field in DISTRIBUTION and options.logps_chunk_size is not None:
            raise ValueError(f"loss {loss.name!r} reads {field}, a per-token KL that needs both models' full logits: "
                             "set model.scoring.logps_chunk_size: null")


def check_config(scoring: Mapping[str, Any] | None, loss: Any) -> None:
    """`check_fields` for a parsed config's `model.scoring` group and `model.loss` value (what the CLI and a grid's
    pre-flight check hold before anything is built)."""
    check_fields(ScoringOptions(**dict(scoring or {})), LossConfig.from_value(loss))


class Scorer:
    """Batch -> record for one loss under one set of `ScoringOptions`; see the module docstring."""

    def __init__(self, options: ScoringOptions, loss: LossConfig) -> None:
        check_fields(options, loss)
        self.options = options
        self.paired = loss.paired
        self.with_reference = bool(loss.reads & REFERENCE_FIELDS)
        self.distribution = bool(loss.reads & DISTRIBUTION)
        self.collision, self.samples, self.prompt = (bool(loss.reads & f) for f in (ALIGNED, SAMPLED, PROMPT))
        self.from_data = {f: key for f, key in FROM_DATA.items() if f in loss.reads}
        self.extras, self.ref_extras = bool(loss.reads & EXTRA), "ref_extra_logps" in loss.reads
        self.on_policy = loss.on_policy  # its further responses and scores exist in training rounds only
        # The cache holds the reference's sums of the pairs: a loss reading its full distribution, or the further
        # responses' reference sums, needs a live forward anyway.
        self.caches_reference = (options.reference_cache and self.paired and self.with_reference
                                 and not self.distribution and not self.ref_extras)
        self._table: dict[str, Tensor] | None = None

    @property
    def shares_prompt(self) -> bool:
        """Training batches are prompt-shared (paired losses only; validation batches never are)."""
        return self.options.share_prompt and self.paired

    @property
    def live_reference(self) -> bool:
        """Does training need the reference model's forward (no cached table, or fields the table lacks)?"""
        return self.with_reference and self._table is None

    def use_reference_table(self, table: dict[str, Tensor] | None) -> None:
        """The training pairs' reference sums by record field ({field: (N,)}, `reference_cache.FIELDS`), or None."""
        self._table = None if table is None else {k: v.float() for k, v in table.items()}

    def prepare(self, policy: nn.Module, reference: nn.Module) -> None:
        """Apply the model-level levers once the models are loaded: the trimmed last layer, then compilation."""
        for model in (policy, reference):
            self.prepare_model(model)

    def prepare_model(self, model: nn.Module) -> None:
        """The trimmed last layer, then compilation (in place: the decoder stack), for one model."""
        if self.options.trim_last_layer:  # before compiling, which then traces the trimmed layer
            trim_last_layer(model)
        if self.options.compile and isinstance(model, nn.Module):  # a LoRA reference view shares the policy's
            parts = decoder_and_head(model)
            (model if parts is None else parts[0]).compile(dynamic=True)

    # ---------------------------------------------------------------- training
    def score(self, policy: nn.Module, reference: nn.Module | None, batch: dict[str, Tensor]) -> PairLogps | UnpairedLogps:
        """The training record; `reference` is used only when `live_reference` (no gradient through it)."""
        mask = batch["completion_mask"]
        mine = self._tokens(policy, batch, policy=True)
        ref = None
        if self.live_reference:
            with torch.no_grad():
                ref = self._tokens(reference, batch, policy=False)
        ref_tokens = None if ref is None else ref.logps
        if not self.paired:
            return unpaired_logps(mine.logps, mask, batch["desirable"], ref_tokens)
        record = pair_logps(mine.logps, mask, ref_tokens)
        record = record.replace(**token_fields(mask, mine, ref_tokens, self._sample_keys(batch)))
        if self.with_reference and self._table is not None:
            index = batch["index"]
            if next(iter(self._table.values())).device != index.device:  # once: the table follows the batches
                self._table = {k: v.to(index.device) for k, v in self._table.items()}
            record = record.replace(**{k: v[index] for k, v in self._table.items()})
        if self.distribution:
            record = _with_sequence_kl(record, ref.logprobs, mine.logprobs, mask)
        return self._with_data(self._with_extras(record, policy, reference, batch), batch)

    def _with_extras(self, record: PairLogps, policy: nn.Module, reference: nn.Module | None,
                     batch: dict[str, Tensor]) -> PairLogps:
        """The further responses' sums (B, M), when the loss reads them: a forward of the policy (and, for their
        reference sums, of the reference, without gradient) on their own prompt + response rows."""
        if not self.extras:
            return record
        rows = {k.removeprefix("extra_"): batch[k] for k in ("extra_input_ids", "extra_attention_mask",
                                                            "extra_completion_mask")}
        pairs = record.policy_chosen_logps.shape[0]
        mine = self._plain_tokens(policy, rows)
        logps, lengths = response_sums(mine.logps, rows["completion_mask"], pairs)
        fields = {"policy_extra_logps": logps, "extra_lengths": lengths}
        if self.ref_extras:
            with torch.no_grad():
                fields["ref_extra_logps"] = response_sums(self._plain_tokens(reference, rows).logps,
                                                          rows["completion_mask"], pairs)[0]
        return record.replace(**fields)

    def _plain_tokens(self, model: nn.Module, rows: dict[str, Tensor], distribution: bool = False,
                      collision: bool = False, prompt: bool = False) -> TokenScores:
        """`TokenScores` of prompt + completion rows (no prompt sharing), with the configured LM head: the training
        batches' two-row layout and the further responses' rows."""
        chunk = self.options.logps_chunk_size
        if chunk is not None:  # check_fields keeps distribution-reading losses off this path
            return head_token_scores(model, rows, chunk, collision=collision, prompt=prompt)
        return scores_from_logits(forward_logits(model, rows), rows, distribution=distribution, collision=collision,
                                  prompt=prompt)

    def _tokens(self, model: nn.Module, batch: dict[str, Tensor], policy: bool) -> TokenScores:
        """Per-token completion log-probs (N, L) and what the loss reads beyond them: both models' next-token
        distributions (a per-token KL), the policy's log sum_v p_v^2 (WPO) and prompt log-probs (ORPO as TRL)."""
        chunk, wants = self.options.logps_chunk_size, {"collision": self.collision and policy,
                                                       "prompt": self.prompt and policy}
        if self.shares_prompt:
            return shared_token_scores(model, batch, chunk, distribution=self.distribution, **wants)
        return self._plain_tokens(model, batch, distribution=self.distribution, **wants)

    def _sample_keys(self, batch: dict[str, Tensor]) -> Tensor | None:
        """SamPO's per-pair keys: the training pairs' example index (what the reference cache is keyed by), or, in
        batches without one (validation), the pair's position in its batch; None when no loss reads the fields."""
        if not self.samples:
            return None
        keys = batch.get("index")
        return keys if keys is not None else torch.arange(batch["completion_mask"].shape[0] // 2,
                                                          device=batch["completion_mask"].device)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, policy: nn.Module, reference: nn.Module, batch: dict[str, Tensor]) -> tuple[PairLogps, Tensor, Tensor]:
        """Validation, the same plain path for every loss (pairs, full logits of both models): the record, and the
        exact KL over the vocabulary summed over completion tokens, with the number of those tokens."""
        mask = batch["completion_mask"]
        policy_logits, ref_logits = forward_logits(policy, batch), forward_logits(reference, batch)
        mine = scores_from_logits(policy_logits, batch, distribution=self.distribution, collision=self.collision,
                                  prompt=self.prompt)
        ref = scores_from_logits(ref_logits, batch, distribution=self.distribution)
        record = pair_logps(mine.logps, mask, ref.logps)
        record = record.replace(**token_fields(mask, mine, ref.logps, self._sample_keys(batch)))
        if self.distribution:
            record = _with_sequence_kl(record, ref.logprobs, mine.logprobs, mask)
        kl_sum, tokens = token_kl(policy_logits, ref_logits, mask)
        if self.on_policy:  # fixed validation pairs: the shared metrics only, as the module computes no loss there
            return record, kl_sum, tokens
        return self._with_data(self._with_extras(record, policy, reference, batch), batch), kl_sum, tokens

    def _with_data(self, record: PairLogps, batch: dict[str, Tensor]) -> PairLogps:
        """The record with the fields the data carries (the responses' scores) that the loss reads."""
        return record.replace(**{f: batch[key] for f, key in self.from_data.items()}) if self.from_data else record


def _with_sequence_kl(record: PairLogps, ref: Tensor, policy: Tensor, mask: Tensor) -> PairLogps:
    kl = sequence_kl(ref.detach(), policy, mask)  # (2B,)
    b = kl.shape[0] // 2
    return record.replace(chosen_seq_kl=kl[:b], rejected_seq_kl=kl[b:])
