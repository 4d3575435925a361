"""DPO training throughput: prefopt vs a minimal PyTorch loop vs TRL's DPOTrainer, on identical work.

    python benchmarks/bench_dpo.py                      # the full CPU table (about 30 minutes on 2 cores)
    python benchmarks/bench_dpo.py --sizes 1m --repeats 1 --contenders prefopt plain   # a quick look
    python benchmarks/bench_dpo.py --profile gpu         # one GPU: a Qwen2.5-0.5B-shaped model, bf16 (see PROFILES)
    python benchmarks/bench_dpo.py merge a.json b.json   # one table from separate invocations (each a repeat)

Same model directory, same pairs (benchmarks/common.py), batch 8 pairs, max length 128, DPO (beta 0.1), fused AdamW,
fp32, 2 threads, for each contender with a live reference and with reference log-probs precomputed before training.
Each (repeat, size, mode, contender) runs in its own process (so peak RSS is per configuration), contenders
interleaved (A B C A B C ...), each run after its warm-up steps. Before each run the script waits until the rest of
the machine is quiet (another process's CPU use would distort a 2-thread run) and records how busy the other
processes were during the run.

Columns: pairs/s; completion tokens/s (chosen + rejected tokens, eos included); peak RSS of the run's process; FLOP
utilization against the matmul peak measured here (6 x params x tokens for the policy, 2 x params x tokens for a live
reference), on all token positions the models processed (padding included) and on useful tokens only (no padding,
each prompt once: |x| + |y_w| + |y_l| per pair); on a GPU also the peak memory the allocator handed out, and the
utilization is against a measured bf16 matmul peak. TRL is skipped with a message when it is not installed
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
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import MODEL_SIZES, WORKDIR, build_inputs, gpu_bf16_peak_gflops, make_model, matmul_peak_gflops  # noqa: E402

# What each profile runs unless told otherwise. cpu: the setting (2 threads, fp32, batch 8, max length 128).
# gpu: a Qwen2.5-0.5B-shaped model in bf16 mixed precision, batch 16, max length 1024, on one GPU.
PROFILES = {
    "cpu": {"sizes": ["1m", "20m"], "steps": ["1m=100", "20m=16"], "batch": 8, "max_length": 128, "warmup": 3},
    "gpu": {"sizes": ["qwen0.5b"], "steps": ["qwen0.5b=16"], "batch": 16, "max_length": 1024, "warmup": 4,
            # prefopt_overrides.yaml's compile is for the CPU: with it, a first GPU run of this model did not finish
            # within 500 s (compiling policy and reference, dynamic shapes), longer than all the others together.
            # The LM head in chunks of 4,096 rows: at batch 16 the one-piece (rows, 151,936) fp32 logits ran out of
            # the H100's 80 GB (so do the plain loop's, which has no such switch; TRL's fit in 60 GB).
            "prefopt_args": "--model.scoring.compile=false --model.scoring.logps_chunk_size=4096",
            # prompt sharing's mask as a BlockMask (skips fully masked tiles): 2.0x sdpa live (benchmarks/README.md)
            "prefopt_variant": ["flex=--model.scoring.attn_implementation=flex_attention"]},
}


# prefopt as configs/base.yaml ships it: without the speed settings that prefopt_overrides.yaml turns on.
BASE_VARIANT = "base=--data.group_by_length=0 --model.scoring.compile=false"


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
            extra: list[str], log: Path, timeout: float | None = None) -> dict | None:
    """One run in its own process; its output goes to `log`. None (and a message) if it fails or outlasts `timeout`."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(HERE / "contenders.py"), contender.split("[")[0], json.dumps(inputs), mode, str(warmup),
           str(steps), str(batch), str(threads), json.dumps(extra)]
    ticks = os.sysconf("SC_CLK_TCK")
    children0 = os.times()
    b0, t0 = cpu_times()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent, timeout=timeout)
            code = code.returncode
        except subprocess.TimeoutExpired:
            code = f"killed after {timeout:.0f} s"
    b1, t1 = cpu_times()
    children1 = os.times()
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("RESULT ")]
    if code != 0 or not lines:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        print(f"{contender} {mode} failed (exit {code}); its log {log} ends:\n{tail}", flush=True)
        return None
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
            "peak_gpu_mb": med(lambda r: r.get("peak_gpu_mb", 0.0)),
            "util_all": med(lambda r: (6 * n * r["policy_positions"] + 2 * n * r["reference_positions"])
                            / r["elapsed_s"] / (peak * 1e9)),
            "util_useful": med(lambda r: (6 + 2 * live) * n * r["useful_tokens"] / r["elapsed_s"] / (peak * 1e9)),
            "others_busy_max": max(r["others_busy"] for r in rs),
            "vs_trl_paired": paired_ratio(runs, rs, "trl"),
            "spread": (max(r["pairs"] / r["elapsed_s"] for r in rs) - min(r["pairs"] / r["elapsed_s"] for r in rs))
                      / med(lambda r: r["pairs"] / r["elapsed_s"]),
        })
    return rows


