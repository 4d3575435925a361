"""A micro model, tokenizer and preference file, made in code for fast offline end-to-end tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["good", "great", "fun", "nice", "bad", "awful", "dull", "sad", "the", "a", "it", "was", "film", "book", ":"]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def micro_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def save_micro_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer, 16-dim Llama and its tokenizer, saved with save_pretrained."""
    tok = micro_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_micro_pairs(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Pairs whose chosen completion has more positive words (jsonl: prompt, chosen, rejected, and the scores
    chosen_score / rejected_score: positive minus negative words, read by the losses that use scores; and two further
    responses per prompt, `extra`, with their `extra_scores`, read by TPO and InfoNCA with K responses)."""
    rng, other = random.Random(seed), random.Random(seed + 1)  # the further responses: a stream of their own
    pos, neg, neutral = WORDS[:4], WORDS[4:8], WORDS[8:12]
    rows = []
    for _ in range(n):
        topic = rng.choice(["film", "book"])
        good = [rng.choice(pos + neutral) for _ in range(rng.randint(2, 6))]
        bad = [rng.choice(neg + neutral) for _ in range(rng.randint(2, 6))]
        score = lambda words: float(sum(w in pos for w in words) - sum(w in neg for w in words))  # noqa: E731
        more = [[other.choice(pos + neg + neutral) for _ in range(other.randint(2, 6))] for _ in range(2)]
        rows.append({"prompt": f"{topic} :", "chosen": " ".join(good), "rejected": " ".join(bad),
                     "chosen_score": score(good), "rejected_score": score(bad),
                     "extra": [" ".join(m) for m in more], "extra_scores": [score(m) for m in more]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MICRO_BASE = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  max_epochs: -1
  check_val_every_n_epoch: null
  val_check_interval: 2
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {root}, name: auto}}
  callbacks:
    - class_path: prefopt.train.callbacks.MetricsJson
      init_args: {{monitor: val/margin_nats}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, save_top_k: 0}}
model:
  model: {model}
  optimizer:
    class_path: torch.optim.AdamW
    init_args: {{lr: 1.0e-3}}
  loss: {{name: dpo, beta: 0.1}}
data:
  dataset: {data}
  val_fraction: 0.25
  max_length: 16
  batch_size: 4
"""


def poison_loss(monkeypatch, is_nan) -> None:
    """Make the loss NaN on the training-loss calls (numbered from 1) for which `is_nan(call)` is true."""
    from prefopt.losses import LossConfig

    calls = {"n": 0}
    real_call = LossConfig.__call__

    def poisoned(self, lp):
        calls["n"] += 1
        out = real_call(self, lp)
        return out * float("nan") if is_nan(calls["n"]) else out

    monkeypatch.setattr(LossConfig, "__call__", poisoned)


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    return save_micro_model(tmp_path_factory.mktemp("micro_model"))


@pytest.fixture(scope="session")
def micro_pairs(tmp_path_factory) -> Path:
    return write_micro_pairs(tmp_path_factory.mktemp("micro_data") / "pairs.jsonl")


@pytest.fixture()
def micro_base(tmp_path, micro_model, micro_pairs, monkeypatch) -> Path:
    """A base config for the micro model and data; the CLI reads it instead of configs/base.yaml."""
    base = tmp_path / "micro_base.yaml"
    base.write_text(MICRO_BASE.format(root=tmp_path / "runs", model=micro_model, data=micro_pairs))
    monkeypatch.setenv("PREFOPT_BASE_CONFIG", str(base))
    return base
