"""`model.scoring.trim_last_layer` A/B in one process: a compiled training step with and without it.

    python benchmarks/ab_trim_last_layer.py                # 20M policy step (about 4 minutes on 2 cores)
    python benchmarks/ab_trim_last_layer.py --size 1m --live

The lever saves about 4-5% of a step's FLOPs, less than bench_dpo.py's run-to-run spread on this machine (separate
processes, minutes apart). Here both set-ups live in one process and take turns on the same prompt-shared batches
(ABAB, then BABA, ...), so the machine's drift hits both alike. A step: policy forward + backward + fused AdamW
(with --live, first the reference's forward under no_grad, as with a live reference), compiled as `model.scoring.compile`
compiles, batch 8, max length 128, 2 threads. Prints each one's median step time and the median per-batch ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_SIZES, WORKDIR, build_inputs  # noqa: E402

from prefopt.train.data import PreferenceDataModule  # noqa: E402
from prefopt.fast.head import decoder_and_head  # noqa: E402
from prefopt.train.models import freeze, load_causal_lm  # noqa: E402
from prefopt.fast.prefix_sharing import shared_token_logps, trim_last_layer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(MODEL_SIZES), default="20m")
    ap.add_argument("--live", action="store_true", help="a live reference forward in every step")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the batches, each set-up once per batch")
    ap.add_argument("--batches", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    inputs = build_inputs(WORKDIR, args.size, (args.batches + 3) * 8)
    dm = PreferenceDataModule(dataset=inputs["dataset"], tokenizer=inputs["model"], batch_size=8, max_length=128,
                              share_prompt=True, val_split="validation")
    dm.setup("fit")
    ex = dm.train_examples
    data = [dm.collate_shared_pairs(ex[i : i + 8]) for i in range(0, 8 * args.batches, 8)]
    setups = {}
    for name in ("full", "trimmed"):
        policy = load_causal_lm(inputs["model"]).train()
        reference = freeze(load_causal_lm(inputs["model"])) if args.live else None
        for model in (policy, reference) if args.live else (policy,):
            if name == "trimmed" and not trim_last_layer(model):
                raise SystemExit("the benchmark model's last layer could not be trimmed")
            decoder_and_head(model)[0].compile(dynamic=True)  # as model.scoring.compile
        setups[name] = (policy, reference, torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True))

    def step(name: str, batch: dict) -> float:
        policy, reference, optimizer = setups[name]
        start = time.perf_counter()
        with torch.no_grad():
            ref = shared_token_logps(reference, batch) if reference is not None else 0.0
        (shared_token_logps(policy, batch) - ref).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for name in setups:  # compile, on a few shapes
        for batch in data[:4]:
            step(name, batch)
    times = {name: [] for name in setups}
    for r in range(args.rounds):
        for batch in data:
            for name in ("full", "trimmed") if r % 2 == 0 else ("trimmed", "full"):
                times[name].append(step(name, batch))
    setting = f"{args.size}, {'live' if args.live else 'no'} reference"
    for name, ts in times.items():
        print(f"{setting}: {name:8s} median {statistics.median(ts) * 1e3:.1f} ms a step ({len(ts)} steps)")
    ratio = statistics.median(a / b for a, b in zip(times["full"], times["trimmed"]))
    print(f"{setting}: full / trimmed, per batch: median {ratio:.3f}")


if __name__ == "__main__":
    main()
