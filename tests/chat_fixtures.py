"""A byte-level tokenizer with a chat template, a tiny model for it, and preference rows in the hub's formats.

The tokenizer is pure bytes (no merges), so tokenizing a text in pieces gives the same ids as tokenizing it whole:
tests can compare prompt_ids + completion_ids with the ids of the full rendering. Its chat template is
Qwen-like: `<|role|>\\ncontent<|end|>\\n` per message, `<|assistant|>\\n` as the generation prompt, and `<|end|>` (the
end of a turn) is eos.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Renders the generation prompt differently from an assistant message: breaks the prefix property.
BROKEN_TEMPLATE = CHAT_TEMPLATE.replace("%}<|assistant|>\n{% endif %}", "%}<|assistant|> {% endif %}")


def byte_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>")
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def save_byte_model(directory: Path, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """A 2-layer, 16-dim Llama over the byte tokenizer, saved with its tokenizer (save_pretrained)."""
    tok = byte_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


QUESTIONS = ["What is a film?", "Name a book.", "Is it fun?", "Say hi.", "Why read?", "Best song?"]
GOOD = ["A good story on a screen.", "A great novel.", "Yes, it is fun.", "Hi there!", "To learn.", "This one."]
BAD = ["No.", "Bad.", "Dull.", "Go away.", "Do not.", "None."]


def hh_rows(n: int = 24) -> list[dict]:
    """Anthropic/hh-rlhf style: full transcripts only; every third row has an earlier shared turn."""
    rows = []
    for i in range(n):
        q, good, bad = QUESTIONS[i % 6], GOOD[i % 6], BAD[(i + 1) % 6]
        head = "\n\nHuman: Hello.\n\nAssistant: Hello! How can I help?" if i % 3 == 0 else ""
        convo = f"{head}\n\nHuman: {q}\n\nAssistant:"
        rows.append({"chosen": f"{convo} {good}", "rejected": f"{convo} {bad}"})
    return rows


def message_rows(n: int = 24, style: str = "implicit") -> list[dict]:
    """Conversational pairs. style: "implicit" (trl-lib/ultrafeedback_binarized: full message lists),
    "explicit" (prompt messages + assistant-message lists), "h4" (a prompt string beside full lists)."""
    rows = []
    for i in range(n):
        q, good, bad = QUESTIONS[i % 6], GOOD[i % 6], BAD[(i + 1) % 6]
        prompt = [{"role": "system", "content": "Be kind."}] if i % 2 else []
        prompt = prompt + [{"role": "user", "content": q}]
        chosen, rejected = [{"role": "assistant", "content": good}], [{"role": "assistant", "content": bad}]
        if style == "explicit":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            row = {"chosen": prompt + chosen, "rejected": prompt + rejected, "score_chosen": 8.0, "score_rejected": 3.0}
            rows.append({"prompt": q, **row} if style == "h4" else row)
    return rows


def unpaired_rows(n: int = 24, conversational: bool = False) -> list[dict]:
    """trl-lib/kto-mix-14k style: prompt, completion, boolean label; each prompt has a good and a bad row."""
    rows = []
    for i in range(n // 2):
        q, good, bad = QUESTIONS[i % 6] + f" ({i})", GOOD[i % 6], BAD[(i + 1) % 6]
        for text, label in ((good, True), (bad, False)):
            if conversational:
                rows.append({"prompt": [{"role": "user", "content": q}],
                             "completion": [{"role": "assistant", "content": text}], "label": label})
            else:
                rows.append({"prompt": f"Q: {q}\nA:", "completion": f" {text}", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_hub_layout(directory: Path, train: list[dict], test: list[dict]) -> Path:
    """A dataset repository as the hub lays it out: data/<split>-00000-of-00001.parquet."""
    (directory / "data").mkdir(parents=True)
    for split, rows in (("train", train), ("test", test)):
        datasets.Dataset.from_list(rows).to_parquet(str(directory / "data" / f"{split}-00000-of-00001.parquet"))
    return directory
