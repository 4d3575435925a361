"""Where preference rows come from, and the checks they pass before any tokenization or training.

`load_rows` takes a local file (.jsonl, .json, .parquet, .csv), a `datasets.save_to_disk` directory, or a hub
dataset name (with an optional config and a split) and returns a `datasets.Dataset`. The same code path serves
offline and hub use: a hub name is passed to `datasets.load_dataset` unchanged.

`check_rows` fails with an error that names the source, the row and the field.
"""

from __future__ import annotations

from pathlib import Path

import datasets

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str, subset: str | None = None, split: str = "train") -> datasets.Dataset:
    """Load one split of a preference dataset as a `datasets.Dataset`."""
    path = Path(source)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"{source}: no split {split!r}; splits: {', '.join(loaded)}")
            return loaded[split]
        return loaded
    if path.is_file() or path.suffix in _BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"no such data file: {source}")
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"{source}: unknown file type {path.suffix!r}; use one of {', '.join(_BUILDERS)}")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # datasets wraps parse errors in several exception types
            raise ValueError(f"{source}: could not read it as {builder}: {err}") from err
    return datasets.load_dataset(source, subset, split=split)


def check_rows(rows: datasets.Dataset, fields: dict[str, str], source: str) -> None:
    """Every field is a column holding non-empty strings; raise ValueError naming source, row and field."""
    for field, column in fields.items():
        if column not in rows.column_names:
            raise ValueError(
                f"{source}: missing column {column!r} (field {field!r}); columns: {', '.join(rows.column_names)}"
            )
    for field, column in fields.items():
        for i, value in enumerate(rows[column]):
            if not isinstance(value, str):
                raise ValueError(f"{source}: row {i}, field {column!r}: expected a string, got {type(value).__name__}")
            if field != "prompt" and not value.strip():
                raise ValueError(f"{source}: row {i}, field {column!r}: empty completion")
