"""Export a trained policy from a checkpoint as a `save_pretrained` directory that transformers loads directly.

    python -m prefopt export --ckpt runs/.../checkpoints/last.ckpt --out exported/ [--merge-lora] [--dtype bfloat16]

The policy is rebuilt from the checkpoint's own hyperparameters (its `model`, `dtype` and `lora` settings), its
trained weights loaded, and written with the tokenizer (and the chat template the data used, if it replaced the
tokenizer's):
- full fine-tuning: the model, loadable with `AutoModelForCausalLM.from_pretrained(out)`;
- LoRA, `--merge-lora`: the adapter merged into the base weights, a plain model as above;
- LoRA without it: the adapter alone (adapter_config.json names the base model); transformers loads it with
  `AutoModelForCausalLM.from_pretrained(out)` when peft is installed, and it can seed another run
  (`model.lora.adapter: out`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefopt.train.formats import read_chat_template
from prefopt.train.lora import LoraOptions, attach_lora
from prefopt.train.models import load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


def _lora(value: Any) -> LoraOptions | None:
    if value is None or isinstance(value, LoraOptions):
        return value
    return LoraOptions(**dict(value))


def load_policy(ckpt_path: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(policy with its trained weights, module hyperparameters, datamodule hyperparameters) of a checkpoint."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hp = dict(ckpt.get("hyper_parameters") or {})
    if "model" not in hp:
        raise ValueError(f"{ckpt_path}: not a prefopt checkpoint (no model in its hyper_parameters)")
    kwargs = {"dtype": hp.get("dtype", "float32"), "attn_implementation": hp.get("attn_implementation")}
    policy = load_causal_lm(hp["model"], **kwargs)
    lora = _lora(hp.get("lora"))
    if lora is not None:
        policy, _ = attach_lora(policy, lora, with_reference=False)
    state = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    result = policy.load_state_dict(state, strict=lora is None)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad} if lora is not None else set()
    missing = sorted(trainable & set(result.missing_keys))
    if missing:
        raise KeyError(f"{ckpt_path}: no trained weights for {len(missing)} adapter parameters, e.g. {missing[0]}")
    return policy.eval(), hp, dict(ckpt.get("datamodule_hyper_parameters") or {})


def export(ckpt_path: str | Path, out: str | Path, merge_lora: bool = False, dtype: str | None = None) -> Path:
    """Write the checkpoint's policy (and tokenizer) to `out`; returns `out`."""
    policy, hp, data_hp = load_policy(ckpt_path)
    is_lora = hp.get("lora") is not None
    if merge_lora and not is_lora:
        raise ValueError(f"{ckpt_path}: --merge-lora given, but this run trained every weight (no LoRA)")
    if merge_lora:
        policy = policy.merge_and_unload()
    if dtype is not None:
        policy = policy.to(getattr(torch, dtype))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out)
    tokenizer = load_tokenizer(hp["model"])
    if data_hp.get("chat_template"):  # the template the data was rendered with
        tokenizer.chat_template = read_chat_template(data_hp["chat_template"])
    tokenizer.save_pretrained(out)
    kind = "LoRA adapter" if is_lora and not merge_lora else "model"
    log.info("exported the %s of %s to %s", kind, ckpt_path, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m prefopt export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint of a prefopt run (e.g. checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="the output directory (created if missing)")
    parser.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the base weights")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast before saving")
    args = parser.parse_args(argv)
    return export(args.ckpt, args.out, merge_lora=args.merge_lora, dtype=args.dtype)
