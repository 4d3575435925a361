"""Prompt-prefix sharing: each pair is one sequence prompt + chosen + rejected, so the prompt is computed once.

The standard layout (`prefopt.logps`) runs 2B rows, prompt + chosen and prompt + rejected, and so computes every
prompt twice. Here a pair is one row x ++ y_w ++ y_l with a block-sparse causal mask in which the rejected tokens see
the prompt and the earlier rejected tokens but not the chosen ones, and with position ids that restart at |x| for the
rejected part, so every token sees exactly the context (and the positions) it has in the standard layout (Wang and
Hegde 2024, "Accelerating Direct Preference Optimization with Prefix Sharing", arXiv 2410.20305, Fig. 1).

Layout of a pair (P, C, R = prompt, chosen, rejected lengths; T = the batch's longest row):

    tokens     x_0 .. x_{P-1} | w_0 .. w_{C-2} | l_0 .. l_{R-2} | pad ..
    positions  0   .. P-1     | P   .. P+C-2   | P   .. P+R-2   | 0 ..
    attends    causal         | causal         | x and l_<j     | itself only (no all-masked softmax rows)

The last token of each response (its eos) is not in the row: it predicts no label and no token attends to it (the
rejected part never sees the chosen one), so every layer's work at its position would be dead. It stays a label.
The label log-probs: w_j is predicted by the hidden state at row position P-1+j; l_0 by position P-1 (the last prompt
token predicts both first tokens, with different labels), l_j (j >= 1) by position P+C+j-2. The output is the standard
(2B, L) per-token layout (chosen rows then rejected rows, completions left-aligned), with a matching completion mask
whose column 0 is 0, so `prefopt.logps.pair_logps` reads it unchanged.

The LM head runs only at the C + R predicting positions, not on prompt positions (unless a loss reads the prompt's
log-probs: ORPO's NLL as TRL computes it) or padding.

Rows hold one pair each. Packing several pairs into a row (block-diagonal attention) was measured at batch 8, max
length 128 (benchmarks/): it removed almost no padding (pairs of 71-183 tokens rarely share a row of the longest
one's length) and longer rows made attention dearer; `data.group_by_length` is what cuts padding.

Needs an attention backend that takes a custom mask: "sdpa" or "eager" (a dense 4D mask), or "flex_attention" (a
`BlockMask`, whose kernels skip the 128 x 128 tiles that are fully masked; the paper's choice). Not
flash_attention_2 (benchmarks/README.md compares flex_attention with sdpa on a GPU). On the CPU, flex_attention has no backward in torch: reference log-probs only.

Deviations from a plain forward, both within float rounding: attention over a masked longer row sums the same terms
in a different order, and the rejected part's rotary phases are computed for the restarted positions.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prefopt.fast.head import decoder_and_head, label_scores
from prefopt.logps import TokenScores, to_slots


def shared_row_length(prompt: list[int], chosen: list[int], rejected: list[int]) -> int:
    """Tokens in a pair's prompt-shared row: the prompt, then each response without its last token."""
    return len(prompt) + max(len(chosen) - 1, 0) + max(len(rejected) - 1, 0)


