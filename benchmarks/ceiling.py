"""The FLOP-utilization ceiling of the model code itself on this machine, and where a step's time goes.

    python benchmarks/ceiling.py                 # 20m, batch 8 x 128 tokens, 2 threads, compiled (about 2 minutes)
    python benchmarks/ceiling.py --size 1m --no-compile

One policy training step with no DPO, no reference, no padding and no data pipeline: the benchmark model's decoder
on random ids (batch x length, plain causal attention), a scalar loss on the last hidden state, backward and a fused
AdamW step. Utilization counts 6 x params x tokens, as `bench_dpo.py` does, against the matmul peak measured the
same way. Every token is useful here, so no training loop on this model, with this attention and these kernels,
can reach a higher useful-token utilization than this. Then a torch.profiler table of a few steps splits the time
into matmuls, attention, inductor's fused element-wise kernels, the optimizer and the rest, with the matmuls' own
rate in place (below their rate in isolation, where the same operands stay in cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_SIZES, make_model, matmul_peak_gflops  # noqa: E402

# torch.profiler event names -> the part of a step they belong to (first match wins; self time only)
PARTS = (("matmuls", ("aten::mm", "aten::addmm", "aten::bmm")), ("attention", ("scaled_dot_product",)),
         ("fused element-wise (inductor)", ("CompiledFxGraph",)), ("optimizer", ("adamw", "Optimizer.")))


def part_of(name: str) -> str:
    return next((part for part, keys in PARTS if any(k in name for k in keys)), "other")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(MODEL_SIZES), default="20m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = make_model(args.size)
    params = sum(p.numel() for p in model.parameters())
    decoder = model.get_decoder()
    if args.compile:
        decoder.compile(dynamic=True)  # as prefopt's model.scoring.compile
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=True)
    ids = torch.randint(0, 256, (args.batch, args.length))

    def step() -> None:
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        hidden.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (compiles)
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = matmul_peak_gflops(args.threads)
    step_s = statistics.median(times)
    tokens = args.batch * args.length
    util = 6 * params * tokens / step_s / (peak * 1e9)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            step()
    parts: dict[str, float] = {}
    mm_flops = mm_s = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        parts[part_of(e.key)] = parts.get(part_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
        if e.key == "aten::mm" and len(e.input_shapes) >= 2 and len(e.input_shapes[0]) == 2:
            (m, k), n = e.input_shapes[0], e.input_shapes[1][1]
            mm_flops += 2 * m * k * n * e.count
            mm_s += e.self_cpu_time_total / 1e6
    total = sum(parts.values())

    print(f"{args.size} ({params / 1e6:.2f}M params), {args.batch} x {args.length} tokens, {args.threads} threads, "
          f"{'compiled' if args.compile else 'eager'}; matmul peak {peak:.0f} GFLOP/s")
    print(f"step {step_s * 1e3:.0f} ms (median of {args.steps}); utilization, every token useful: {util:.2f}")
    print("\n| part of a profiled step | share of time |\n|---|---|")
    for part, _ in (*PARTS, ("other", ())):
        print(f"| {part} | {parts.get(part, 0.0) / total:.1%} |")
    if mm_s:
        print(f"\nmatmuls in place: {mm_flops / mm_s / 1e9:.0f} GFLOP/s ({mm_flops / mm_s / 1e9 / peak:.0%} of the peak)")


if __name__ == "__main__":
    main()
