"""DPO training throughput: prefopt vs a minimal PyTorch loop vs TRL's DPOTrainer, on identical work.

    python benchmarks/bench_dpo.py                      # the full table (about 40 minutes on 2 cores)
    python benchmarks/bench_dpo.py --sizes 1m --repeats 1 --contenders prefopt plain   # a quick look

Same model directory, same pairs (benchmarks/common.py), batch 8 pairs, max length 128, DPO (beta 0.1), fused AdamW,
fp32, 2 threads, for each contender with a live reference and with reference log-probs precomputed before training.
Each (repeat, size, mode, contender) runs in its own process (so peak RSS is per configuration), contenders
interleaved (A B C A B C ...), each run after its warm-up steps. Before each run the script waits until the rest of
the machine is quiet (another process's CPU use would distort a 2-thread run) and records how busy the other
processes were during the run.

Columns: pairs/s; completion tokens/s (chosen + rejected tokens, eos included); peak RSS of the run's process; FLOP
utilization against the matmul peak measured here (6 x params x tokens for the policy, 2 x params x tokens for a live
reference), on all token positions the models processed (padding included) and on useful tokens only (no padding,
each prompt once: |x| + |y_w| + |y_l| per pair). TRL is skipped with a message when it is not installed
(`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import MODEL_SIZES, build_inputs, matmul_peak_gflops, make_model  # noqa: E402


# prefopt as configs/base.yaml ships it: without the speed settings that prefopt_overrides.yaml turns on.
BASE_VARIANT = "base=--data.group_by_length=0 --model.compile=false"


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def busy_fraction(seconds: float = 2.0) -> float:
    b0, t0 = cpu_times()
    time.sleep(seconds)
    b1, t1 = cpu_times()
    return (b1 - b0) / max(t1 - t0, 1e-9)


def wait_until_quiet(threshold: float, max_wait: float) -> float:
    """Wait (up to max_wait seconds) until the machine's CPU is busy less than `threshold`; return the last reading."""
    deadline = time.time() + max_wait
    while True:
        busy = busy_fraction()
        if busy < threshold or time.time() > deadline:
            return busy
        time.sleep(10)