def collate_shared_pairs(
    prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad_id: int
) -> dict[str, Tensor]:
    """Pairs as prompt + chosen + rejected sequences, one per row, right-padded; each response enters the row
    without its last token (see the module docstring), and all of its tokens are labels.

    Returns input_ids, position_ids and part_ids (0 prompt, 1 chosen, 2 rejected, 3 padding), all (B, T); and for
    the loss, in the standard per-token layout of 2B rows (chosen rows then rejected rows, in pair order,
    completions left-aligned): completion_mask (2B, L + 1), 1 on columns 1..C (chosen rows) or 1..R (rejected rows)
    and 0 in column 0, so that completion_mask[:, 1:] marks the (2B, L) label slots as in `prefopt.logps`; and, in
    the row-major order of those slots, pred_index (n,) into the flattened (B * T) positions and labels (n,); and
    read_rows, the distinct positions of pred_index, sorted (the last prompt token predicts both first tokens); and for
    the prompt's own log-probs: prompt_mask (B, max |x|), 1 on each prompt's tokens, and, in the row-major order of its
    label slots prompt_mask[:, 1:], prompt_pred_index and prompt_labels.
    """
    b = len(prompts)
    chosen_in, rejected_in = [c[:-1] for c in chosen], [r[:-1] for r in rejected]  # the eos predicts nothing
    width = max(map(shared_row_length, prompts, chosen, rejected))
    # Built as Python lists and converted once per field: a few tensors per pair cost more than the forward here.
    ids, positions, parts, chosen_pred, rejected_pred = [], [], [], [], []
    for i in range(b):
        n_p, k_c, k_r = len(prompts[i]), len(chosen_in[i]), len(rejected_in[i])  # tokens in the row
        n, pad = n_p + k_c + k_r, width - n_p - k_c - k_r
        ids += prompts[i] + chosen_in[i] + rejected_in[i] + [pad_id] * pad
        positions += [*range(n_p + k_c), *range(n_p, n_p + k_r)] + [0] * pad
        parts += [0] * n_p + [1] * k_c + [2] * k_r + [3] * pad
        chosen_pred += range(i * width + n_p - 1, i * width + n_p - 1 + len(chosen[i]))
        rejected_pred += ([i * width + n_p - 1] if rejected[i] else []) + list(range(i * width + n_p + k_c, i * width + n))
    lengths = [len(c) for c in chosen] + [len(r) for r in rejected]
    label_mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]  # (2B, L)
    pred_index = torch.tensor(chosen_pred + rejected_pred, dtype=torch.long)
    # The prompt's own labels x_1 .. x_{P-1}, predicted by positions 0 .. P-2 (read only for ORPO's prompt NLL).
    prompt_width = max(map(len, prompts))
    prompt_mask = torch.tensor([[1] * len(p) + [0] * (prompt_width - len(p)) for p in prompts], dtype=torch.long)
    prompt_pred = [j for i, p in enumerate(prompts) for j in range(i * width, i * width + max(len(p) - 1, 0))]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long).view(b, width),
        "position_ids": torch.tensor(positions, dtype=torch.long).view(b, width),
        "part_ids": torch.tensor(parts, dtype=torch.long).view(b, width),
        "completion_mask": F.pad(label_mask.long(), (1, 0)),
        "pred_index": pred_index,
        "read_rows": pred_index.unique(),
        "labels": torch.tensor([t for c in chosen for t in c] + [t for r in rejected for t in r], dtype=torch.long),
        "prompt_mask": prompt_mask,
        "prompt_pred_index": torch.tensor(prompt_pred, dtype=torch.long),
        "prompt_labels": torch.tensor([t for p in prompts for t in p[1:]], dtype=torch.long),
    }


MASK_BACKENDS = ("sdpa", "eager", "flex_attention")  # attention implementations that take the shared layout's mask


