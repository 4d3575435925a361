"""The benchmark's table arithmetic (benchmarks/bench_dpo.py): hand-made runs, no timing."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_dpo import paired_ratio, report  # noqa: E402


def _run(contender: str, repeat: int, seconds: float, size: str = "20m") -> dict:
    return {"size": size, "mode": "live", "contender": contender, "repeat": repeat, "pairs": 8, "elapsed_s": seconds,
            "completion_tokens": 80, "peak_rss_mb": 100.0, "policy_positions": 100, "reference_positions": 100,
            "useful_tokens": 90, "others_busy": 0.0}


def test_paired_ratio_compares_runs_of_the_same_repeat():
    # The machine is twice as slow in repeat 1: both contenders take twice as long, the paired ratio stays 2.
    runs = [_run("prefopt", 0, 1.0), _run("trl", 0, 2.0), _run("prefopt", 1, 2.0), _run("trl", 1, 4.0),
            _run("prefopt", 2, 1.0), _run("trl", 2, 4.0)]
    mine = [r for r in runs if r["contender"] == "prefopt"]
    assert paired_ratio(runs, mine, "trl") == 2.0  # ratios 2, 2, 4
    assert paired_ratio(runs, mine, "plain") is None  # no plain runs: no ratio


def test_report_counts_repeats_per_size():
    runs = [_run(c, k, 1.0) for k in range(5) for c in ("prefopt", "trl")]
    runs += [_run(c, k, 1.0, size="1m") for k in range(3) for c in ("prefopt", "trl")]
    record = {"date": "d", "machine": "m", "setting": "s", "params": {"1m": 10**6, "20m": 2 * 10**7},
              "peaks": [100.0], "runs": runs}
    text = report(record)
    assert "median of 3 (1m), 5 (20m)" in text
    assert "| 20m (20.00M) | live | prefopt | 8.00 | 1.00x | 1.00x |" in text
