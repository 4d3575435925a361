"""Loading policies, references and tokenizers by name: the built-in task, a hub name, or a local directory.

A built-in name (`prefopt.train.builtin`: "gold", the built-in task's reference policy, built and cached on first
use) is made in code; any other string goes to `transformers` as it is: a hub name such as `Qwen/Qwen2.5-0.5B-Instruct` (offline, read from
the local hub cache when it was downloaded before), or a local `save_pretrained` directory. Any
`AutoModelForCausalLM` architecture loads, in fp32, bf16 or fp16, with the attention implementation asked for.
A local path is checked first, so that a missing directory, a directory without weights or a LoRA adapter
directory gets an error that says so rather than a failed hub lookup.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prefopt.train.builtin import MODELS, source

log = logging.getLogger(__name__)

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def resolve(name: str) -> str:
    """The path or hub name that transformers should load for `name`."""
    if name in MODELS:
        return str(source(MODELS, name)())
    return name


def _looks_local(name: str) -> bool:
    """Hub names are "name" or "org/name"; anything else is meant as a path."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1


def check_model_path(name: str) -> None:
    """Fail clearly on a local model path that cannot hold a full model."""
    p = Path(name).expanduser()
    if not p.exists():
        if _looks_local(name):
            raise FileNotFoundError(f"no such model directory: {name}")
        return  # a hub name
    if not p.is_dir():
        raise NotADirectoryError(f"model path {p} is a file; give a save_pretrained directory or a hub name")
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise ValueError(f"model directory {p} holds a LoRA adapter, not a model: set model.model to its base model "
                         f"and model.lora.adapter to {p}")
    if not any(next(p.glob(g), None) for g in WEIGHT_GLOBS):
        raise FileNotFoundError(f"model directory {p} has no weights (*.safetensors or *.bin)")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer; one without a pad token gets its eos token as pad (only masks ever see pad ids)."""
    path = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        check_model_path(path)
        raise OSError(f"could not load a tokenizer from {name!r}: {err}") from err
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


def load_causal_lm(
    name: str, dtype: str = "float32", attn_implementation: str | None = None, device: torch.device | None = None
) -> PreTrainedModel:
    """Load a causal LM by hub name or local directory, with dropout disabled.

    device: load the weights straight onto it (None: the CPU), so that the host never holds a full copy.
    """
    path = resolve(name)
    check_model_path(path)
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device is not None:
        kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:  # e.g. a hub name that is neither reachable nor cached
        raise OSError(f"could not load the causal LM {name!r}: {err}") from err
    disable_dropout(model)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass: less memory, about a quarter more time per step.

    Non-reentrant checkpointing, so that inputs need no gradient (which LoRA, with frozen embeddings, would need).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the frozen reference."""
    model.eval()
    model.requires_grad_(False)
    return model