def paired_ratio(runs: list[dict], rs: list[dict], other: str) -> float | None:
    """Median over repeats of pairs/s against `other`'s run of the same size, mode and repeat. The runs of one repeat
    follow each other within minutes, so a machine whose speed drifts between repeats moves this less than the ratio
    of the medians."""
    rate = {(r["size"], r["mode"], r["contender"], r["repeat"]): r["pairs"] / r["elapsed_s"] for r in runs}
    ratios = [rate[r["size"], r["mode"], r["contender"], r["repeat"]] / rate[r["size"], r["mode"], other, r["repeat"]]
              for r in rs if (r["size"], r["mode"], other, r["repeat"]) in rate]
    return statistics.median(ratios) if ratios else None


def table(rows: list[dict], params: dict[str, int]) -> str:
    gpu = any(r["peak_gpu_mb"] for r in rows)
    out = ["| size | reference | contender | pairs/s | vs TRL | vs TRL, paired | vs plain | completion tok/s | peak RSS MB "
           + ("| peak GPU MB " if gpu else "") + "| FLOP util (all tokens) | FLOP util (useful) | spread | others' CPU (max) |",
           "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|---|---|---|"]
    by = {(r["size"], r["mode"], r["contender"]): r for r in rows}
    for r in rows:
        trl, plain = by.get((r["size"], r["mode"], "trl")), by.get((r["size"], r["mode"], "plain"))
        vs = lambda o: f"{r['pairs_per_s'] / o['pairs_per_s']:.2f}x" if o else "-"  # noqa: E731
        size = f"{r['size']} ({params[r['size']] / 1e6:.2f}M)"
        mode = "live" if r["mode"] == "live" else "precomputed"
        paired = f"{r['vs_trl_paired']:.2f}x" if r.get("vs_trl_paired") else "-"
        out.append(f"| {size} | {mode} | {r['contender']} | {r['pairs_per_s']:.2f} | {vs(trl)} | {paired} | {vs(plain)} "
                   f"| {r['completion_tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} "
                   + (f"| {r['peak_gpu_mb']:.0f} " if gpu else "") + f"| {r['util_all']:.2f} "
                   f"| {r['util_useful']:.2f} | {r['spread']:.0%} | {r['others_busy_max']:.0%} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                    help="cpu: fp32, 2 threads (the default); gpu: bf16 mixed precision on one CUDA device")
    ap.add_argument("--sizes", nargs="+", default=None, choices=sorted(MODEL_SIZES))
    ap.add_argument("--modes", nargs="+", default=["live", "cached"], choices=["live", "cached"])
    ap.add_argument("--contenders", nargs="+", default=["prefopt", "plain", "trl"], choices=["prefopt", "plain", "trl"])
    ap.add_argument("--prefopt-variant", action="append", default=None, metavar="NAME=ARGS",
                    help="an extra prefopt contender 'prefopt[NAME]' with these CLI overrides (space-separated), "
                         "e.g. 'eager=--model.scoring.compile=false'; repeatable; default: the profile's (gpu: "
                         f"flex_attention), else '{BASE_VARIANT}' (configs/base.yaml's speed settings); 'none' for "
                         "no variant")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before the clock starts")
    ap.add_argument("--steps", nargs="+", default=None, help="timed steps per size, SIZE=N")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-below", type=float, default=0.10, help="wait until the machine is less busy than this")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for quiet before each run")
    ap.add_argument("--workdir", default=str(WORKDIR))
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("--logs", default=None, help="folder for each run's output (default: WORKDIR/logs)")
    ap.add_argument("--run-timeout", type=float, default=None, help="seconds before a run is given up (reported, skipped)")
    args = ap.parse_args(argv)
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key, "") is None:
            setattr(args, key, value)
    gpu = args.profile == "gpu"
    if gpu:
        args.quiet_below = 1.01  # a GPU run is not sensitive to a busy CPU core the way a 2-thread CPU run is
    steps = {k: int(v) for k, v in (s.split("=") for s in args.steps)}
    contenders = list(args.contenders)
    common = PROFILES[args.profile].get("prefopt_args", "").split()
    variants = {"prefopt": common}
    for v in args.prefopt_variant or [BASE_VARIANT]:  # the profile's own filled in above, where it has one
        if v == "none":
            continue
        name, _, extra = v.partition("=")
        variants[f"prefopt[{name}]"] = common + extra.split()
    at = contenders.index("prefopt") + 1 if "prefopt" in contenders else 0
    contenders[at:at] = [k for k in variants if k != "prefopt"]
    if "trl" in contenders and not have_trl():
        print("TRL is not installed: skipping it (pip install -e '.[bench]' adds trl and accelerate)", flush=True)
        contenders.remove("trl")

    params = {s: sum(p.numel() for p in make_model(s).parameters()) for s in args.sizes}
    inputs = {s: build_inputs(Path(args.workdir), s, (args.warmup + steps[s]) * args.batch, profile=args.profile)
              for s in args.sizes}
    for s in args.sizes:
        inputs[s].update(device="cuda" if gpu else "cpu", bf16=gpu, max_length=args.max_length)
    measure_peak = gpu_bf16_peak_gflops if gpu else (lambda: matmul_peak_gflops(args.threads))
    machine = (torch.cuda.get_device_name() if gpu else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}")
    setting = (f"batch {args.batch}, max length {args.max_length}, {'bf16 mixed precision' if gpu else 'fp32'}, "
               f"{args.warmup} warm-up steps, then {', '.join(args.steps)} timed")
    record = {"date": str(datetime.date.today()), "machine": machine, "setting": setting, "params": params,
              "peaks": [], "runs": [], "argv": sys.argv[1:]}
    wait_until_quiet(args.quiet_below, args.max_wait)
    record["peaks"].append(measure_peak())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeats):
        for size in args.sizes:
            for mode in args.modes:
                for contender in contenders:
                    before = wait_until_quiet(args.quiet_below, args.max_wait)
                    name = contender.replace("[", "-").rstrip("]")  # prefopt[base] -> prefopt-base: a plain file name
                    log = Path(args.logs or Path(args.workdir) / "logs") / f"{rep}-{size}-{mode}-{name}.log"
                    r = run_one(contender, inputs[size], mode, args.warmup, steps[size], args.batch, args.threads,
                                variants.get(contender, []), log, args.run_timeout)
                    if r is None:
                        continue
                    r.update(contender=contender, size=size, repeat=rep, busy_before=before, loadavg=os.getloadavg()[0])
                    record["runs"].append(r)
                    out.write_text(json.dumps(record, indent=1))  # after every run: an interrupted table keeps them
                    print(f"[{rep}] {size} {mode:6s} {contender:8s} {r['pairs'] / r['elapsed_s']:7.2f} pairs/s  "
                          f"rss {r['peak_rss_mb']:.0f} MB  gpu {r['peak_gpu_mb']:.0f} MB  others {r['others_busy']:.0%}"
                          f"  unmatched {r['unmatched_rows']}  identified {r['pairs_identified']}/{r['pairs']}",
                          flush=True)
    wait_until_quiet(args.quiet_below, args.max_wait)
    record["peaks"].append(measure_peak())
    out.write_text(json.dumps(record, indent=1))
    print(report(record))


