"""Build and cache the gold task's artifacts: tokenizer, reference policy and preference pairs.

- `build_tokenizer`: a word-level tokenizer over `gold_task.VOCAB`. ``tokenizer("film :")`` is
  ``[<bos>, film, :]`` and ``tokenizer("good film", add_special_tokens=False)`` is just the words, so the
  DataModule's ``prompt ids + completion ids + [eos]`` is exactly ``<bos> TOPIC : w1 .. wL <eos>``.
- `ensure_reference`: a tiny Llama fine-tuned on base samples (SFT, prompt masked) so that pi_ref ~ pi_base
  (KL(base || ref) ~ 0.02 nats). Cached under ``cache_dir/reference-<hash of the recipe>``.
- the preference pairs drawn from the reference: `prefopt.gold.pairs`.
- sampling and scoring (`sample_responses`, `score_responses`) live in `gold_sampling`.

Every artifact is written into a temporary directory next to its final place and moved there with one
`os.replace`, so a crash never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from prefopt.gold import task
from prefopt.gold.sampling import Response, _prompt_ids, sample_responses, score_responses  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# Bump when the build code changes in a way the recipe fields do not capture: every cache key changes.
RECIPE_VERSION = 1
PAIRS_VERSION = 1
REFERENCE_META = "prefopt_reference.json"
PAIRS_META = "meta.json"



def default_cache_dir() -> Path:
    """$PREFOPT_CACHE if set, else ~/.cache/prefopt."""
    return Path(os.environ.get("PREFOPT_CACHE") or Path.home() / ".cache" / "prefopt")


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _derive_seed(*parts: object) -> int:
    """An independent 63-bit seed per purpose, so e.g. the val pairs do not depend on the train size."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside `final`; on success move it to `final` in one step, else delete it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same artifact first: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock on `final`'s build, so that processes sharing a fresh cache (a grid's workers, parallel
    test workers) build an artifact once: the others wait, then find it built. No-op where fcntl is missing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builds stay safe (_atomic_dir), only duplicated
        yield
        return
    with open(final.parent / f".{final.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `gold_task.VOCAB` (ids = positions), whitespace-split, <bos> prepended."""
    vocab = {word: i for i, word in enumerate(task.VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=task.UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Only <bos> is added; the DataModule appends <eos> itself after the completion.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{task.BOS} $A", pair=f"{task.BOS} $A $B", special_tokens=[(task.BOS, vocab[task.BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=task.BOS,
        eos_token=task.EOS,
        pad_token=task.PAD,
        unk_token=task.UNK,
        model_max_length=64,  # a full sequence is at most 3 + 16 + 1 tokens
    )


# ----------------------------------------------------------------------------------------------------------
# Reference policy


@dataclass(frozen=True)
class ReferenceRecipe:
    """Every setting of the reference build; its hash (with RECIPE_VERSION and the task) names the cache."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    num_samples: int = 50_000  # base samples over all 12 topics
    steps: int = 1500  # 500 steps left KL at 0.09 nats (docs/gold_task.md)
    batch_size: int = 128
    lr: float = 3e-3  # peak of the one-cycle schedule
    weight_decay: float = 0.0
    seed: int = 0
    kl_samples: int = 8192  # base samples used to measure KL(base || ref) after training


# A weak start (scenario S8, experiments/scenarios/weak_start.yaml): the same SFT stopped after 100 of the schedule's
# steps, KL(base || weak) ~ 0.57 nats against the reference's ~0.02 (its samples: reward 0.21, the base's 0.38, 7% outside
# the base's support): a model that has not been through its SFT stage yet.
WEAK_RECIPE = ReferenceRecipe(steps=100)


def reference_key(recipe: ReferenceRecipe) -> str:
    """Hash of the recipe, the build version and the task definition (vocabulary and base distribution)."""
    task_def = {"vocab": task.VOCAB, "weights": task.CATEGORY_WEIGHTS, "lengths": (task.MIN_LEN, task.MAX_LEN)}
    return _hash({"version": RECIPE_VERSION, "recipe": dataclasses.asdict(recipe), "task": task_def})


def _model_config(recipe: ReferenceRecipe, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _sft_data(tokenizer: PreTrainedTokenizerBase, n: int, generator: torch.Generator) -> torch.Tensor:
    """n base sequences ``<bos> TOPIC : w.. <eos>`` right-padded to (n, 3 + MAX_LEN + 1) token ids."""
    topics = [task.TOPICS[i] for i in torch.randint(len(task.TOPICS), (n,), generator=generator).tolist()]
    words = task.sample_base(topics, generator)
    vocab, prompts = tokenizer.get_vocab(), {t: _prompt_ids(tokenizer, t) for t in task.TOPICS}
    ids = torch.full((n, 3 + task.MAX_LEN + 1), tokenizer.pad_token_id, dtype=torch.long)
    for i, (topic, ws) in enumerate(zip(topics, words)):
        seq = prompts[topic] + [vocab[w] for w in ws] + [tokenizer.eos_token_id]
        ids[i, : len(seq)] = torch.tensor(seq)
    return ids


def measure_base_kl(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_samples: int, seed: int
) -> tuple[float, float]:
    """Monte-Carlo KL(base || model) per sequence and its standard error, using the exact base log-prob."""
    g = torch.Generator().manual_seed(seed)
    topics = [task.TOPICS[i] for i in torch.randint(len(task.TOPICS), (num_samples,), generator=g).tolist()]
    words = task.sample_base(topics, g)
    base = np.array([task.base_logprob(t, w) for t, w in zip(topics, words)])
    model_lp = score_responses(model, tokenizer, [(t, w, True) for t, w in zip(topics, words)]).double().numpy()
    diff = base - model_lp
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_reference(recipe: ReferenceRecipe, tokenizer: PreTrainedTokenizerBase) -> tuple[LlamaForCausalLM, float]:
    """SFT of a fresh tiny Llama on base samples; returns the model (eval mode) and its final loss."""
    # Parameter init draws from the global RNG inside transformers; fork it so the caller's stream is intact.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(_model_config(recipe, tokenizer))
    g = torch.Generator().manual_seed(_derive_seed(recipe.seed, "sft-data"))
    data = _sft_data(tokenizer, recipe.num_samples, g)  # (N, 16)
    labels = data.clone()
    labels[:, :3] = -100  # the prompt <bos> TOPIC : is given, not learned
    labels[data == tokenizer.pad_token_id] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    model.train()
    order, cursor, loss = torch.randperm(len(data), generator=g), 0, torch.tensor(float("nan"))
    for _ in range(recipe.steps):
        if cursor + recipe.batch_size > len(order):  # a new epoch, reshuffled
            order, cursor = torch.randperm(len(data), generator=g), 0
        idx = order[cursor : cursor + recipe.batch_size]
        cursor += recipe.batch_size
        loss = model(input_ids=data[idx], labels=labels[idx]).loss  # mean over completion tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, float(loss.detach())


def ensure_reference(cache_dir: str | Path | None = None, recipe: ReferenceRecipe | None = None) -> Path:
    """Directory of the reference policy (model and tokenizer, `save_pretrained` format); built if missing.

    Deterministic from the recipe's seed. A changed recipe (or RECIPE_VERSION, or task definition) hashes to
    a new directory and is rebuilt; the built one also holds REFERENCE_META with the measured KL(base || ref).
    """
    recipe = recipe or ReferenceRecipe()
    final = Path(cache_dir or default_cache_dir()) / f"reference-{reference_key(recipe)}"
    if (final / REFERENCE_META).is_file():
        return final
    with _build_lock(final):
        if not (final / REFERENCE_META).is_file():  # not built by another process while this one waited
            _build_reference(final, recipe)
    return final


def _build_reference(final: Path, recipe: ReferenceRecipe) -> None:
    log.info("building the gold-task reference in %s (takes about a minute)", final)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    # One CPU thread: the weights then do not depend on the caller's thread count, and at this size one
    # thread is steady (~27 ms a step) where two are faster alone but stall when another process holds a core.
    with _num_threads(1):
        model, final_loss = _train_reference(recipe, tokenizer)
    train_s = time.perf_counter() - start
    kl, kl_se = measure_base_kl(model, tokenizer, recipe.kl_samples, _derive_seed(recipe.seed, "kl"))
    meta = {
        "key": reference_key(recipe),
        "recipe_version": RECIPE_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "kl_base_ref": kl,
        "kl_base_ref_se": kl_se,
        "final_sft_loss": final_loss,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_s,
    }
    with _atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / REFERENCE_META).write_text(json.dumps(meta, indent=2))
    log.info("built the reference in %.1f s: KL(base || ref) = %.4f ± %.4f nats", train_s, kl, kl_se)


def ensure_weak_reference(cache_dir: str | Path | None = None) -> Path:
    """Directory of the weak start (`WEAK_RECIPE`, built-in model name "gold_weak"); built if missing (~10 s)."""
    return ensure_reference(cache_dir, WEAK_RECIPE)


def load_reference(reference_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The reference model (fp32, eval mode) and its tokenizer from a directory of `ensure_reference`."""
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(reference_dir)
