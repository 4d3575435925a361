"""Where a prefopt training step's time goes: the benchmark's prefopt run with torch.profiler over a few steps.

    python benchmarks/step_profile.py --profile gpu                         # the GPU profile's model and settings
    python benchmarks/step_profile.py --profile gpu -- --model.scoring.attn_implementation=flex_attention
    python benchmarks/step_profile.py --size 20m --mode live                # CPU

Runs prefopt exactly as bench_dpo.py does (configs/base.yaml, prefopt_overrides.yaml, the profile's prefopt_args,
then any arguments after `--`), profiles `--steps` training steps after `--warmup`, and prints the wall time per
step, the share of it the device was busy (GPU), and the kernels (GPU) or operators (CPU) that took the most time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_dpo import PROFILES  # noqa: E402
from common import WORKDIR, build_inputs  # noqa: E402
from contenders import run_prefopt  # noqa: E402


class StepProfiler(L.Callback):
    """torch.profiler from the start of training step `warmup` to the end of step `warmup + steps - 1`."""

    def __init__(self, warmup: int = 4, steps: int = 3, rows: int = 25) -> None:
        self.warmup, self.steps, self.rows = warmup, steps, rows
        self.prof: profile | None = None
        self.start = 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(pl_module)
            cuda = pl_module.device.type == "cuda"
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self.prof.__enter__()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != self.warmup + self.steps - 1 or self.prof is None:
            return
        self._sync(pl_module)
        wall = (time.perf_counter() - self.start) / self.steps
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        cuda = pl_module.device.type == "cuda"
        if cuda:
            # kernel time as the table's "Self CUDA time total" counts it: on the operators that launched them
            busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CPU") / 1e6 / self.steps
            launches = sum(e.count for e in events if e.device_type.name == "CUDA") / self.steps
            print(f"\nPROFILE {wall * 1e3:.1f} ms a step (wall); kernels {busy * 1e3:.1f} ms a step "
                  f"({busy / wall:.0%} busy), {launches:.0f} kernel launches a step", flush=True)
            print(events.table(sort_by="self_device_time_total", row_limit=self.rows, max_name_column_width=70))
        else:
            print(f"\nPROFILE {wall * 1e3:.1f} ms a step (wall)", flush=True)
            print(events.table(sort_by="self_cpu_time_total", row_limit=self.rows, max_name_column_width=70))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--size", default=None, help="default: the profile's first size")
    ap.add_argument("--mode", choices=["live", "cached"], default="live")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=str(WORKDIR))
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    prof = PROFILES[args.profile]
    size, batch, gpu = args.size or prof["sizes"][0], args.batch or prof["batch"], args.profile == "gpu"
    torch.set_num_threads(args.threads)
    inputs = build_inputs(Path(args.workdir), size, (args.warmup + args.steps) * batch, profile=args.profile)
    inputs.update(device="cuda" if gpu else "cpu", bf16=gpu, max_length=prof["max_length"])
    callback = {"class_path": "step_profile.StepProfiler", "init_args": {"warmup": args.warmup, "steps": args.steps}}
    result = run_prefopt(inputs, args.mode == "live", args.warmup, args.steps, batch,
                         prof.get("prefopt_args", "").split() + [f"--trainer.callbacks+={json.dumps(callback)}", *extra])
    print(f"pairs/s over the profiled steps (profiler on): {result['pairs'] / result['elapsed_s']:.2f}")


if __name__ == "__main__":
    main()
