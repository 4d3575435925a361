"""The LM head at the positions whose log-probs are read, optionally in chunks (a speed and memory lever).

The plain path (`prefopt.logps`) computes every position's logits over the whole vocabulary. Training needs only the
label log-prob at completion positions: here the decoder runs once, the head runs at those positions only, and with a
chunk size it never holds more than chunk x vocabulary logits, recomputing each chunk in the backward. The same pass
gives, on request, what a loss reads beyond the label log-probs (`prefopt.logps.TokenScores`): WPO's log sum_v p_v^2
from each chunk's logits, and ORPO's prompt log-probs by running the head at the prompt positions too. A per-token KL
needs the whole distributions: the scorer refuses it with a chunk size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prefopt.logps import TokenScores, collision_logps, forward_logits, prompt_mask, scores_from_logits, to_slots


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The model's decoder stack and LM head, when its logits are just head(last hidden state).

    None for anything that is not a plain module (a LoRA reference view switches adapters in its own forward, which
    a direct call of the decoder would bypass) and for models whose logits are scaled or soft-capped.
    """
    if not isinstance(model, nn.Module):
        return None
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_scaling", 1.0) != 1.0:
        return None
    if hasattr(model, "logit_scale"):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    return (decoder, head) if isinstance(head, nn.Linear) and decoder is not model else None


