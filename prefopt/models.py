"""Loading policies, references and tokenizers by name: the built-in task, a hub name, or a local directory.

`"gold"` names the built-in task's reference policy, built and cached on first use (`prefopt.gold_build`); any
other string goes to `transformers` as it is (a hub name such as `Qwen/Qwen2.5-0.5B-Instruct`, or a local
`save_pretrained` directory).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN = "gold"


def resolve(name: str) -> str:
    """The path or hub name that transformers should load for `name`."""
    if name == BUILTIN:
        from prefopt.gold_build import ensure_reference

        return str(ensure_reference())
    return name


def _check_local(path: str) -> None:
    p = Path(path)
    if p.exists() and p.is_dir():
        weights = [*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.safetensors.index.json")]
        if not weights:
            raise FileNotFoundError(f"model directory {p} has no weights (*.safetensors or *.bin)")
    elif p.exists():
        raise NotADirectoryError(f"model path {p} is a file; give a save_pretrained directory or a hub name")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer; one without a pad token gets its eos token as pad (only masks ever see pad ids)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: nn.Module) -> None:
    """Dropout off: with it on, log-ratios are not 0 at step 0 and the reference is not a fixed function."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if hasattr(getattr(model, "config", None), key):
            setattr(model.config, key, 0.0)


def load_causal_lm(name: str, dtype: str = "float32", attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a causal LM by hub name or local directory, with dropout disabled."""
    path = resolve(name)
    _check_local(path)
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    disable_dropout(model)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the frozen reference."""
    model.eval()
    model.requires_grad_(False)
    return model
