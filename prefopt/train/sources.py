"""Where preference rows come from: one split of a local file, a local directory, or a hub dataset.

`load_rows(source, subset, split)` returns a `datasets.Dataset` (arrow-backed, so `map` can cache on it):
- a file: .jsonl / .json / .parquet / .csv (one split: it is the training data; hold out `val_fraction`, or name a
  second file as the validation split);
- a `save_to_disk` directory (a Dataset, or a DatasetDict from which `split` is taken);
- any other directory: a dataset repository laid out as on the hub (`data/train-00000-of-00001.parquet`, ...,
  or a loading script-free folder of data files), read by `datasets.load_dataset(directory, subset, split=split)`,
  the same call as for a hub name;
- otherwise a hub name (`trl-lib/ultrafeedback_binarized`), passed to `datasets.load_dataset` unchanged; offline
  it is read from the local `datasets` cache when it was downloaded before.

Which columns mean what, and the checks each row passes, are in `prefopt.train.formats`. A source that cannot be read is
a `DataError` naming it (and, for a JSON Lines line that does not parse, its line, counting from 1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets

from prefopt.train.formats import DataError, DataFileNotFoundError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # written by save_to_disk (DatasetDict, Dataset)


def _looks_local(source: str) -> bool:
    """A string meant as a local path rather than a hub name ("org/name" or "name")."""
    return source.startswith(("/", "./", "../", "~")) or Path(source).suffix in _BUILDERS or source.count("/") > 1


def _load_file(path: Path, split: str) -> datasets.Dataset:
    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(_BUILDERS)}")
    if split != "train":
        if _looks_local(split):  # meant as the path of a validation file
            raise DataFileNotFoundError(f"val_split: no such file: {split}")
        raise DataError(f"{path} is a single file, so it has no split {split!r}: leave val_split unset to hold out "
                        "val_fraction of it, or set val_split to the path of a second file")
    # datasets logs a JSON parse error with its row counted from 0 before raising; the DataError below names the line.
    json_log = logging.getLogger("datasets.packaged_modules.json.json")
    level = json_log.level
    json_log.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parse errors in several exception types
        where = _json_problem(path) if builder == "json" else None
        if where:
            raise DataError(f"{path}: {where}") from err
        cause = err
        while cause.__cause__ is not None:  # the parser's own error, under datasets' DatasetGenerationError
            cause = cause.__cause__
        raise DataError(f"{path}: could not read it as {builder} (unreadable or truncated?): "
                        f"{type(cause).__name__}: {str(cause)[:300]}") from err
    finally:
        json_log.setLevel(level)


def _json_problem(path: Path) -> str | None:
    """Where a .json or .jsonl file stops parsing ("line 3: not valid JSON ..."), or None if it parses."""
    try:
        if path.suffix == ".json":  # one JSON document, or JSON Lines under a .json name
            try:
                json.loads(path.read_text(encoding="utf-8", errors="replace"))
                return None
            except json.JSONDecodeError as err:
                if err.msg != "Extra data":  # a JSON Lines file fails with "Extra data" at its second line
                    return f"line {err.lineno}: not valid JSON ({err.msg}: column {err.colno}); truncated or corrupt?"
        with path.open("rb") as lines:
            for n, raw in enumerate(lines, 1):  # from 1, as editors count lines
                problem = _json_line_problem(raw) if raw.strip() else None
                if problem:
                    return f"line {n}: {problem}"
    except OSError:
        return None
    return None


def _json_line_problem(raw: bytes) -> str | None:
    """Why one line of a JSON Lines file is not a JSON object, or None."""
    try:
        line = raw.rstrip(b"\r\n").decode("utf-8")
        value = json.loads(line)
    except UnicodeDecodeError:
        return "not valid UTF-8 text; truncated or corrupt?"
    except json.JSONDecodeError as err:
        at = " at the end of the line" if err.pos >= len(line) else f": column {err.colno}"
        return f"not valid JSON ({err.msg}{at}); truncated or corrupt?"
    return None if isinstance(value, dict) else f"expected a JSON object ({{...}}) per line, got {type(value).__name__}"


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: could not read this save_to_disk directory: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def load_rows(source: str, subset: str | None = None, split: str = "train") -> datasets.Dataset:
    """Load one split of a preference dataset as a `datasets.Dataset`."""
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path, split)
    if path.is_dir():
        if any((path / m).is_file() for m in _SAVED_MARKERS):
            return _load_saved(path, split)
        where = f"local dataset directory {path}"
    elif _looks_local(source):
        raise DataFileNotFoundError(f"no such data file or directory: {source}")
    else:
        where = f"hub dataset {source!r}"
    try:
        return datasets.load_dataset(str(path) if path.is_dir() else source, subset, split=split)
    except Exception as err:
        raise DataError(f"could not load {where} (config {subset!r}, split {split!r}): {err}") from err
