"""Test-session settings: everything offline, prefopt's cache in a fresh folder for the session, and the working
folder a fresh temporary one, so that runs written to the base config's relative `runs/` never land in the checkout.

Set PREFOPT_TEST_CACHE to a folder to reuse a cache (the built-in task's reference, pairs and reference log-probs)
across test sessions; entries are keyed by hashes of their recipes and inputs, so reuse is safe.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# pytest-xdist (`-n 2` in pyproject.toml): the controller imports this file first and its workers inherit its
# environment, so they share the controller's cache (builds are locked: the reference is built once) and each runs
# torch, and the runs it starts, on one thread (two workers on two cores, not four threads fighting for them).
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if os.environ.get("PREFOPT_TEST_CACHE"):
    os.environ["PREFOPT_CACHE"] = os.environ["PREFOPT_TEST_CACHE"]
elif not (_XDIST_WORKER and os.environ.get("PREFOPT_CACHE")):
    os.environ["PREFOPT_CACHE"] = tempfile.mkdtemp(prefix="prefopt-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PREFOPT_CACHE"], ignore_errors=True)
if _XDIST_WORKER and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
_WORKDIR = tempfile.mkdtemp(prefix="prefopt-test-cwd-")
atexit.register(shutil.rmtree, _WORKDIR, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _fresh_working_folder():
    """The tests run in a fresh folder (a fixture, not at import: xdist's workers start in the controller's folder
    and look for the tests there)."""
    os.chdir(_WORKDIR)


# ---------------------------------------------------------------------------------------------- gold task


@pytest.fixture(scope="session")
def gold_reference_dir(tmp_path_factory: pytest.TempPathFactory):
    """The built-in task's reference (built once per session, ~45 s), in $PREFOPT_CACHE.

    PREFOPT_CACHE is set above for the whole session; if it is not (a conftest without that line), use a
    folder under pytest's base temp and export it, so every later `ensure_reference()` reuses this build.
    """
    from prefopt.gold.build import ensure_reference

    cache = os.environ.get("PREFOPT_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    os.environ["PREFOPT_CACHE"] = cache
    return ensure_reference(cache)