class _ChunkedLabelLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[label] row by row in chunks; backward recomputes each chunk's logits.

    Never holds more than (chunk, V) logits, in the forward or the backward (Liger-Kernel's fused linear
    cross-entropy does the same on GPU): d/dz log softmax(z)[y] = onehot(y) - softmax(z).
    The backward runs its matmuls under the autocast state of the forward (bf16 under bf16-mixed, as autograd does
    for the unchunked head); the autograd engine would otherwise run them in the weights' fp32.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int,
                collision: bool) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        coll = torch.empty(n if collision else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            logits = F.linear(hidden[s : s + chunk], weight, bias).float()  # (c, V)
            lse[s : s + chunk] = torch.logsumexp(logits, -1)
            out[s : s + chunk] = logits.gather(1, labels[s : s + chunk, None]).squeeze(1) - lse[s : s + chunk]
            if collision:  # log sum_v p_v^2 (WPO), from the same chunk of logits
                coll[s : s + chunk] = torch.logsumexp(2 * logits, -1) - 2 * lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(coll)
        device = hidden.device.type
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return out, coll

    @staticmethod
    def backward(ctx, grad: Tensor, _: Tensor):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        compute = ctx.autocast or hidden.dtype
        with torch.autocast(hidden.device.type, dtype=compute, enabled=ctx.autocast is not None):
            w = weight.to(compute)  # once: autocast caches no casts with grad mode off, as in a backward
            for s in range(0, hidden.shape[0], ctx.chunk):
                h, g = hidden[s : s + ctx.chunk], grad[s : s + ctx.chunk]
                logits = F.linear(h, w, bias).float()  # (c, V), recomputed
                d_logits = torch.exp(logits - lse[s : s + ctx.chunk, None]).mul_(-g[:, None])  # -softmax * g
                d_logits.scatter_add_(1, labels[s : s + ctx.chunk, None], g[:, None])  # + onehot * g
                d_logits = d_logits.to(compute)
                if need_h:
                    d_hidden[s : s + ctx.chunk] = d_logits @ w
                if need_w and compute == torch.float32:
                    d_weight.addmm_(d_logits.t(), h)
                elif need_w:
                    d_weight += (d_logits.t() @ h.to(compute)).float()
                if need_b:
                    d_bias += d_logits.float().sum(0)
        d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        d_bias = None if d_bias is None else d_bias.to(bias.dtype)
        return d_hidden, d_weight, d_bias, None, None, None


def label_logps_and_collision(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, chunk_size: int | None = None,
    collision: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(hidden @ weight.T + bias)[labels] in fp32; hidden (n, H), weight (V, H), labels (n,) -> (n,); and,
    with `collision`, log sum_v softmax(.)_v^2 (n,), detached (WPO's alignment term), else None.

    Only the n label positions go through the LM head. chunk_size None: one (n, V) logits tensor under autograd;
    otherwise `_ChunkedLabelLogps`, which never holds more than (chunk_size, V) logits.
    """
    if chunk_size is None or chunk_size <= 0:
        logits = F.linear(hidden, weight, bias).float()  # (n, V)
        values = logits.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
        return values, collision_logps(logits) if collision else None
    values, coll = _ChunkedLabelLogps.apply(hidden, weight, bias, labels, chunk_size, collision)
    return values, coll if collision else None


def label_logps_from_hidden(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, chunk_size: int | None = None
) -> Tensor:
    """`label_logps_and_collision`'s label log-probs alone."""
    return label_logps_and_collision(hidden, weight, labels, bias, chunk_size, collision=False)[0]


def label_scores(
    picked: Tensor, head: nn.Linear | None, labels: Tensor, chunk_size: int | None, *, distribution: bool = False,
    collision: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """At n predicting positions: (label log-probs (n,), next-token log-softmax (n, V) with `distribution`, log
    sum_v p_v^2 (n,) with `collision`). `picked` is their last hidden states (n, H) for `head`, or, with head None
    (a model whose logits are more than head(hidden)), their logits (n, V)."""
    if head is None or distribution:
        logprobs = torch.log_softmax((picked if head is None else head(picked)).float(), -1)  # (n, V)
        values = logprobs.gather(1, labels[:, None]).squeeze(1)
        coll = collision_logps(logprobs) if collision else None
        return values, logprobs if distribution else None, coll
    values, coll = label_logps_and_collision(picked, head.weight, labels, head.bias, chunk_size, collision)
    return values, None, coll


def completion_token_logps(model: nn.Module, batch: dict[str, Tensor], chunk_size: int | None = None) -> Tensor:
    """`token_logps(forward_logits(model, batch), ...)` with the LM head run on completion positions only; (N, T-1)."""
    return head_token_scores(model, batch, chunk_size).logps


def head_token_scores(
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int | None = None, *, collision: bool = False,
    prompt: bool = False,
) -> TokenScores:
    """`TokenScores` of a standard paired batch with the LM head run at the read positions only, in chunks: the
    completion positions, and with `prompt` the chosen rows' prompt positions (rows [:B]).

    Falls back to full logits for a model whose logits are more than head(last hidden state) (softcapping, scaling).
    """
    parts = decoder_and_head(model)
    if parts is None:
        return scores_from_logits(forward_logits(model, batch), batch, collision=collision, prompt=prompt)
    decoder, head = parts
    ids, mask = batch["input_ids"], batch["completion_mask"]
    slots = mask[:, 1:].bool()  # (N, T-1): positions whose next token is a completion token
    # The last column predicts nothing and, under the causal mask, feeds nothing: the decoder runs without it.
    hidden = decoder(input_ids=ids[:, :-1], attention_mask=batch["attention_mask"][:, :-1],
                     use_cache=False).last_hidden_state
    values, _, coll = label_scores(hidden[slots], head, ids[:, 1:][slots], chunk_size, collision=collision)
    scores = TokenScores(to_slots(values, mask), collision=None if coll is None else to_slots(coll, mask))
    if prompt:
        b, where = ids.shape[0] // 2, prompt_mask(batch)
        read = where[:, 1:].bool()  # (B, T-1): positions whose next token is a prompt token, chosen rows
        values, _, _ = label_scores(hidden[:b][read], head, ids[:b, 1:][read], chunk_size)
        scores.prompt_logps = to_slots(values, where).sum(-1)
        scores.prompt_lengths = read.sum(-1).to(torch.float32)
    return scores
