"""Preference-data formats: which columns mean what, and how a row becomes prompt and completion text.

Three structures, each in two kinds of values (plain strings, or lists of `{role, content}` messages):

| structure         | columns                   | prompt                                   |
|-------------------|---------------------------|------------------------------------------|
| `standard`        | prompt, chosen, rejected  | the prompt column                        |
| `implicit_prompt` | chosen, rejected          | the longest common prefix of the two     |
| `unpaired`        | prompt, completion, label | the prompt column; label is a boolean    |

The kind (text or conversational) is read from the column types and needs no option; the structure is detected
from the columns (`detect_layout`) unless `format` forces it. Detection rules, after `columns` renames:
chosen + rejected present -> `standard` if a prompt column of the same kind is present, else `implicit_prompt`
(a string prompt beside message-list completions, as in HuggingFaceH4/ultrafeedback_binarized, is ignored: the
completions there hold the whole conversation); otherwise completion + label -> `unpaired`.

Implicit prompts (`split_text`, `split_messages`): text transcripts (Anthropic/hh-rlhf, "\\n\\nHuman: ...
\\n\\nAssistant: ...") are cut just after the last `assistant_marker` ("Assistant:") inside their shared prefix, so
the completion keeps its leading space; message lists are cut at a message boundary, the longest shared run of
messages after which both continue with an assistant message.

Conversational rows are rendered with the tokenizer's chat template (`render_chat`): the prompt with
`add_generation_prompt=True`, the completion as the remainder of the full conversation's rendering. A template
whose prompt rendering is not a prefix of the full rendering (one that rewrites earlier turns, say) is an error:
the boundary between prompt and completion tokens would otherwise be wrong.

Further responses (`extra`, read only when the loss reads them: TPO's gold response, InfoNCA's K - 2 further scored
responses): a list of completions per row (or one completion), of the same kind as chosen and rejected, with an
`extra_scores` list when scores are read too; they need an explicit prompt column (`standard`). Tokenization:
`prefopt.train.encoding`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Structure = Literal["standard", "implicit_prompt", "unpaired"]
Format = Literal["auto", "standard", "implicit_prompt", "unpaired"]  # data.format: "auto" detects the structure
FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "chosen_score", "rejected_score", "extra",
          "extra_scores")
# Scalar scores of the two responses (a rating, a reward model's or the built-in task's gold reward): read only when
# the loss uses reward values (`data.scores`, set by the CLI from the loss), then required of every paired row.
SCORES = ("chosen_score", "rejected_score")
EXTRA, EXTRA_SCORES = "extra", "extra_scores"  # further responses per prompt (a list per row) and their scores
REQUIRED: dict[str, tuple[str, ...]] = {
    "standard": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}


class DataError(ValueError):
    """A problem with the user's data or data settings (a bad file, row, column or option), found before training.

    The CLI prints its message alone, without a traceback (PREFOPT_TRACEBACK=1 shows it); any other exception is
    a bug and keeps its traceback.
    """


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file, directory or chat-template file that does not exist."""


class RowError(DataError):
    """A bad row; the message names the source, the row (counting from 1) and the field."""


@dataclass(frozen=True)
class Layout:
    """What a dataset's columns mean: its structure, its kind, and the column behind each field."""

    structure: Structure
    conversational: bool  # message lists rather than strings
    columns: dict[str, str]  # field -> column, for the fields this structure reads

    @property
    def paired(self) -> bool:
        return self.structure != "unpaired"

    def describe(self) -> str:
        kind = "conversational" if self.conversational else "text"
        return f"{self.structure} ({kind}; " + ", ".join(f"{f}={c!r}" for f, c in self.columns.items()) + ")"


def _kind(feature: Any, values: list | None = None) -> str:
    """'text', 'messages' or 'other' for a `datasets` feature.

    A JSON column whose rows mix types (a number among strings, say) has the `Json` feature: its kind is the most
    common one among `values` (a sample of its rows), so that the row checks then name each row that differs.
    """
    if type(feature).__name__ == "Json":
        kinds = ["text" if isinstance(v, str) else "messages" for v in values or [] if isinstance(v, (str, list))]
        return max(("text", "messages"), key=kinds.count) if kinds else "other"
    if type(feature).__name__ in ("List", "Sequence", "LargeList") or isinstance(feature, list):
        return "messages"
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return "text"
    return "other"


