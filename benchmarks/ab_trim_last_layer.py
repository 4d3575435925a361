"""`model.trim_last_layer` A/B in one process: the 20M policy's compiled training step with and without it.

    python benchmarks/ab_trim_last_layer.py          # about 4 minutes on 2 cores

The lever saves about 4-5% of a step's FLOPs, less than bench_dpo.py's run-to-run spread on this machine (separate
processes, minutes apart). Here both models live in one process and take turns on the same prompt-shared batches
(ABAB, then BABA, ...), so the machine's drift hits both alike: policy forward + backward + fused AdamW, compiled,
batch 8, max length 128, 2 threads. Prints each one's median step time and the median per-batch ratio.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_inputs  # noqa: E402

from prefopt.data import PreferenceDataModule  # noqa: E402
from prefopt.logps import decoder_and_head  # noqa: E402
from prefopt.models import load_causal_lm  # noqa: E402
from prefopt.prefix_sharing import shared_token_logps, trim_last_layer  # noqa: E402


def main(rounds: int = 3, batches: int = 16) -> None:
    torch.set_num_threads(2)
    inputs = build_inputs(Path("/tmp/prefopt-bench"), "20m", (batches + 3) * 8)
    dm = PreferenceDataModule(dataset=inputs["dataset"], tokenizer=inputs["model"], batch_size=8, max_length=128,
                              share_prompt=True, val_split="validation")  # fmt: skip
    dm.setup("fit")
    ex = dm.train_examples
    data = [dm.collate_shared_pairs(ex[i : i + 8]) for i in range(0, 8 * batches, 8)]
    models = {}
    for name in ("full", "trimmed"):
        model = load_causal_lm(inputs["model"]).train()
        if name == "trimmed" and not trim_last_layer(model):
            raise SystemExit("the benchmark model's last layer could not be trimmed")
        decoder_and_head(model)[0].compile(dynamic=True)  # as model.compile
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True))

    def step(name: str, batch: dict) -> float:
        model, optimizer = models[name]
        start = time.perf_counter()
        shared_token_logps(model, batch).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for name in models:  # compile, on a few shapes
        for batch in data[:4]:
            step(name, batch)
    times = {name: [] for name in models}
    for r in range(rounds):
        for batch in data:
            for name in ("full", "trimmed") if r % 2 == 0 else ("trimmed", "full"):
                times[name].append(step(name, batch))
    for name, ts in times.items():
        print(f"{name:8s} median {statistics.median(ts) * 1e3:.1f} ms a step ({len(ts)} steps)")
    ratio = statistics.median(a / b for a, b in zip(times["full"], times["trimmed"]))
    print(f"full / trimmed, per batch: median {ratio:.3f}")


if __name__ == "__main__":
    main()
