"""Completion log-probs: computed once per model per step, in one place, the same for every loss.

A batch holds 2B right-padded rows (`input_ids`, `attention_mask`, `completion_mask`, all (2B, T)). For paired
data the first B rows are prompt + chosen and the last B rows prompt + rejected, for the same prompts in the same
order; for unpaired data the first B rows are the training rows and the last B rows the mismatched
(prompt i, completion of row i+1) rows that KTO estimates its reference point from. One forward per model covers
both halves.

`completion_mask` is 1 exactly on completion tokens (the eos included) and 0 on the prompt and on padding; it is
built by the DataModule from explicit lengths, never inferred from token values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prefopt.records import PairLogps, UnpairedLogps


def token_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """Log-prob of each next token under `logits`, zero outside the completion; shape (N, T-1).

    logits (N, T, V) predicts input_ids[:, 1:]. The log-softmax is never materialized in full: the label logit is
    gathered and the log-normalizer is a logsumexp, both in fp32 (bf16 logits lose ~3 digits in a sum of tokens).
    """
    logits = logits[:, :-1]  # (N, T-1, V)
    labels = input_ids[:, 1:]  # (N, T-1)
    mask = completion_mask[:, 1:].to(torch.float32)
    label_logits = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1).float()  # (N, T-1)
    lse = torch.logsumexp(logits.float(), dim=-1)  # (N, T-1)
    return (label_logits - lse) * mask


def forward_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits (N, T, V) of `model` on the batch rows."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def shared_prefix_mask(completion_mask: Tensor) -> Tensor:
    """1 on the first min(|y_w|, |y_l|) completion tokens of each row of a paired batch; shape (2B, T-1).

    Used by LD-DPO, which down-weights the tokens of the longer response past the shorter one's length.
    """
    mask = completion_mask[:, 1:]
    lengths = mask.sum(-1)  # (2B,)
    b = lengths.shape[0] // 2
    shared = torch.minimum(lengths[:b], lengths[b:]).repeat(2)  # (2B,)
    position = mask.cumsum(-1)  # 1-based index of each completion token
    return (mask.bool() & (position <= shared.unsqueeze(-1))).to(torch.float32)


def pair_logps(
    policy_token_logps: Tensor,
    completion_mask: Tensor,
    ref_token_logps: Tensor | None = None,
    running_logratio_mean: Tensor | None = None,
    ref_sums: Tensor | None = None,
) -> PairLogps:
    """Build the record of a paired batch from per-token log-probs (2B, T-1) of the policy and the reference.

    `ref_sums` (B, 4) replaces `ref_token_logps` when the reference log-probs come from the cache
    (`prefopt.fast.reference_cache`): columns chosen, rejected, chosen shared-prefix, rejected shared-prefix sums.
    """
    lengths = completion_mask[:, 1:].sum(-1).to(torch.float32)  # (2B,)
    shared = shared_prefix_mask(completion_mask)
    b = lengths.shape[0] // 2

    def split(x: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        return (None, None) if x is None else (x[:b], x[b:])

    pc, pr = split(policy_token_logps.sum(-1))
    psc, psr = split((policy_token_logps * shared).sum(-1))
    rc, rr = split(None if ref_token_logps is None else ref_token_logps.sum(-1))
    rsc, rsr = split(None if ref_token_logps is None else (ref_token_logps * shared).sum(-1))
    return PairLogps(
        policy_chosen_logps=pc, policy_rejected_logps=pr, chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
        ref_chosen_logps=rc, ref_rejected_logps=rr,
        policy_chosen_shared_logps=psc, policy_rejected_shared_logps=psr,
        ref_chosen_shared_logps=rsc, ref_rejected_shared_logps=rsr,
    )


def unpaired_logps(
    policy_token_logps: Tensor, completion_mask: Tensor, desirable: Tensor, ref_token_logps: Tensor | None = None
) -> UnpairedLogps:
    """Build the record of an unpaired batch: rows [:B] are the examples, rows [B:] their mismatched KL rows."""
    b = desirable.shape[0]
    lengths = completion_mask[:b, 1:].sum(-1).to(torch.float32)
    policy = policy_token_logps.sum(-1)
    ref = None if ref_token_logps is None else ref_token_logps.sum(-1)
    return UnpairedLogps(
        policy_logps=policy[:b], lengths=lengths, desirable=desirable,
        ref_logps=None if ref is None else ref[:b],
        policy_kl_logps=policy[b:], ref_kl_logps=None if ref is None else ref[b:],
    )


def token_kl(policy_logits: Tensor, ref_logits: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Exact KL(pi || pi_ref) over the whole vocabulary at each completion position.

    Returns (sum of per-token KLs, number of completion tokens), both scalars, so that a metric can average over
    tokens across batches.
    """
    mask = completion_mask[:, 1:].to(torch.float32)  # (N, T-1)
    logp = torch.log_softmax(policy_logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    logq = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (N, T-1)
    return (kl * mask).sum(), mask.sum()


def to_slots(values: Tensor, completion_mask: Tensor) -> Tensor:
    """Values (n,) given in the row-major order of the completion slots (completion_mask[:, 1:]) placed back into
    the per-token layout (N, T-1), zero elsewhere."""
    mask = completion_mask[:, 1:].bool()
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def sequence_kl(ref_logprobs: Tensor, policy_logprobs: Tensor, completion_mask: Tensor) -> Tensor:
    """Per row, the sum over completion positions of KL(pi_ref(.|context) || pi(.|context)); shape (N,).

    `ref_logprobs` and `policy_logprobs` (n, V) are the next-token log-softmax at the n completion slots, in the
    row-major order of completion_mask[:, 1:] (what TDPO calls the sequential KL divergence, arXiv 2404.11999).
    """
    slots = (ref_logprobs.exp() * (ref_logprobs - policy_logprobs)).sum(-1)  # (n,)
    return to_slots(slots, completion_mask).sum(-1)
