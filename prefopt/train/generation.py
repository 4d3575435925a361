"""Sampling continuations of any prompts from any causal LM, for on-policy rounds on real data (`data.online`).

The same loop as the built-in task's sampler (`prefopt.gold.sampling.sample_responses`, whose prompts all have one
length): temperature-1 tokens drawn on the CPU from an explicit `torch.Generator` (the global RNG is never touched,
so a resumed run draws what an uninterrupted one would), a key/value cache, rows that reached <eos> fed padding and
ignored. Prompts of different lengths are sampled in groups of one length, so no padding and no position ids are
needed and every architecture samples as it would alone; the groups are drawn in order of their first prompt.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def sample_continuations(model: PreTrainedModel, prompts: list[list[int]], generator: torch.Generator,
                         max_new_tokens: int, eos_id: int, pad_id: int, batch_size: int = 512,
                         ) -> list[tuple[list[int], bool]]:
    """One sampled continuation per prompt, (token ids without <eos>, ended with <eos>?), in the prompts' order."""
    device = next(model.parameters()).device
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    out: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for rows in groups.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                input_ids = torch.tensor([prompts[i] for i in chunk], device=device)
                generated = torch.full((len(chunk), max_new_tokens), pad_id, dtype=torch.long)
                done, cache = torch.zeros(len(chunk), dtype=torch.bool), None
                for step in range(max_new_tokens):
                    output = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
                    cache = output.past_key_values
                    probs = torch.softmax(output.logits[:, -1].float().cpu(), dim=-1)
                    token = torch.where(done, pad_id, torch.multinomial(probs, 1, generator=generator).squeeze(1))
                    generated[:, step] = token
                    done |= token == eos_id
                    if bool(done.all()):
                        break
                    input_ids = token.unsqueeze(1).to(device)
                for i, ids in zip(chunk, generated.tolist()):
                    ended = eos_id in ids
                    out[i] = (ids[: ids.index(eos_id)] if ended else ids, ended)
    finally:
        model.train(was_training)
    return out