def detect_layout(features: dict[str, Any], columns: dict[str, str], source: str, fmt: str = "auto",
                  rows: Any = None, scores: bool = False, extras: bool = False) -> Layout:
    """The layout of a dataset with these `features`; `columns` maps field names to column names. `rows` (the
    dataset) is read only for a column whose rows mix types, to tell its kind from its first 1,000 values.
    `scores`: the score columns (`SCORES`) are required too, and read; `extras`: the further responses (`EXTRA`, and
    `EXTRA_SCORES` with `scores`)."""
    col = {f: columns.get(f, f) for f in FIELDS}
    have = {f for f in FIELDS if col[f] in features}
    mixed = {f for f in have if type(features[col[f]]).__name__ == "Json"}
    sample = rows[:1000] if mixed and rows is not None else {}
    kind = {f: _kind(features[col[f]], sample.get(col[f])) for f in have}
    if fmt == "auto":
        if {"chosen", "rejected"} & have:  # paired (a missing one of the two is reported below)
            explicit = "prompt" in have and kind["prompt"] == kind.get("chosen", kind["prompt"])
            if "prompt" in have and not explicit:
                log.info("%s: ignoring the %s prompt column %r: chosen/rejected hold whole conversations",
                         source, kind["prompt"], col["prompt"])
            fmt = "standard" if explicit else "implicit_prompt"
        elif {"completion", "label"} & have:
            fmt = "unpaired"
        else:
            raise DataError(
                f"{source}: cannot tell the format from its columns ({', '.join(features)}); expected prompt/chosen/"
                "rejected (standard), chosen/rejected (implicit prompt) or prompt/completion/label (unpaired); "
                "rename columns with data.columns, e.g. {prompt: question, chosen: good, rejected: bad}"
            )
    for field in REQUIRED[fmt]:
        if field not in have:
            raise DataError(
                f"{source}: missing column {col[field]!r} (field {field!r}, needed by format {fmt!r}); "
                f"columns: {', '.join(features)}"
            )
    main = "completion" if fmt == "unpaired" else "chosen"
    if kind[main] == "other":
        feature = features[col[main]]
        held = "values of mixed types" if main in mixed else getattr(feature, "dtype", feature)
        raise DataError(f"{source}: column {col[main]!r} holds {held} from {_row(0)} on (field {main!r}); expected "
                        "strings or lists of {role, content} messages")
    if scores:
        if fmt == "unpaired":
            raise DataError(f"{source}: this loss reads the responses' scores, which only paired data carries")
        missing = [f for f in SCORES if f not in have]
        if missing:
            raise DataError(f"{source}: this loss reads the responses' scores, but there is no column "
                            f"{col[missing[0]]!r} (field {missing[0]!r}); map score columns with data.columns, e.g. "
                            f"{{chosen_score: score_chosen, rejected_score: score_rejected}}; columns: {', '.join(features)}")
    wanted = REQUIRED[fmt] + (SCORES if scores else ()) + _extra_fields(fmt, have, col, features, source, scores, extras)
    layout = Layout(fmt, kind[main] == "messages", {f: col[f] for f in wanted})  # type: ignore[arg-type]
    log.info("%s: format %s", source, layout.describe())
    return layout


def _extra_fields(fmt: str, have: set[str], col: dict[str, str], features: Any, source: str, scores: bool,
                  extras: bool) -> tuple[str, ...]:
    """The further responses' fields a layout reads (none unless `extras`), checked to be there."""
    if not extras:
        return ()
    if fmt != "standard":
        raise DataError(f"{source}: this loss reads further responses per prompt (field {EXTRA!r}), which need an "
                        f"explicit prompt column (format 'standard'); this data's format is {fmt!r}")
    wanted = (EXTRA, EXTRA_SCORES) if scores else (EXTRA,)
    for field in wanted:
        if field not in have:
            raise DataError(f"{source}: this loss reads further responses per prompt, but there is no column "
                            f"{col[field]!r} (field {field!r}: a list per row); map it with data.columns, e.g. "
                            f"{{{field}: {'completions' if field == EXTRA else 'scores'}}}; columns: {', '.join(features)}")
    return wanted


# ---------------------------------------------------------------------------------------------- row checks
def _row(row: int) -> str:
    """A row index (from 0, as `datasets` counts) as messages print it: from 1, as editors count lines."""
    return f"row {row + 1} (counting from 1)"


