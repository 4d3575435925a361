"""Render the loss catalog (docs/losses.md) from the registry, so the page cannot drift from the code.

    python -m prefopt.losses.docs > docs/losses.md

tests/test_losses.py fails when the committed page differs from `render()`.
"""

from __future__ import annotations

import inspect
import sys

from prefopt.losses import LOSSES, LossConfig
from prefopt.losses.options import PAIR_OPTIONS, pair_options
from prefopt.losses.registry import BASE_FIELDS, REFERENCE_FIELDS, LossSpec
from prefopt.losses.schema import Hyperparameter
from prefopt.records import PairLogps, UnpairedLogps

COMMAND = "python -m prefopt.losses.docs > docs/losses.md"

_HEADER = f"""\
# Loss catalog

<!-- Generated from the registry by `{COMMAND}`; do not edit by hand. -->

Every loss is a pure function of a log-prob record (`prefopt.records.PairLogps` for pairs,
`UnpairedLogps` for unpaired rows) returning per-example losses; the batch loss is their mean. A config
names a loss and its hyperparameters, e.g. `{{name: dpo, beta: 0.1}}`; unknown names, unknown
hyperparameters and out-of-range values fail when the config is parsed.

Notation (with the pitfalls behind these choices: [loss_pitfalls.md](loss_pitfalls.md)): logp(y) is the completion
log-prob summed over tokens, |y| its token count, avg(y) = logp(y)/|y|, r = logp(y) - ref_logp(y), h = r_w - r_l,
L(z) = -log sigmoid(z), NLL(y) = -logp(y).
"Reward scale" is the factor the shared metrics multiply the reference-based margin h by (`reward_margin`);
1 means raw nats.
"""


def _unique_specs() -> list[LossSpec]:
    """Each spec once (aliases share one), in registration order."""
    seen: dict[str, LossSpec] = {}
    for spec in LOSSES.values():
        seen.setdefault(spec.name, spec)
    return list(seen.values())


# The families' order on the page, by defining module (a module not listed comes after these).
FAMILY_ORDER = ("paired", "margin_functions", "reshaped", "per_response", "scored", "adaptive", "token_level",
                "reference_free", "unpaired", "composite")


def _families(specs: list[LossSpec]) -> dict[str, list[LossSpec]]:
    """Specs grouped by the module that defines them (one module per family), titled by its docstring's first line."""
    families: dict[str, list[LossSpec]] = {}
    rank = {f"prefopt.losses.{m}": i for i, m in enumerate(FAMILY_ORDER)}
    for spec in sorted(specs, key=lambda s: rank.get(s.fn.__module__, len(rank))):  # stable: registration order within
        doc = inspect.getdoc(sys.modules[spec.fn.__module__]) or spec.fn.__module__
        families.setdefault(doc.splitlines()[0].rstrip("."), []).append(spec)
    return families


def _reads(spec: LossSpec) -> list[str]:
    """The record fields the loss reads at its default hyperparameters."""
    fields = LossConfig(spec.name).reads
    order = list(PairLogps.__dataclass_fields__) + list(UnpairedLogps.__dataclass_fields__)
    return sorted(fields, key=order.index)


def _extra_reads(spec: LossSpec) -> str:
    """What it reads besides the policy's sums and lengths, briefly: the reference's sums, and any other field."""
    config = LossConfig(spec.name)
    rest = [f for f in _reads(spec) if f not in BASE_FIELDS[config.paired] | REFERENCE_FIELDS[config.paired]]
    parts = (["reference sums"] if config.reads & REFERENCE_FIELDS[config.paired] else []) + [f"`{f}`" for f in rest]
    return ", ".join(parts) or "nothing else"


def _reference(spec: LossSpec) -> str:
    if hasattr(spec.fn, "needs_reference"):
        return "if any term does" if spec.name == "composite" else "depends on its hyperparameters"
    return "yes" if spec.needs_reference else "no"


def _scale(spec: LossSpec) -> str:
    if hasattr(spec.fn, "reward_scale"):
        return "its first term's" if spec.name == "composite" else "depends on its hyperparameters"
    return f"`{spec.reward_scale}`" if spec.reward_scale else "1"


def _data(spec: LossSpec, long: bool = False) -> str:
    if hasattr(spec.fn, "paired"):
        return "as its terms (all alike)" if spec.name == "composite" else "depends on its hyperparameters"
    if spec.paired:
        return "paired (PairLogps)" if long else "paired"
    return "unpaired rows (UnpairedLogps)" if long else "unpaired"


def _strength(spec: LossSpec) -> str:
    if spec.strength is None:
        return "none: a calibrating grid names the knob (e.g. the learning rate)"
    name, sign = spec.strength
    return f"`{name}`, " + ("larger values move the policy further (larger KL)" if sign > 0 else "larger values keep "
                            "the policy closer to the reference (smaller KL)")


def _hyper_rows(hypers: tuple[Hyperparameter, ...]) -> list[str]:
    rows = ["| hyperparameter | type / valid values | default |", "|---|---|---|"]
    rows += [f"| `{h.name}` | {h.describe()} | `{h.default!r}` |" for h in hypers]
    return rows


def _section(spec: LossSpec) -> list[str]:
    doc = inspect.getdoc(spec.fn) or ""
    lines = [f"## `{spec.name}`", "", doc, ""]
    facts = [
        ("aliases", ", ".join(f"`{a}`" for a in spec.aliases) or "none"),
        ("paper", spec.paper),
        ("per-example loss", f"`{spec.formula}`"),
        ("needs a reference", _reference(spec)),
        ("data", _data(spec, long=True)),
        ("log-prob aggregation", spec.aggregation),
        ("reward", spec.reward),
        ("reward scale", _scale(spec)),
        ("generic options", ", ".join(f"`{h.name}`" for h in spec.options) or "none"),
        ("record fields read (default hyperparameters)", ", ".join(f"`{f}`" for f in _reads(spec))),
        ("running state", ", ".join(f"`{getattr(f, '__qualname__', f)}`" for f in spec.state) or "none"),
        ("strength (what a calibrating grid searches)", _strength(spec)),
    ]
    lines += [f"- **{k}**: {v}" for k, v in facts] + [""]
    lines += _hyper_rows(spec.hyperparameters) if spec.hyperparameters else ["No hyperparameters of its own."]
    return lines + [""]


def render() -> str:
    families = _families(_unique_specs())
    lines = [_HEADER, "## Summary, by family", ""]
    for title, specs in families.items():
        lines += [f"**{title}**", ""]
        lines += ["| name | aliases | reference | data | reads besides the policy's sums and lengths | aggregation "
                  "| reward scale |", "|---|---|---|---|---|---|---|"]
        lines += [f"| [`{s.name}`](#{s.name}) | {', '.join(s.aliases)} | {_reference(s)} | {_data(s)} | "
                  f"{_extra_reads(s)} | {s.aggregation} | {_scale(s)} |" for s in specs]
        lines.append("")
    options_doc = inspect.getdoc(pair_options) or ""
    lines += ["## Generic options of paired losses", "", options_doc, "", *_hyper_rows(PAIR_OPTIONS), ""]
    lines += ["See `prefopt/losses/options.py` for the definitions, versions and deviations.", ""]
    for title, specs in families.items():
        lines += [f"# {title}", ""]
        for spec in specs:
            lines += _section(spec)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
