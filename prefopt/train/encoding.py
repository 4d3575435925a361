"""Tokenization of checked rows (`prefopt.train.formats`): prompt ids and completion ids, cached by `datasets`.

Each example becomes id lists: `prompt_ids = tokenizer(prompt)` (the tokenizer's own special tokens, e.g. bos,
included; but not an eos that a tokenizer appends to every text: the prompt goes on with its completion), and each
completion's `tokenizer(completion, add_special_tokens=False) + [eos]` (no second eos after a completion that already
ends in it). Conversational rows were rendered with the chat template by the row checks, and their prompts are
tokenized without added special tokens (the template writes them). Further responses (`extra`) come out as
`extra_ids`, a list of id lists per row, encoded as the completions are.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

from prefopt.train.formats import EXTRA, EXTRA_SCORES, SCORES, Layout, RowError, row_texts

log = logging.getLogger(__name__)

ENCODING_VERSION = 3  # bump when the encoding below, or a row check's message, changes: part of the cache fingerprint


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes its ids: vocabulary, rules, special tokens, template."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None), spec.pop("padding", None)  # call-time state, set by padded calls elsewhere
    else:  # a slow (python) tokenizer
        spec = sorted(tokenizer.get_vocab().items())
    return Hasher.hash([type(tokenizer).__name__, spec, tokenizer.chat_template, tokenizer.eos_token_id,
                        sorted(map(str, tokenizer.all_special_tokens))])


def added_suffix(tokenizer: Any) -> list[int]:
    """The ids a tokenizer's post-processor appends to every text it encodes with special tokens: [eos] for one set
    up to add eos (a Llama or Qwen tokenizer with `add_eos_token`), usually []. Found from one probe text."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1) if bare else ():
        if full[start : start + len(bare)] == bare:
            return full[start + len(bare) :]
    return []


def _encode_batch(batch: dict[str, list], indices: list[int], layout: Layout, tokenizer: Any, marker: str,
                  source: str, suffix: tuple[int, ...] = ()) -> dict[str, list]:
    rows = []
    for j, i in enumerate(indices):
        try:
            rows.append(row_texts({f: batch[c][j] for f, c in layout.columns.items()}, layout, tokenizer, marker,
                                  source, i))
        except RowError as err:  # kept as data: the DataModule raises or skips (`bad_rows`), naming them all
            rows.append({"identical": False, "error": str(err)})
    names = ("chosen", "rejected") if layout.paired else ("completion",)
    keep = [j for j, r in enumerate(rows) if not (r["identical"] or "error" in r)]
    # Text prompts get the tokenizer's own special tokens (bos); chat templates write theirs into the text.
    special = not layout.conversational
    out: dict[str, list] = {"row": list(indices), "error": [r.get("error", "") for r in rows],
                            "prompt_ids": [[] for _ in rows]}
    out.update({f"{n}_ids": [[] for _ in rows] for n in names})
    if keep:
        encoded = {"prompt": tokenizer([rows[j]["prompt"] for j in keep], add_special_tokens=special)["input_ids"]}
        for n in names:
            encoded[n] = tokenizer([rows[j][n] for j in keep], add_special_tokens=False)["input_ids"]
        eos, cut = tokenizer.eos_token_id, len(suffix)
        for k, j in enumerate(keep):
            prompt = encoded["prompt"][k]
            # A prompt continues with its completion: no eos (or other suffix) that the tokenizer adds to every text.
            out["prompt_ids"][j] = prompt[:-cut] if cut and tuple(prompt[-cut:]) == suffix else prompt
            for n in names:
                out[f"{n}_ids"][j] = _with_eos(encoded[n][k], eos, layout.conversational)
    if EXTRA in layout.columns:
        out.update(_encode_extras(rows, keep, layout, tokenizer))
    if not layout.paired:
        out["desirable"] = [bool(r.get("label")) for r in rows]
    for field in (f for f in SCORES if f in layout.columns):
        out[field] = [r.get(field, 0.0) for r in rows]
    return out


def encode(rows: Any, layout: Layout, tokenizer: Any, source: str, marker: str = "Assistant:",
           num_proc: int | None = None) -> Any:
    """Check and tokenize every row: a `datasets.Dataset` of prompt_ids, chosen_ids/rejected_ids (or completion_ids
    and desirable; extra_ids when the layout reads further responses), row (the source row index, from 0) and error (why the row failed a check, or ""). Identical pairs
    and failed rows come out with empty id lists.

    The result is cached by `datasets` under a fingerprint of the input rows, the layout, the tokenizer and this
    encoding's version, so a second run with the same inputs reads it instead of tokenizing again.
    """
    from datasets.fingerprint import Hasher

    # The source's name is part of it because the row checks' messages (kept in the result) name it.
    fingerprint = Hasher.hash([rows._fingerprint, ENCODING_VERSION, layout.structure, layout.conversational,
                               sorted(layout.columns.items()), marker, tokenizer_fingerprint(tokenizer),
                               source])
    suffix = () if layout.conversational else tuple(added_suffix(tokenizer))  # chat prompts add no special tokens
    if suffix:
        log.info("%s: the tokenizer appends %s to every text; cut from the prompts", source,
                 tokenizer.convert_ids_to_tokens(list(suffix)))
    function = partial(_encode_batch, layout=layout, tokenizer=tokenizer, marker=marker, source=source, suffix=suffix)
    return rows.map(function, batched=True, with_indices=True, remove_columns=rows.column_names,
                    new_fingerprint=fingerprint, num_proc=num_proc, desc=f"tokenizing {source}")


def _with_eos(ids: list[int], eos: int, conversational: bool) -> list[int]:
    """eos ends every completion, once: a chat template's end-of-turn may already be eos, and a text completion may
    already end in the eos token's text."""
    has_eos = eos in ids if conversational else ids[-1:] == [eos]
    return ids if has_eos else ids + [eos]


def _encode_extras(rows: list[dict], keep: list[int], layout: Layout, tokenizer: Any) -> dict[str, list]:
    """`extra_ids` (a list of completion id lists per row) and `extra_scores`, in one tokenizer call for the batch."""
    flat = [text for j in keep for text in rows[j][EXTRA]]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    out: dict[str, list] = {"extra_ids": [[] for _ in rows]}
    for j in keep:
        out["extra_ids"][j] = [_with_eos(next(encoded), tokenizer.eos_token_id, layout.conversational)
                               for _ in rows[j][EXTRA]]
    if EXTRA_SCORES in layout.columns:
        out[EXTRA_SCORES] = [r.get(EXTRA_SCORES, []) for r in rows]
    return out
