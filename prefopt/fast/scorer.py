"""The scoring boundary: one object turns a batch into the log-prob record that a loss reads.

The `Scorer` owns every speed and memory lever, so that nothing else in a run knows about them: the batch layout
(two rows per pair, or one prompt-shared row, `prefopt.fast.prefix_sharing`), the LM head (full logits, or label
positions only in chunks, `prefopt.fast.head`), the reference's source (a live forward, or the on-disk table read by
example index and field name, `prefopt.fast.reference_cache`), the trimmed last layer, and compilation. Their
switches are one config group, `model.scoring` (`ScoringOptions`); none changes a number beyond float rounding
(`tests/test_speed_levers.py` compares each with the plain path).

A loss declares the record fields it reads (`LossConfig.reads`); `check_fields` refuses, before any model loads, a
loss that reads a field these settings cannot produce, naming the loss, the field and the setting to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.fast.head import completion_token_logps, decoder_and_head
from prefopt.fast.prefix_sharing import shared_token_distributions, shared_token_logps, trim_last_layer
from prefopt.losses import LossConfig
from prefopt.logps import forward_logits, pair_logps, sequence_kl, token_kl, token_logps, unpaired_logps
from prefopt.records import PairLogps, UnpairedLogps

# The fields a scorer can produce, by batch kind; DISTRIBUTION fields need both models' full next-token logits.
PAIR_FIELDS = frozenset({"policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths",
                         "policy_chosen_shared_logps", "policy_rejected_shared_logps", "ref_chosen_logps",
                         "ref_rejected_logps", "ref_chosen_shared_logps", "ref_rejected_shared_logps"})
DISTRIBUTION = frozenset({"chosen_seq_kl", "rejected_seq_kl"})
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
    producible = (PAIR_FIELDS | DISTRIBUTION) if loss.paired else UNPAIRED_FIELDS
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
        # The cache holds the reference's sums: a loss reading its full distribution needs a live forward anyway.
        self.caches_reference = options.reference_cache and self.paired and self.with_reference and not self.distribution
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
        if self.options.trim_last_layer:  # before compiling, which then traces the trimmed layer
            for model in (policy, reference):
                trim_last_layer(model)
        if self.options.compile:  # in place: the decoder stacks (a LoRA reference view shares the policy's)
            for model in (policy, reference):
                if isinstance(model, nn.Module):
                    parts = decoder_and_head(model)
                    (model if parts is None else parts[0]).compile(dynamic=True)

    # ---------------------------------------------------------------- training
    def score(self, policy: nn.Module, reference: nn.Module | None, batch: dict[str, Tensor]) -> PairLogps | UnpairedLogps:
        """The training record; `reference` is used only when `live_reference` (no gradient through it)."""
        mask = batch["completion_mask"]
        policy_tokens, policy_dist = self._tokens(policy, batch)
        ref_tokens = ref_dist = None
        if self.live_reference:
            with torch.no_grad():
                ref_tokens, ref_dist = self._tokens(reference, batch)
        if not self.paired:
            return unpaired_logps(policy_tokens, mask, batch["desirable"], ref_tokens)
        record = pair_logps(policy_tokens, mask, ref_tokens)
        if self.with_reference and self._table is not None:
            index = batch["index"]
            if next(iter(self._table.values())).device != index.device:  # once: the table follows the batches
                self._table = {k: v.to(index.device) for k, v in self._table.items()}
            record = record.replace(**{k: v[index] for k, v in self._table.items()})
        if self.distribution:
            record = _with_sequence_kl(record, ref_dist, policy_dist, mask)
        return record

    def _tokens(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Per-token completion log-probs (N, L) and, when a loss reads a per-token KL, the log-softmax (n, V) at the
        n completion slots (row-major order)."""
        chunk = self.options.logps_chunk_size
        if self.shares_prompt:
            if self.distribution:
                return shared_token_distributions(model, batch)
            return shared_token_logps(model, batch, chunk), None
        if chunk is not None:  # check_fields keeps distribution-reading losses off this path
            return completion_token_logps(model, batch, chunk), None
        logits = forward_logits(model, batch)
        tokens = token_logps(logits, batch["input_ids"], batch["completion_mask"])
        if not self.distribution:
            return tokens, None
        return tokens, torch.log_softmax(logits[:, :-1][batch["completion_mask"][:, 1:].bool()].float(), -1)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, policy: nn.Module, reference: nn.Module, batch: dict[str, Tensor]) -> tuple[PairLogps, Tensor, Tensor]:
        """Validation, the same plain path for every loss (pairs, full logits of both models): the record, and the
        exact KL over the vocabulary summed over completion tokens, with the number of those tokens."""
        ids, mask = batch["input_ids"], batch["completion_mask"]
        policy_logits, ref_logits = forward_logits(policy, batch), forward_logits(reference, batch)
        record = pair_logps(token_logps(policy_logits, ids, mask), mask, token_logps(ref_logits, ids, mask))
        if self.distribution:
            slots = mask[:, 1:].bool()
            pick = lambda logits: torch.log_softmax(logits[:, :-1][slots].float(), -1)  # noqa: E731
            record = _with_sequence_kl(record, pick(ref_logits), pick(policy_logits), mask)
        kl_sum, tokens = token_kl(policy_logits, ref_logits, mask)
        return record, kl_sum, tokens


def _with_sequence_kl(record: PairLogps, ref: Tensor, policy: Tensor, mask: Tensor) -> PairLogps:
    kl = sequence_kl(ref.detach(), policy, mask)  # (2B,)
    b = kl.shape[0] // 2
    return record.replace(chosen_seq_kl=kl[:b], rejected_seq_kl=kl[b:])