def _attends(q_part: Tensor, k_part: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """May a query (part, position) attend to a key? Parts: 0 prompt, 1 chosen, 2 rejected, 3 padding."""
    allowed = (q_pos >= k_pos) & (q_part != 3) & (k_part != 3) & ~((q_part == 2) & (k_part == 1))
    return allowed | ((q_part == 3) & (q_pos == k_pos))  # padding rows attend to themselves only


def shared_attention_mask(batch: dict[str, Tensor]) -> Tensor:
    """Boolean (B, 1, T, T) mask, True where a query may attend to a key (see the module docstring)."""
    part = batch["part_ids"]  # (B, T)
    pos = torch.arange(part.shape[1], device=part.device)
    return _attends(part[:, :, None], part[:, None, :], pos[None, :, None], pos[None, None, :]).unsqueeze(1)


def _mask_for(model: nn.Module, batch: dict[str, Tensor], dtype: torch.dtype):
    """The mask in the form the model's attention backend reads: boolean for sdpa, additive float for eager, a
    block-sparse `BlockMask` for flex_attention (whose kernels skip the fully masked 128 x 128 tiles)."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        part = batch["part_ids"]
        b, t = part.shape
        return create_block_mask(lambda b, h, q, k: _attends(part[b, q], part[b, k], q, k), b, None, t, t,
                                 device=part.device)
    mask = shared_attention_mask(batch)
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"prompt sharing needs attention {' / '.join(MASK_BACKENDS)} (a custom mask), not {impl!r}")


# Decoder layers whose forward is exactly h += attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h)).
TRIMMABLE_LAYERS = frozenset({"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer",
                              "GemmaDecoderLayer"})


def trim_last_layer(model: nn.Module) -> bool:
    """Let the model's last decoder layer run its MLP only at the rows a prompt-shared batch reads.

    The LM head reads the last hidden state at the C + R predicting positions alone (`pred_index`). At the other
    positions (the prompt but its last token, padding) the last layer's output feeds nothing. Its attention still
    runs everywhere, since the predicting positions attend to every earlier key and value; its MLP, most of a
    layer's work, then runs at the read rows only. The layer takes them as `read_rows` (flat indices into B x T),
    passed through the decoder's keyword arguments; without them (generation, the standard layout) it runs as
    before. `read_rows` must hold each row once (`collate_shared_pairs` gives them): a repeated row would get its
    gradient twice. Under gradient checkpointing (training) the layer runs whole, checkpointed as before. Returns
    whether the last layer was patched: only transformers' own (5.x) layers of Llama's structure are. The patch lives
    on the layer instance: state_dict, save_pretrained and deepcopy keep working; a whole pickled model would not
    unpickle (save its state_dict instead).
    """
    from transformers import __version__

    if int(__version__.split(".")[0]) < 5:  # before 5.x, layers returned tuples and took no extra keyword arguments
        return False
    parts = decoder_and_head(model)
    layers = getattr(parts[0], "layers", None) if parts is not None else None
    kind = type(layers[-1]) if layers else None
    if kind is None or kind.__name__ not in TRIMMABLE_LAYERS or not kind.__module__.startswith("transformers.models."):
        return False  # remote code may reuse a name with another forward
    last = layers[-1]
    last.forward = types.MethodType(_trimmed_forward, last)  # bound to the layer: a deepcopy rebinds to the copy
    return True


def _is_trimmed(decoder: nn.Module) -> bool:
    """Whether `trim_last_layer` patched this decoder's last layer (so that it takes `read_rows`)."""
    layers = getattr(decoder, "layers", None)
    return bool(layers) and getattr(vars(layers[-1]).get("forward"), "__func__", None) is _trimmed_forward


def _trimmed_forward(self: nn.Module, hidden_states: Tensor, read_rows: Tensor | None = None, **kwargs) -> Tensor:
    """The last layer's forward with its MLP at `read_rows` only (see `trim_last_layer`); otherwise the class's."""
    if read_rows is None or (self.training and getattr(self, "gradient_checkpointing", False)):
        return type(self).forward(self, hidden_states, **kwargs)  # checkpointing wraps the class's forward
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    flat = (hidden_states + attended).flatten(0, 1)  # (B * T, H)
    read = flat[read_rows]
    read = read + self.mlp(self.post_attention_layernorm(read))
    return flat.index_copy(0, read_rows, read).view_as(hidden_states)  # unread rows: the MLP's input, unused


def _predicting(model: nn.Module, batch: dict[str, Tensor], prompt: bool = False) -> tuple[Tensor, nn.Linear | None]:
    """The forward of a prompt-shared batch up to its n predicting positions (pred_index order, then with `prompt` the
    prompt_pred_index ones): their last hidden states (n, H) and the LM head, or, for a model whose logits are more
    than head(hidden), their logits (n, V) and None. The trimmed last layer (`trim_last_layer`) is given the rows to
    compute."""
    dtype = next(model.parameters()).dtype
    inputs = {"input_ids": batch["input_ids"], "attention_mask": _mask_for(model, batch, dtype),
              "position_ids": batch["position_ids"]}
    index = torch.cat([batch["pred_index"], batch["prompt_pred_index"]]) if prompt else batch["pred_index"]
    parts = decoder_and_head(model)
    if parts is None:  # extra logit processing: full logits, then pick the predicting positions
        return model(**inputs, use_cache=False).logits.flatten(0, 1)[index], None
    decoder, head = parts
    if _is_trimmed(decoder):
        inputs["read_rows"] = index.unique() if prompt else batch["read_rows"]
    hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    return hidden.flatten(0, 1)[index], head


def shared_token_logps(model: nn.Module, batch: dict[str, Tensor], chunk_size: int | None = None) -> Tensor:
    """Per-token completion log-probs (2B, L) of a prompt-shared batch, aligned with batch["completion_mask"][:, 1:].

    `pair_logps(shared_token_logps(model, batch), batch["completion_mask"])` is then the usual record.
    `chunk_size`: rows of the LM head computed at a time (`prefopt.fast.head.label_logps_from_hidden`).
    """
    return shared_token_scores(model, batch, chunk_size).logps


def shared_token_scores(
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int | None = None, *, distribution: bool = False,
    collision: bool = False, prompt: bool = False,
) -> TokenScores:
    """`TokenScores` of a prompt-shared batch, in the standard per-token layout of batch["completion_mask"][:, 1:]:
    the full next-token distributions with `distribution` (a per-token KL), WPO's log sum_v p_v^2 with `collision`,
    and with `prompt` each pair's prompt log-probs (its predicting positions are read as well)."""
    picked, head = _predicting(model, batch, prompt)
    n, mask = batch["pred_index"].shape[0], batch["completion_mask"]
    values, logprobs, coll = label_scores(picked[:n], head, batch["labels"], chunk_size, distribution=distribution,
                                          collision=collision)
    # the row-major order of the slots is the order of pred_index
    scores = TokenScores(to_slots(values, mask), logprobs, None if coll is None else to_slots(coll, mask))
    if prompt:
        values, _, _ = label_scores(picked[n:], head, batch["prompt_labels"], chunk_size)
        scores.prompt_logps = to_slots(values, batch["prompt_mask"]).sum(-1)
        scores.prompt_lengths = batch["prompt_mask"][:, 1:].sum(-1).to(torch.float32)
    return scores
