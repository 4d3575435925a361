"""Reference log-probs computed once per (reference weights, tokenized data) and reused from disk.

The frozen reference gives the same log-probs for the same tokens in every run, so a grid of many losses, betas and
training seeds over one pair set needs them once. The table holds, per training pair (in `train_examples` order), the
reference's summed completion log-probs of chosen and rejected, their sums over the shared prefix (LD-DPO) and over
SamPO's down-sample (`prefopt.logps.sampled_mask`, keyed by the example's index: a pair's subset is the same in every
run), each under the name of the record field it fills (`FIELDS`), (N,) float64: the scorer reads a batch's rows by
its examples' `index`.

The cache key is a hash of the reference's weights and of the tokenized examples (every id list, in order), so a
changed model, tokenizer, truncation or pair set can never read a stale table. Files are written atomically, so a
crashed run leaves no half-written entry; concurrent runs that compute the same entry write identical bytes.

Only paired training data is cached: unpaired losses (KTO) score mismatched rows whose pairing depends on the batch,
so they keep a live reference. Validation always uses the live reference (it needs full logits for the KL metric).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.logps import TokenScores, forward_logits, pair_logps, token_fields, token_logps

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 3: SamPO's down-sampled sums joined the table
# record field filled from the table -> the field of a record scored with the reference in the policy's seat
FIELDS = {"ref_chosen_logps": "policy_chosen_logps", "ref_rejected_logps": "policy_rejected_logps",
          "ref_chosen_shared_logps": "policy_chosen_shared_logps",
          "ref_rejected_shared_logps": "policy_rejected_shared_logps",
          "ref_chosen_sampled_logps": "policy_chosen_sampled_logps",
          "ref_rejected_sampled_logps": "policy_rejected_sampled_logps"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt")) / "reference_logps"


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in state_dict order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def examples_hash(examples: list[dict[str, Any]]) -> str:
    """sha256 of the tokenized pairs, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]]).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_reference_logps(
    reference: nn.Module,
    examples: list[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Tensor]],
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Score every pair with the reference; returns {field: (N,) float64} for each of `FIELDS`."""
    device = next(reference.parameters()).device
    parts: dict[str, list[Tensor]] = {name: [] for name in FIELDS}
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        mask = batch["completion_mask"]
        tokens = token_logps(forward_logits(reference, batch), batch["input_ids"], mask)
        keys = batch.get("index", torch.arange(start, start + mask.shape[0] // 2, device=device))  # = train position
        lp = pair_logps(tokens, mask)  # the reference in the policy's seat
        lp = lp.replace(**token_fields(mask, TokenScores(tokens), sample_keys=keys))
        for name, seat in FIELDS.items():
            parts[name].append(getattr(lp, seat))
    return {name: torch.cat(values).double().cpu() for name, values in parts.items()}


def load_or_compute(
    reference: nn.Module,
    examples: list[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Tensor]],
    cache_dir: Path | None = None,
    batch_size: int = 64,
    tag: str = "",
) -> tuple[dict[str, Tensor], Path, bool]:
    """The table ({field: (N,)}) from the cache if present, else computed and stored. Returns (table, path, was_cached).

    `tag` joins the key: anything besides weights and data that changes the numbers (the precision, e.g. autocast).
    """
    tag = hashlib.sha256(tag.encode()).hexdigest()[:8] if tag else "plain"
    key = f"v{CACHE_VERSION}-{weights_hash(reference)}-{examples_hash(examples)}-{tag}"
    path = (cache_dir or default_cache_dir()) / f"{key}.pt"
    if path.is_file():
        table = torch.load(path, weights_only=True)
        if isinstance(table, dict) and set(table) == set(FIELDS) and all(
            v.shape == (len(examples),) for v in table.values()
        ):
            log.info("reference log-probs read from %s", path)
            return table, path, True
        log.warning("ignoring malformed reference cache entry %s", path)
    table = compute_reference_logps(reference, examples, collate, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)
    log.info("reference log-probs of %d pairs written to %s", len(examples), path)
    return table, path, False
