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

from dataclasses import dataclass

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


def response_sums(token_logps: Tensor, completion_mask: Tensor, pairs: int) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and token counts of a block of further responses, M per pair in pair-major order
    (row p * M + m is response m of pair p): both shaped (pairs, M)."""
    lengths = completion_mask[:, 1:].sum(-1).to(torch.float32)
    return token_logps.sum(-1).view(pairs, -1), lengths.view(pairs, -1)


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


# ---------------------------------------------------------------- per-token quantities beyond the label log-probs
@dataclass
class TokenScores:
    """What one model's forward yields for a paired batch's record, whatever the layout and the LM head.

    logps (2B, L): label log-probs at the completion slots (completion_mask[:, 1:]), 0 elsewhere; the rest only on
    request: logprobs (n, V), the next-token log-softmax at the n completion slots in row-major order (TDPO);
    collision (2B, L), log sum_v pi(v | context)^2 at the completion slots, detached (WPO); prompt_logps and
    prompt_lengths (B,), each pair's summed prompt log-probs (tokens 2..|x|, with gradient) and |x| - 1 (ORPO as TRL).
    """

    logps: Tensor
    logprobs: Tensor | None = None
    collision: Tensor | None = None
    prompt_logps: Tensor | None = None
    prompt_lengths: Tensor | None = None


def collision_logps(logits: Tensor) -> Tensor:
    """log sum_v softmax(logits)_v^2 over the last dimension, in fp32, detached: WPO's alignment term."""
    with torch.no_grad():
        z = logits.float()
        return torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)


def prompt_mask(batch: dict[str, Tensor]) -> Tensor:
    """1 on the prompt tokens of the chosen rows (the first B) of a standard paired batch; shape (B, T)."""
    b = batch["input_ids"].shape[0] // 2
    return batch["attention_mask"][:b] * (1 - batch["completion_mask"][:b])


def scores_from_logits(
    logits: Tensor, batch: dict[str, Tensor], *, distribution: bool = False, collision: bool = False,
    prompt: bool = False,
) -> TokenScores:
    """`TokenScores` from full logits (2B, T, V) of a standard paired batch: the plain path."""
    ids, mask = batch["input_ids"], batch["completion_mask"]
    scores = TokenScores(token_logps(logits, ids, mask))
    slots = mask[:, 1:].bool()
    if distribution:
        scores.logprobs = torch.log_softmax(logits[:, :-1][slots].float(), -1)  # (n, V)
    if collision:
        scores.collision = collision_logps(logits[:, :-1]) * slots  # (2B, T-1)
    if prompt:
        b, where = ids.shape[0] // 2, prompt_mask(batch)
        scores.prompt_logps = token_logps(logits[:b], ids[:b], where).sum(-1)
        scores.prompt_lengths = where[:, 1:].sum(-1).to(torch.float32)
    return scores


_PRIME = 2**31 - 1  # hashing modulo 2^31 - 1 keeps every product below 2^62: int64 arithmetic is exact on any device
_GOLDEN = 0x9E3779B1 % _PRIME  # spreads consecutive positions over the range before they are scrambled


def _mix(x: Tensor) -> Tensor:
    """Scramble int64 values in [0, 2^31): three rounds of xor-shift and multiplication modulo 2^31 - 1 (their
    subsets come out uniform: tests/test_token_fields.py)."""
    for factor in (0x45D9F3B, 0x119DE1F3, 0x2C1B3C6D):
        x = x ^ (x >> 15)
        x = (x * factor) % _PRIME
    return x ^ (x >> 15)


def sampled_mask(completion_mask: Tensor, keys: Tensor) -> Tensor:
    """SamPO's down-sample: 1 on min(|y_w|, |y_l|) completion tokens of each row of a paired batch; shape (2B, T-1).

    The shorter response keeps all its tokens; the longer one a pseudo-random subset of that size, a function of the
    pair's integer key (B,) (its example index), the side and the tokens' positions in the response alone: policy and
    reference, every batch layout and the reference cache select the same tokens.
    """
    mask = completion_mask[:, 1:].long()
    lengths = mask.sum(-1)  # (2B,)
    b = lengths.shape[0] // 2
    keep = torch.minimum(lengths[:b], lengths[b:]).repeat(2)  # (2B,)
    position = mask.cumsum(-1)  # 1-based index of each completion token in its response
    side = torch.arange(2, device=mask.device).repeat_interleave(b)  # 0 chosen rows, 1 rejected rows
    seed = _mix(_mix(keys.long().repeat(2) % _PRIME) ^ side)  # (2B,)
    score = _mix((seed[:, None] + position * _GOLDEN) % _PRIME) * 2**31 + position  # ties broken by position
    score = torch.where(mask.bool(), score, torch.full_like(score, 2**62))  # non-completion slots sort last
    rank = score.argsort(-1).argsort(-1)
    return (mask.bool() & (rank < keep[:, None])).to(torch.float32)


def token_fields(
    completion_mask: Tensor, policy: TokenScores, ref_logps: Tensor | None = None, sample_keys: Tensor | None = None
) -> dict[str, Tensor]:
    """The record fields of `TokenScores` beyond `pair_logps`'s: WPO's aligned sums (when `policy.collision` is
    given), SamPO's down-sampled sums of policy and reference (when `sample_keys` (B,) are), the prompt's sums."""
    mask = completion_mask[:, 1:].to(torch.float32)
    b, out = mask.shape[0] // 2, {}
    if policy.collision is not None:
        aligned = ((policy.logps.detach() - policy.collision) * mask).sum(-1)  # (2B,)
        out |= {"policy_chosen_aligned_logps": aligned[:b], "policy_rejected_aligned_logps": aligned[b:]}
    if sample_keys is not None:
        sampled = sampled_mask(completion_mask, sample_keys)
        for who, tokens in (("policy", policy.logps), ("ref", ref_logps)):
            if tokens is not None:
                sums = (tokens * sampled).sum(-1)  # (2B,)
                out |= {f"{who}_chosen_sampled_logps": sums[:b], f"{who}_rejected_sampled_logps": sums[b:]}
    if policy.prompt_logps is not None:
        out |= {"policy_prompt_logps": policy.prompt_logps, "prompt_lengths": policy.prompt_lengths}
    return out
