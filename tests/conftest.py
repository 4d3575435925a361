"""Test-session settings: everything offline, and prefopt's cache in a fresh folder for the session.

Set PREFOPT_TEST_CACHE to a folder to reuse a cache (the built-in task's reference, pairs and reference log-probs)
across test sessions; entries are keyed by hashes of their recipes and inputs, so reuse is safe.
"""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["PREFOPT_CACHE"] = os.environ.get("PREFOPT_TEST_CACHE") or tempfile.mkdtemp(prefix="prefopt-test-cache-")
