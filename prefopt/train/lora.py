"""LoRA through peft (the optional extra `pip install -e ".[lora]"`): the policy trains adapters only, and the
reference is the same model with no second copy of its weights.

LoRA (Hu et al. 2021, arXiv 2106.09685): W x + (alpha / r) B A x on the target linear layers, B initialized to 0,
so the policy starts equal to its base; only A and B train.

Two starting points:
- a fresh adapter on the base model: the reference is the base, i.e. the policy with its adapters disabled
  (`peft`'s `disable_adapter()` for the length of the reference's forward);
- an already-trained adapter (`adapter: DIR`, a peft `save_pretrained` directory): it is loaded twice into the one
  model, as the trainable policy adapter and as a frozen `reference` adapter; the reference's forward switches to
  the frozen copy. Only adapter-sized weights are duplicated.

`AdapterReference` is that view of the policy as the reference: callable like a model, with `parameters()` and
`state_dict()` restricted to the reference's own weights (so the reference log-prob cache keys on them), and
never trainable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type
from torch import nn

POLICY_ADAPTER = "default"  # peft's default name; the name an exported adapter is saved under
REFERENCE_ADAPTER = "reference"
Dropout = restricted_number_type("Dropout", float, [(">=", 0.0), ("<", 1.0)])  # checked when the config is parsed


@dataclass
class LoraOptions:
    """LoRA settings (`model.lora`); null trains every weight."""

    r: PositiveInt = 16  # rank of the update, >= 1
    alpha: PositiveFloat = 32.0  # the update is scaled by alpha / r; > 0
    dropout: Dropout = 0.0  # adapter-input dropout in [0, 1); 0 keeps log-ratios exactly 0 at step 0
    target_modules: list[str] | str = "all-linear"  # module names ([q_proj, v_proj]) or every linear layer but the head
    adapter: str | None = None  # start from this trained adapter directory (it is also the reference); r, alpha
    # and target_modules then come from its adapter_config.json

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"lora: need r >= 1, alpha > 0 and dropout in [0, 1); got {self}")


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError('LoRA needs peft: pip install -e ".[lora]" (or pip install "peft>=0.13")') from err
    return peft


def _check_adapter_dir(path: str) -> None:
    if not (Path(path).expanduser() / "adapter_config.json").is_file():
        raise FileNotFoundError(f"lora.adapter {path}: no adapter_config.json there (a peft save_pretrained directory)")


def _belongs(key: str, adapter: str) -> bool:
    return f".{adapter}." in key or key.endswith(f".{adapter}")


def _is_adapter(key: str) -> bool:
    return "lora_" in key


class AdapterReference:
    """The frozen reference as a view of a LoRA policy: its adapters disabled, or a frozen adapter active."""

    def __init__(self, model: nn.Module, adapter: str | None) -> None:
        self.model, self.adapter = model, adapter  # adapter None: the base model (adapters disabled)

    def _own(self, key: str) -> bool:
        return not _is_adapter(key) or (self.adapter is not None and _belongs(key, self.adapter))

    @contextmanager
    def active(self) -> Iterator[None]:
        if self.adapter is None:
            with self.model.disable_adapter():
                yield
            return
        self.model.set_adapter(self.adapter)  # peft marks the active adapter trainable: undone below
        try:
            yield
        finally:
            self.model.set_adapter(POLICY_ADAPTER)
            for name, p in self.model.named_parameters():
                if _is_adapter(name) and _belongs(name, self.adapter):
                    p.requires_grad_(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self.model(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self.model.generate(*args, **kwargs)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if self._own(n))

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if self._own(k)}

    # The view follows the policy: moving, eval mode and freezing are the policy's business.
    def to(self, *args: Any, **kwargs: Any) -> AdapterReference:
        return self

    def eval(self) -> AdapterReference:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdapterReference:
        return self

    def __getattr__(self, name: str) -> Any:  # config, device, dtype, generation_config, ...
        if "model" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["model"], name)


def attach_lora(model: nn.Module, options: LoraOptions, with_reference: bool = True) -> tuple[nn.Module, Any]:
    """Wrap `model` with a trainable LoRA adapter; returns (policy, reference view or None)."""
    peft = _peft()
    if options.adapter is None:
        config = peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                                 target_modules=options.target_modules, task_type="CAUSAL_LM")
        policy = peft.get_peft_model(model, config)
        return policy, AdapterReference(policy, None) if with_reference else None
    _check_adapter_dir(options.adapter)
    policy = peft.PeftModel.from_pretrained(model, options.adapter, adapter_name=POLICY_ADAPTER, is_trainable=True)
    if not with_reference:
        return policy, None
    policy.load_adapter(options.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    policy.set_adapter(POLICY_ADAPTER)
    reference = AdapterReference(policy, REFERENCE_ADAPTER)
    for p in reference.parameters():
        p.requires_grad_(False)
    return policy, reference


def trainable_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the parameters that train (the policy adapter's)."""
    return {name for name, p in module.named_parameters() if p.requires_grad}