def run_one(contender: str, inputs: dict, mode: str, warmup: int, steps: int, batch: int, threads: int,
            extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=f"{HERE.parent}:{HERE}")  # fmt: skip
    cmd = [sys.executable, str(HERE / "contenders.py"), contender.split("[")[0], json.dumps(inputs), mode, str(warmup),
           str(steps), str(batch), str(threads), json.dumps(extra)]  # fmt: skip
    ticks = os.sysconf("SC_CLK_TCK")
    children0 = os.times()
    b0, t0 = cpu_times()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    b1, t1 = cpu_times()
    children1 = os.times()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{contender} {mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    own = (children1.children_user + children1.children_system - children0.children_user - children0.children_system)
    # Other processes' share of the machine while this run lasted (whole run, not only its timed window).
    result["others_busy"] = max(0.0, ((b1 - b0) / ticks - own) / max((t1 - t0) / ticks, 1e-9))
    return result


def have_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def summarize(runs: list[dict], params: dict[str, int], peak: float) -> list[dict]:
    rows = []
    keys = sorted({(r["size"], r["mode"], r["contender"]) for r in runs}, key=lambda k: (k[0], k[1] != "live", k[2]))
    for size, mode, contender in keys:
        rs = [r for r in runs if (r["size"], r["mode"], r["contender"]) == (size, mode, contender)]
        n, live = params[size], mode == "live"

        def med(f):
            return statistics.median(f(r) for r in rs)

        rows.append({
            "size": size, "mode": mode, "contender": contender, "repeats": len(rs),
            "pairs_per_s": med(lambda r: r["pairs"] / r["elapsed_s"]),
            "completion_tokens_per_s": med(lambda r: r["completion_tokens"] / r["elapsed_s"]),
            "peak_rss_mb": med(lambda r: r["peak_rss_mb"]),
            "util_all": med(lambda r: (6 * n * r["policy_positions"] + 2 * n * r["reference_positions"])
                            / r["elapsed_s"] / (peak * 1e9)),
            "util_useful": med(lambda r: (6 + 2 * live) * n * r["useful_tokens"] / r["elapsed_s"] / (peak * 1e9)),
            "others_busy_max": max(r["others_busy"] for r in rs),
            "spread": (max(r["pairs"] / r["elapsed_s"] for r in rs) - min(r["pairs"] / r["elapsed_s"] for r in rs))
                      / med(lambda r: r["pairs"] / r["elapsed_s"]),
        })  # fmt: skip
    return rows


def table(rows: list[dict], params: dict[str, int]) -> str:
    out = ["| size | reference | contender | pairs/s | vs TRL | vs plain | completion tok/s | peak RSS MB "
           "| FLOP util (all tokens) | FLOP util (useful) | spread | others' CPU (max) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by = {(r["size"], r["mode"], r["contender"]): r for r in rows}
    for r in rows:
        trl, plain = by.get((r["size"], r["mode"], "trl")), by.get((r["size"], r["mode"], "plain"))
        vs = lambda o: f"{r['pairs_per_s'] / o['pairs_per_s']:.2f}x" if o else "-"  # noqa: E731
        size = f"{r['size']} ({params[r['size']] / 1e6:.2f}M)"
        mode = "live" if r["mode"] == "live" else "precomputed"
        out.append(f"| {size} | {mode} | {r['contender']} | {r['pairs_per_s']:.2f} | {vs(trl)} | {vs(plain)} "
                   f"| {r['completion_tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['util_all']:.2f} "
                   f"| {r['util_useful']:.2f} | {r['spread']:.0%} | {r['others_busy_max']:.0%} |")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1m", "20m"], choices=sorted(MODEL_SIZES))
    ap.add_argument("--modes", nargs="+", default=["live", "cached"], choices=["live", "cached"])
    ap.add_argument("--contenders", nargs="+", default=["prefopt", "plain", "trl"], choices=["prefopt", "plain", "trl"])
    ap.add_argument("--prefopt-variant", action="append", default=None, metavar="NAME=ARGS",
                    help="an extra prefopt contender 'prefopt[NAME]' with these CLI overrides (space-separated), "
                         f"e.g. 'eager=--model.compile=false'; repeatable; default: '{BASE_VARIANT}' (configs/base.yaml's "
                         "speed settings); 'none' for no variant")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the clock starts")
    ap.add_argument("--steps", nargs="+", default=["1m=100", "20m=16"], help="timed steps per size, SIZE=N")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-below", type=float, default=0.10, help="wait until the machine is less busy than this")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for quiet before each run")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "prefopt-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = ap.parse_args(argv)
    steps = {k: int(v) for k, v in (s.split("=") for s in args.steps)}
    contenders = list(args.contenders)
    variants = {"prefopt": []}
    for v in [BASE_VARIANT] if args.prefopt_variant is None else [v for v in args.prefopt_variant if v != "none"]:
        name, _, extra = v.partition("=")
        variants[f"prefopt[{name}]"] = extra.split()
    at = contenders.index("prefopt") + 1 if "prefopt" in contenders else 0
    contenders[at:at] = [k for k in variants if k != "prefopt"]
    if "trl" in contenders and not have_trl():
        print("TRL is not installed: skipping it (pip install -e '.[bench]' adds trl and accelerate)", flush=True)
        contenders.remove("trl")

    params = {s: sum(p.numel() for p in make_model(s).parameters()) for s in args.sizes}
    inputs = {s: build_inputs(Path(args.workdir), s, (args.warmup + steps[s]) * args.batch) for s in args.sizes}
    wait_until_quiet(args.quiet_below, args.max_wait)
    peaks = [matmul_peak_gflops(args.threads)]
    runs = []
    for rep in range(args.repeats):
        for size in args.sizes:
            for mode in args.modes:
                for contender in contenders:
                    before = wait_until_quiet(args.quiet_below, args.max_wait)
                    r = run_one(contender, inputs[size], mode, args.warmup, steps[size], args.batch, args.threads,
                                variants.get(contender, []))
                    r.update(contender=contender, size=size, repeat=rep, busy_before=before, loadavg=os.getloadavg()[0])
                    runs.append(r)
                    print(f"[{rep}] {size} {mode:6s} {contender:8s} {r['pairs'] / r['elapsed_s']:7.2f} pairs/s  "
                          f"rss {r['peak_rss_mb']:.0f} MB  others {r['others_busy']:.0%}  unmatched "
                          f"{r['unmatched_rows']}  identified {r['pairs_identified']}/{r['pairs']}", flush=True)
    wait_until_quiet(args.quiet_below, args.max_wait)
    peaks.append(matmul_peak_gflops(args.threads))
    peak = max(peaks)
    rows = summarize(runs, params, peak)
    md = table(rows, params)
    header = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch threads {args.threads}; matmul peak {peak:.0f} GFLOP/s "
              f"(best of the runs before and after: {', '.join(f'{p:.0f}' for p in peaks)}); "
              f"median of {args.repeats}; batch {args.batch}, max length 128, fp32")  # fmt: skip
    print("\n" + header + "\n\n" + md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"header": header, "peak_gflops": peak, "peaks": peaks, "params": params,
                                          "rows": rows, "runs": runs, "argv": sys.argv[1:]}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
