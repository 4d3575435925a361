"""Sampling from and scoring under a causal LM on the gold task, with an explicit generator.

`sample_responses` draws temperature samples with a KV cache from a `torch.Generator` it is given (the global torch
RNG is never touched, so a resumed run reproduces an uninterrupted one), and can read the policy's own log-probs and
next-token statistics (`TokenStats`) off that pass's logits; `score_responses` returns the summed completion
log-probs of the very same token sequences under any model. Used to build the preference pairs
(`gold_build`) and to evaluate policies (`gold_eval`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefopt.gold import task

# A response is (topic, words, ended_with_eos): what `sample_responses` returns and `score_responses` reads.
Response = tuple[str, list[str], bool]


class TokenStats(NamedTuple):
    """Per-response sums over the generated positions (every drawn token, <eos> included; none after it) of the
    model's temperature-1 next-token distribution p = softmax(logits) at that position. Each field is (N,) on the CPU.
    """

    entropy: torch.Tensor  # sum of H(p) = -sum_v p_v log p_v, nats (float32)
    top_prob: torch.Tensor  # sum of max_v p_v (float32)
    positions: torch.Tensor  # how many positions were summed: len(words) + ended_with_eos (int64)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, topic: str) -> list[int]:
    return tokenizer(task.prompt_text(topic))["input_ids"]


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    topics: Sequence[str],
    num_per_topic: int,
    generator: torch.Generator,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    batch_size: int = 4096,
    return_logps: bool = False,
    return_token_stats: bool = False,
) -> list[Response] | tuple[list[Response] | torch.Tensor | TokenStats, ...]:
    """Sample `num_per_topic` responses per topic; returns (topic, words, ended_with_eos) in topic order, and with
    `return_logps` also each response's summed completion log-prob under `model` at temperature 1 (what
    `score_responses(model, ...)` computes, read off the sampling pass's own logits: no second forward), and with
    `return_token_stats` also its `TokenStats` (read off the same logits). Extras follow the responses in that
    order: (responses, logps), (responses, stats) or (responses, logps, stats). Neither flag changes the samples.

    Tokens are drawn on the CPU from `generator` (a CPU generator), whatever the model's device, so the
    samples depend only on the generator's state and the model's probabilities. A response that reaches
    `max_new_tokens` without <eos> is returned with ended_with_eos=False (no <eos> is forced).
    temperature 0 is greedy decoding.
    """
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    rows = [topic for topic in topics for _ in range(num_per_topic)]
    prompt_of = {t: _prompt_ids(tokenizer, t) for t in set(topics)}
    prompts = [prompt_of[t] for t in rows]
    was_training = model.training
    model.eval()
    out: list[Response] = []
    logps = torch.zeros(len(rows))
    entropy, top_prob = torch.zeros(len(rows)), torch.zeros(len(rows))
    positions = torch.zeros(len(rows), dtype=torch.long)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = prompts[start : start + batch_size]
            if len({len(p) for p in chunk}) != 1:
                raise ValueError("every prompt must tokenize to the same length (no padding is used)")
            input_ids = torch.tensor(chunk, device=device)  # (B, P)
            generated = torch.full((len(chunk), max_new_tokens), pad_id, dtype=torch.long)  # (B, N), CPU
            done = torch.zeros(len(chunk), dtype=torch.bool)  # (B,)
            cache = None
            for step in range(max_new_tokens):
                output = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
                cache = output.past_key_values
                logits = output.logits[:, -1].float().cpu()  # (B, V)
                if temperature == 0:
                    token = logits.argmax(dim=-1)  # (B,)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
                rows_here = slice(start, start + len(chunk))
                if return_logps or return_token_stats:  # temperature 1, for the rows still running
                    log_p = torch.log_softmax(logits, dim=-1)  # (B, V)
                if return_logps:  # the log-prob of the drawn token
                    picked = log_p.gather(1, token[:, None])[:, 0]
                    logps[rows_here] += torch.where(done, 0.0, picked)
                if return_token_stats:  # entr(0) = 0, so a -inf logit adds nothing (p log p would give nan)
                    p = log_p.exp()  # (B, V)
                    entropy[rows_here] += torch.where(done, 0.0, torch.special.entr(p).sum(dim=-1))
                    top_prob[rows_here] += torch.where(done, 0.0, p.max(dim=-1).values)
                    positions[rows_here] += (~done).long()
                token = torch.where(done, pad_id, token)  # finished rows keep feeding pad; ignored
                generated[:, step] = token
                done |= token == eos_id
                if bool(done.all()):
                    break
                input_ids = token.unsqueeze(1).to(device)  # (B, 1)
            for topic, ids in zip(rows[start : start + len(chunk)], generated.tolist()):
                ended = eos_id in ids
                words = ids[: ids.index(eos_id)] if ended else ids
                out.append((topic, tokenizer.convert_ids_to_tokens(words), ended))
    finally:
        model.train(was_training)
    extras = [logps] if return_logps else []
    extras += [TokenStats(entropy, top_prob, positions)] if return_token_stats else []
    return (out, *extras) if extras else out


@torch.no_grad()
def score_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    responses: Sequence[Response],
    batch_size: int = 2048,
) -> torch.Tensor:
    """Summed completion log-prob log pi(y | x) of each response under `model`: (N,) float32 on the CPU.

    The sequence is rebuilt exactly as sampled: prompt ids, the word tokens (the tokenizer is a bijection on
    tokens) and <eos> when the response ended with it. Prompt tokens are excluded; <eos> is included.
    """
    device = next(model.parameters()).device
    prompt_of = {t: _prompt_ids(tokenizer, t) for t in {r[0] for r in responses}}
    seqs, starts = [], []
    for topic, words, ended in responses:
        prompt = prompt_of[topic]
        completion = tokenizer.convert_tokens_to_ids(list(words)) + ([tokenizer.eos_token_id] if ended else [])
        seqs.append(prompt + completion)
        starts.append(len(prompt))
    was_training = model.training
    model.eval()
    out = torch.zeros(len(seqs))
    try:
        for lo in range(0, len(seqs), batch_size):
            chunk, chunk_starts = seqs[lo : lo + batch_size], starts[lo : lo + batch_size]
            width = max(len(s) for s in chunk)
            # Right padding needs no attention mask in a causal model: pads only come after real tokens.
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
            logits = model(input_ids=ids.to(device)).logits[:, :-1].float()  # (B, T-1, V): predicts ids[:, 1:]
            token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
            pos = torch.arange(1, width)[None, :]  # (1, T-1): index of the predicted token
            lengths = torch.tensor([len(s) for s in chunk])[:, None]
            mask = (pos >= torch.tensor(chunk_starts)[:, None]) & (pos < lengths)  # completion tokens only
            out[lo : lo + len(chunk)] = (token_logps.cpu() * mask).sum(dim=1)
    finally:
        model.train(was_training)
    return out
