"""The gold task's preference pairs: reference samples on the training prompts, labelled by the gold reward.

`ensure_pairs`: two reference samples per training prompt and pair, labelled by a Bradley-Terry draw on the gold reward,
cached under ``cache_dir/pairs-<hash of (reference, seed, sizes, T, ...)>``; a new seed redraws the pairs
(docs/gold_task.md, 'Redraw the pairs per seed'). Optionally, further reference responses per pair with their gold
rewards (TPO's gold response, InfoNCA's K responses). Written atomically, like every artifact of `prefopt.gold.build`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefopt.gold import task
from prefopt.gold.build import (
    REFERENCE_META, _atomic_dir, _derive_seed, _hash, default_cache_dir, ensure_reference, load_reference,
)
from prefopt.gold.sampling import Response, sample_responses

log = logging.getLogger(__name__)

PAIRS_VERSION = 1
PAIRS_META = "meta.json"


def _reference_identity(reference_dir: Path) -> str:
    """The recipe key of one of our references; for any other directory, a hash of its weight files."""
    meta = reference_dir / REFERENCE_META
    if meta.is_file():
        return json.loads(meta.read_text())["key"]
    digest = hashlib.sha256()
    for f in sorted(reference_dir.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Labeler:
    """How pairs are formed and labelled: the default is a Bradley-Terry labeler on the gold reward at temperature T;
    the other knobs are the scenarios' failure modes (docs/gold_task.md, 'Scenario knobs'), all off by default.

    - label_flip: each label is flipped with this probability after it is drawn (noisy labels; T = 0 with a flip
      rate eps is the symmetric-noise model robust DPO is unbiased for).
    - length_bias: with this probability the labeler ignores the reward and prefers the longer response (responses
      of equal length keep the reward's label); the gold reward itself ignores length.
    - rejected_edits: > 0: the pair's second response is the first with this many words replaced by other content
      words, drawn uniformly (near-duplicate pairs); labelled by the reward as usual.
    - excluded_words: responses holding any of these words are never put in a pair or given as a further response
      (the data's coverage narrowed: pairs come from the reference conditioned on avoiding them).
    Every knob draws from a stream of its own (`noise`), so the reference samples and the Bradley-Terry draws are
    those of the default labeler: scenario levels differ only where the knob acts (common random numbers).
    """

    temperature: float = 1.0
    label_flip: float = 0.0
    length_bias: float = 0.0
    rejected_edits: int = 0
    excluded_words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("label_flip", "length_bias"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.gold.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.temperature < 0 or self.rejected_edits < 0:
            raise ValueError(f"data.gold: label_temperature and rejected_edits must be >= 0, got {self.temperature} "
                             f"and {self.rejected_edits}")
        unknown = sorted(set(self.excluded_words) - set(task.CONTENT_WORDS))
        if unknown:
            raise ValueError(f"data.gold.excluded_words: {unknown} are not words of the task; its words: "
                             f"{', '.join(task.CONTENT_WORDS)}")

    def settings(self) -> dict[str, object]:
        """The knobs that are on (the cache key of pairs without them stays as it was before the knobs existed)."""
        default = Labeler()
        return {f"labeler_{k}": v for k, v in dataclasses.asdict(self).items()
                if k != "temperature" and v != getattr(default, k)}

    def valid(self, response: Response) -> bool:
        """Usable in a pair: ended with <eos>, non-empty, only content words (no stray special tokens), none excluded."""
        _, words, ended = response
        return (ended and len(words) > 0 and all(w in task.CONTENT_WORDS for w in words)
                and not any(w in self.excluded_words for w in words))

    def edit(self, words: list[str], noise: torch.Generator) -> list[str]:
        """`words` with `rejected_edits` distinct positions (at most all) each replaced by a different content word."""
        out = list(words)
        for position in torch.randperm(len(out), generator=noise)[: self.rejected_edits].tolist():
            allowed = [w for w in task.CONTENT_WORDS if w != out[position] and w not in self.excluded_words]
            out[position] = allowed[int(torch.randint(len(allowed), (), generator=noise))]
        return out

    def a_wins(self, a: list[str], b: list[str], r_a: float, r_b: float, generator: torch.Generator,
               noise: torch.Generator) -> tuple[bool, bool]:
        """(is a chosen?, was the label flipped?): the Bradley-Terry draw on `generator`, then the knobs on `noise`."""
        # P(a > b): Bradley-Terry at temperature T; T = 0 is its limit (the higher reward wins, ties 50/50).
        if self.temperature > 0:
            p_a = 1.0 / (1.0 + math.exp(-(r_a - r_b) / self.temperature))
        else:
            p_a = 1.0 if r_a > r_b else 0.0 if r_a < r_b else 0.5
        a_wins = float(torch.rand((), generator=generator)) < p_a
        if self.length_bias and float(torch.rand((), generator=noise)) < self.length_bias and len(a) != len(b):
            a_wins = len(a) > len(b)
        flipped = bool(self.label_flip) and float(torch.rand((), generator=noise)) < self.label_flip
        return a_wins != flipped, flipped


def _valid_pools(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, need: int, generator: torch.Generator,
                 labeler: Labeler) -> tuple[dict[str, list[Response]], int]:
    """At least `need` valid reference samples per training prompt (rejection sampling), and how many were drawn."""
    pools: dict[str, list[Response]] = {t: [] for t in task.TRAIN_TOPICS}
    drawn, n = 0, need // 2
    while any(len(p) < need for p in pools.values()):
        # Oversample a little: invalid responses (empty, truncated, stray tokens) are rare under the reference.
        batch = sample_responses(model, tokenizer, task.TRAIN_TOPICS, 2 * n + n // 20 + 4, generator)
        drawn += len(batch)
        for response in batch:
            if labeler.valid(response):
                pools[response[0]].append(response)
    return pools, drawn


def _add_extras(rows: list[dict[str, object]], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                count: int, best_of: int, generator: torch.Generator, labeler: Labeler) -> None:
    """Give every row `count` further reference responses (`extra`) with their gold rewards (`extra_rewards`), each
    the best by gold reward of `best_of` fresh samples (the first of the best on a tie)."""
    per_topic = {t: sum(row["topic"] == t for row in rows) for t in task.TRAIN_TOPICS}
    pools, _ = _valid_pools(model, tokenizer, max(per_topic.values()) * count * best_of, generator, labeler)
    taken = dict.fromkeys(task.TRAIN_TOPICS, 0)
    for row in rows:
        topic, extras = row["topic"], []
        for _ in range(count):
            group = pools[topic][taken[topic] : taken[topic] + best_of]
            taken[topic] += best_of
            extras.append(max(((task.gold_reward(topic, words), words) for _, words, _ in group), key=lambda x: x[0]))
        row["extra"] = [" ".join(words) for _, words in extras]
        row["extra_rewards"] = [reward for reward, _ in extras]


def _sample_pairs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_pairs: int, labeler: Labeler,
    generator: torch.Generator, noise: torch.Generator,
) -> tuple[list[dict[str, object]], dict[str, float]]:
    """n_pairs labelled pairs per training prompt, ordered pair index first so any prefix is balanced."""
    pools, drawn = _valid_pools(model, tokenizer, 2 * n_pairs, generator, labeler)
    rows, agree, ties, flips, longer = [], 0, 0, 0, 0
    for i in range(n_pairs):
        for topic in task.TRAIN_TOPICS:
            (_, a, _), (_, b, _) = pools[topic][2 * i], pools[topic][2 * i + 1]
            if labeler.rejected_edits:
                b = labeler.edit(a, noise)
            r_a, r_b = task.gold_reward(topic, a), task.gold_reward(topic, b)
            a_wins, flipped = labeler.a_wins(a, b, r_a, r_b, generator, noise)
            (chosen, r_c), (rejected, r_r) = ((a, r_a), (b, r_b)) if a_wins else ((b, r_b), (a, r_a))
            ties += r_a == r_b
            agree += r_c > r_r
            flips += flipped
            longer += len(chosen) > len(rejected)
            rows.append({
                "prompt": task.prompt_text(topic), "chosen": " ".join(chosen), "rejected": " ".join(rejected),
                "chosen_reward": r_c, "rejected_reward": r_r, "topic": topic,
            })
    stats = {
        "pairs": len(rows),
        "ties": ties,
        "label_agreement": agree / max(len(rows) - ties, 1),  # among pairs with distinct rewards
        "label_agreement_all": agree / max(len(rows), 1),  # ties count as disagreement
        "discarded_fraction": 1 - sum(len(p) for p in pools.values()) / drawn,
        "flipped_fraction": flips / max(len(rows), 1),
        "chosen_longer_fraction": longer / max(len(rows), 1),
    }
    return rows, stats


def ensure_pairs(
    reference_dir: str | Path,
    seed: int,
    pairs_per_prompt: int = 500,
    val_pairs_per_prompt: int = 64,
    label_temperature: float = 1.0,
    extra_responses: int = 0,
    extra_best_of: int = 1,
    label_flip: float = 0.0,
    length_bias: float = 0.0,
    rejected_edits: int = 0,
    excluded_words: list[str] | tuple[str, ...] = (),
    cache_dir: str | Path | None = None,
) -> tuple[Path, Path]:
    """Paths of train.jsonl and val.jsonl: reference sample pairs on the 8 training prompts, gold-labelled.

    Both responses of a pair are sampled from the reference at temperature 1 with max 16 new tokens. Responses
    that are empty, that hit the 16-token cap without <eos> or that hold non-content tokens are discarded
    before pairing (rejection sampling; their mass under the reference is ~1e-3). Labels: chosen is `a` with
    probability sigmoid((R(a) - R(b)) / T); T = 0 means the higher gold reward wins and ties are a fair coin.
    The pairs depend on `seed` (and only on it, given the reference and sizes); val pairs are drawn from an
    independent stream, so they do not change with `pairs_per_prompt`. `extra_responses` further reference responses
    per pair (each the best of `extra_best_of` samples by gold reward: TPO's gold response) come from a stream of their
    own, so the pairs are the same with or without them. The scenario knobs (`Labeler`: label_flip, length_bias,
    rejected_edits, excluded_words) act on both splits.
    """
    labeler = Labeler(label_temperature, label_flip, length_bias, rejected_edits, tuple(excluded_words))
    if extra_responses < 0 or extra_best_of < 1:
        raise ValueError(f"data.gold: extra_responses must be >= 0 and extra_best_of >= 1, got {extra_responses} and "
                         f"{extra_best_of}")
    reference_dir = Path(reference_dir)
    settings = {
        "version": PAIRS_VERSION, "reference": _reference_identity(reference_dir), "seed": seed,
        "pairs_per_prompt": pairs_per_prompt, "val_pairs_per_prompt": val_pairs_per_prompt,
        "label_temperature": label_temperature, "topics": task.TRAIN_TOPICS, "max_new_tokens": 16,
    }
    if extra_responses:  # only then: the pairs' cache keys (and files) without further responses stay as they were
        settings |= {"extra_responses": extra_responses, "extra_best_of": extra_best_of}
    settings |= labeler.settings()
    final = Path(cache_dir or default_cache_dir()) / f"pairs-{_hash(settings)}"
    train_path, val_path = final / "train.jsonl", final / "val.jsonl"
    if (final / PAIRS_META).is_file():
        return train_path, val_path
    start = time.perf_counter()
    model, tokenizer = load_reference(reference_dir)
    meta: dict[str, object] = {"settings": settings}
    with _atomic_dir(final) as tmp:
        for split, n in (("train", pairs_per_prompt), ("val", val_pairs_per_prompt)):
            generator = torch.Generator().manual_seed(_derive_seed(seed, split, "pairs"))
            noise = torch.Generator().manual_seed(_derive_seed(seed, split, "labeler"))
            rows, meta[split] = _sample_pairs(model, tokenizer, n, labeler, generator, noise)
            if extra_responses:
                extras = torch.Generator().manual_seed(_derive_seed(seed, split, "extras"))
                _add_extras(rows, model, tokenizer, extra_responses, extra_best_of, extras, labeler)
            with open(tmp / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        meta["seconds"] = time.perf_counter() - start
        (tmp / PAIRS_META).write_text(json.dumps(meta, indent=2))
    log.info("sampled gold-task pairs in %.1f s into %s: %s", meta["seconds"], final, meta["train"])
    return train_path, val_path


def pair_files(seed: int, **options) -> tuple[Path, Path]:
    """The built-in dataset ("gold", `prefopt.train.builtin`): (train file, validation file) of a seed's pairs,
    drawn from the cached reference; `options` are the data's `gold` group (pairs per prompt, label temperature)."""
    return ensure_pairs(ensure_reference(), seed=seed, **options)