def _where(source: str, row: int, column: str) -> str:
    return f"{source}: {_row(row)}, field {column!r}"


def check_text(value: Any, source: str, row: int, column: str, completion: bool) -> str:
    if not isinstance(value, str):
        got = "a missing value" if value is None else type(value).__name__
        raise RowError(f"{_where(source, row, column)}: expected a string, got {got}")
    if completion and not value.strip():
        raise RowError(f"{_where(source, row, column)}: empty completion")
    return value


def check_messages(value: Any, source: str, row: int, column: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else "a missing value" if value is None else type(value).__name__
        raise RowError(f"{_where(source, row, column)}: expected a non-empty list of {{role, content}} messages, "
                       f"got {got}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RowError(f"{_where(source, row, column)}: message {i} is not a {{role: str, content: str}} dict: "
                           f"{m!r:.80}")
    # Arrow fills keys that other rows have with None; a chat template would render them as the string "None".
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def check_completion_messages(messages: list[dict[str, Any]], source: str, row: int, column: str) -> None:
    if messages[0]["role"] != "assistant":
        raise RowError(f"{_where(source, row, column)}: the completion must start with an assistant message, "
                       f"got role {messages[0]['role']!r}")
    if not any(m["content"].strip() for m in messages):
        raise RowError(f"{_where(source, row, column)}: empty completion")


def check_score(value: Any, source: str, row: int, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError(f"{_where(source, row, column)}: a score must be a finite number, got {value!r:.40}")
    return float(value)


def check_label(value: Any, source: str, row: int, column: str) -> bool:
    if not isinstance(value, bool):
        raise RowError(f"{_where(source, row, column)}: label must be a boolean (true/false), got "
                       f"{type(value).__name__} {value!r:.40}")
    return value


# ---------------------------------------------------------------------------------------------- implicit prompts
def split_text(chosen: str, rejected: str, marker: str, source: str, row: int,
               columns: tuple[str, str] = ("chosen", "rejected")) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion): cut just after the last `marker` in the shared prefix."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(marker, 0, n)  # the whole marker lies inside the shared prefix
    if cut < 0:
        raise RowError(f"{source}: {_row(row)}, fields {columns[0]!r} and {columns[1]!r}: no {marker!r} in the text they "
                       "share, so the prompt cannot be found; give a prompt column, or set data.assistant_marker")
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def split_messages(chosen: list[dict], rejected: list[dict], source: str, row: int,
                   columns: tuple[str, str] = ("chosen", "rejected")) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) messages: the longest shared run after which both continue with the assistant."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not (n < len(chosen) and n < len(rejected)
                         and chosen[n]["role"] == rejected[n]["role"] == "assistant"):
        n -= 1
    if n == 0:
        raise RowError(f"{source}: {_row(row)}, fields {columns[0]!r} and {columns[1]!r}: they share no prompt messages "
                       "followed by an assistant turn in both, so the prompt cannot be found")
    return chosen[:n], chosen[n:], rejected[n:]


