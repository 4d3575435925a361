"""Render the loss catalog (docs/losses.md) from the registry, so the page cannot drift from the code.

    python -m prefopt.losses.docs > docs/losses.md

tests/test_losses.py fails when the committed page differs from `render()`.
"""

from __future__ import annotations

import inspect

from prefopt.losses import LOSSES
from prefopt.losses.options import PAIR_OPTIONS, pair_options
from prefopt.losses.registry import LossSpec
from prefopt.losses.schema import Hyperparameter

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
    """Each spec once (aliases share one), grouped: with a reference, reference-free, unpaired, hooked (composite)."""
    seen: dict[str, LossSpec] = {}
    for spec in LOSSES.values():
        seen.setdefault(spec.name, spec)
    return sorted(seen.values(), key=lambda s: (hasattr(s.fn, "paired"), not s.paired, not s.needs_reference))


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
        ("reads besides the log-prob sums and lengths", ", ".join(f"`{f}`" for f in sorted(spec.reads)) or "nothing"),
        ("running state", ", ".join(f"`{getattr(f, '__qualname__', f)}`" for f in spec.state) or "none"),
    ]
    lines += [f"- **{k}**: {v}" for k, v in facts] + [""]
    lines += _hyper_rows(spec.hyperparameters) if spec.hyperparameters else ["No hyperparameters of its own."]
    return lines + [""]


def render() -> str:
    specs = _unique_specs()
    lines = [_HEADER, "## Summary", ""]
    lines += ["| name | aliases | reference | data | aggregation | reward scale |", "|---|---|---|---|---|---|"]
    for s in specs:
        lines.append(
            f"| [`{s.name}`](#{s.name}) | {', '.join(s.aliases)} | {_reference(s)} | {_data(s)} | {s.aggregation} "
            f"| {_scale(s)} |"
        )
    options_doc = inspect.getdoc(pair_options) or ""
    lines += ["", "## Generic options of paired losses", "", options_doc, "", *_hyper_rows(PAIR_OPTIONS), ""]
    lines += ["See `prefopt/losses/options.py` for the definitions, versions and deviations.", ""]
    for spec in specs:
        lines += _section(spec)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