def report(record: dict) -> str:
    """The header line and the table of one record (or of several merged)."""
    peak = max(record["peaks"])
    sizes = sorted({r["size"] for r in record["runs"]}, key=list(record["params"]).index)
    repeats = {s: len({r["repeat"] for r in record["runs"] if r["size"] == s}) for s in sizes}
    counts = (f"{next(iter(repeats.values()))}" if len(set(repeats.values())) == 1
              else ", ".join(f"{n} ({s})" for s, n in repeats.items()))
    header = (f"{record['date']}, {record['machine']}; matmul peak {peak:.0f} GFLOP/s (best of the measurements "
              f"before and after: {', '.join(f'{p:.0f}' for p in record['peaks'])}); median of {counts}; "
              f"{record['setting']}")
    return "\n" + header + "\n\n" + table(summarize(record["runs"], record["params"], peak), record["params"])


def merge(paths: list[str]) -> dict:
    """Records of separate invocations (one repeat each, say) as one: their runs renumbered as repeats 0, 1, ..."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    merged = {**records[0], "peaks": [p for r in records for p in r["peaks"]], "runs": []}
    for k, rec in enumerate(records):
        if rec["setting"] != merged["setting"] or rec["machine"] != merged["machine"]:
            raise SystemExit(f"{paths[k]}: a different machine or setting than {paths[0]}; not merged")
        offset = 1 + max((r["repeat"] for r in merged["runs"]), default=-1)
        merged["runs"] += [{**r, "repeat": r["repeat"] + offset} for r in rec["runs"]]
    return merged


def merge_main(argv: list[str]) -> None:
    """`bench_dpo.py merge A.json B.json ... [--out M.json]`: print (and save) the merged table."""
    ap = argparse.ArgumentParser(prog="bench_dpo.py merge", description=merge.__doc__)
    ap.add_argument("records", nargs="+", help="json files written by bench_dpo.py (--out)")
    ap.add_argument("--out", default=None, help="write the merged record here")
    args = ap.parse_args(argv)
    merged = merge(args.records)
    if args.out:
        Path(args.out).write_text(json.dumps(merged, indent=1))
    print(report(merged))


if __name__ == "__main__":
    merge_main(sys.argv[2:]) if sys.argv[1:2] == ["merge"] else main()