# ---------------------------------------------------------------------------------------------- chat templates
def render_chat(tokenizer: Any, prompt: list[dict], completion: list[dict], source: str, row: int,
                column: str = "completion") -> tuple[str, str]:
    """(prompt text, completion text) from the tokenizer's chat template; the first is a prefix of the whole."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise RowError(
            f"{_where(source, row, column)}: the chat template's rendering of the prompt (add_generation_prompt=True) is not a "
            f"prefix of its rendering of the whole conversation, so prompt and completion tokens cannot be separated "
            f"exactly.\n  prompt ends: {prompt_text[-60:]!r}\n  whole has:   "
            f"{full_text[max(0, len(prompt_text) - 60):len(prompt_text)]!r}\nUse a template without that rewriting "
            "(data.chat_template)."
        )
    return prompt_text, full_text[len(prompt_text) :]


def read_chat_template(value: str) -> str:
    """A Jinja chat template given inline, or the path of a file holding one."""
    if "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataFileNotFoundError(f"chat_template: {value!r} is neither a Jinja template nor a file")
    return path.read_text()


def row_texts(values: dict[str, Any], layout: Layout, tokenizer: Any, marker: str, source: str, row: int) -> dict:
    """Check one row and turn it into texts: {prompt, chosen, rejected} or {prompt, completion, label}.

    Paired rows whose chosen and rejected are identical come back with `identical=True` (the DataModule skips and
    counts them; they carry no preference).
    """
    col = layout.columns
    out: dict[str, Any] = {}
    if layout.structure == "unpaired":
        out["label"] = check_label(values["label"], source, row, col["label"])
    names = ("completion",) if layout.structure == "unpaired" else ("chosen", "rejected")
    if not layout.conversational:
        comps = {n: check_text(values[n], source, row, col[n], completion=True) for n in names}
        if layout.structure == "implicit_prompt":
            if comps["chosen"] == comps["rejected"]:
                return {"identical": True}
            prompt, comps["chosen"], comps["rejected"] = split_text(*comps.values(), marker, source, row,
                                                                      (col["chosen"], col["rejected"]))
            for n in names:
                check_text(comps[n], source, row, col[n], completion=True)
        else:
            prompt = check_text(values["prompt"], source, row, col["prompt"], completion=False)
        return {**out, **_scores(values, layout, source, row), **_extras(values, layout, tokenizer, prompt, source, row),
                "prompt": prompt, **comps, "identical": False}
    comps = {n: check_messages(values[n], source, row, col[n]) for n in names}
    if layout.structure == "implicit_prompt":
        if comps["chosen"] == comps["rejected"]:
            return {"identical": True}
        prompt, comps["chosen"], comps["rejected"] = split_messages(comps["chosen"], comps["rejected"], source, row,
                                                                    (col["chosen"], col["rejected"]))
    else:
        prompt = check_messages(values["prompt"], source, row, col["prompt"])
        for n in names:  # completions that repeat the prompt messages: keep only what follows them
            if comps[n][: len(prompt)] == prompt and len(comps[n]) > len(prompt):
                comps[n] = comps[n][len(prompt) :]
    for n in names:
        check_completion_messages(comps[n], source, row, col[n])
    if layout.paired and comps["chosen"] == comps["rejected"]:
        return {"identical": True}
    texts = {n: render_chat(tokenizer, prompt, comps[n], source, row, col[n]) for n in names}
    prompt_text = texts[names[0]][0]
    return {**out, **_scores(values, layout, source, row), **_extras(values, layout, tokenizer, prompt, source, row),
            "prompt": prompt_text, **{n: t[1] for n, t in texts.items()}, "identical": False}


def _scores(values: dict[str, Any], layout: Layout, source: str, row: int) -> dict[str, float]:
    """The row's checked scores, for a layout that reads them."""
    return {f: check_score(values[f], source, row, layout.columns[f]) for f in SCORES if f in layout.columns}


def _extras(values: dict[str, Any], layout: Layout, tokenizer: Any, prompt: Any, source: str, row: int) -> dict:
    """The row's further responses as completion texts (`extra`), and their scores, checked; {} unless read."""
    if EXTRA not in layout.columns:
        return {}
    column, value = layout.columns[EXTRA], values[EXTRA]
    one = isinstance(value, str) or (layout.conversational and isinstance(value, list) and value
                                     and isinstance(value[0], dict))
    items = [value] if one else value
    if not isinstance(items, list) or not items:
        got = "an empty list" if items == [] else "a missing value" if items is None else type(items).__name__
        raise RowError(f"{_where(source, row, column)}: expected a non-empty list of completions, got {got}")
    if layout.conversational:
        texts = []
        for item in items:
            messages = check_messages(item, source, row, column)
            if messages[: len(prompt)] == prompt and len(messages) > len(prompt):
                messages = messages[len(prompt) :]
            check_completion_messages(messages, source, row, column)
            texts.append(render_chat(tokenizer, prompt, messages, source, row, column)[1])
    else:
        texts = [check_text(item, source, row, column, completion=True) for item in items]
    if EXTRA_SCORES not in layout.columns:
        return {EXTRA: texts}
    column, scores = layout.columns[EXTRA_SCORES], values[EXTRA_SCORES]
    scores = [scores] if isinstance(scores, (int, float)) and not isinstance(scores, bool) else scores
    if not isinstance(scores, list) or len(scores) != len(texts):
        raise RowError(f"{_where(source, row, column)}: expected {len(texts)} scores, one per further response, got "
                       f"{scores!r:.60}")
    return {EXTRA: texts, EXTRA_SCORES: [check_score(s, source, row, column) for s in scores]}
