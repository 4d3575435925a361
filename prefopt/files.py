"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Used by every writer of results (a run's `metrics.json`, the grid's tables and run records, plots), so a process
killed with kill -9 at any moment leaves each file complete or as it was. Kept free of heavy imports: a training
run loads this, not pandas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Any) -> None:
    """Call `write(tmp_path)`, then rename the temporary file onto `path`: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(payload: Mapping[str, Any], path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True)))


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files a killed process left behind (`.<name>.<pid>.tmp`)."""
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
        tmp.unlink(missing_ok=True)
