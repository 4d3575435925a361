"""Where a grid run's training time goes on the built-in task, and whether compiling pays across runs.

    python benchmarks/run_cost.py                 # the decoder's forward + backward at growing batch sizes
    python benchmarks/run_cost.py --fits 3        # and 3 short fits in one process with compiled decoders

The first table times one forward and backward of the built-in task's ~85k-parameter decoder (random token ids, 25
positions a row, one thread), eager and compiled, at several numbers of rows. If a step were overhead (Python, the
dispatcher, autograd bookkeeping), its time would grow slower than the rows; it grows with them, so stacking more
work into one step (several runs in one vectorized forward) cannot pay: the per-row cost is the floor.

The second part runs `--fits` short DPO/IPO fits one after another in this process, as a grid worker does, with
`model.scoring.compile: true`, and prints each fit's wall time and the number of graphs torch.compile has built so
far: the first fit compiles, the later ones (another seed, another loss) reuse its graphs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch


def decoder_table(rows: list[int], repeats: int) -> None:
    from transformers import LlamaForCausalLM

    from prefopt.gold.build import ReferenceRecipe, _model_config, build_tokenizer

    config = _model_config(ReferenceRecipe(), build_tokenizer())
    torch.manual_seed(0)
    eager = LlamaForCausalLM(config)
    compiled = torch.compile(eager, dynamic=False)
    print("| rows x 25 positions | eager ms | eager ms / row | compiled ms | compiled ms / row |")
    print("|---|---|---|---|---|")
    for n in rows:
        ids = torch.randint(0, config.vocab_size, (n, 25))
        times = []
        for model in (eager, compiled):
            for i in range(repeats + 3):
                if i == 3:  # after warm-up (and compilation)
                    start = time.perf_counter()
                model(input_ids=ids).logits.logsumexp(-1).sum().backward()
            times.append((time.perf_counter() - start) / repeats * 1e3)
        print(f"| {n} | {times[0]:.1f} | {times[0] / n:.3f} | {times[1]:.1f} | {times[1] / n:.3f} |")


def fits(count: int, steps: int) -> None:
    from torch._dynamo.utils import counters

    from prefopt.cli import main

    sys.argv[1:] = []  # main() gets its arguments as a list; LightningCLI warns when sys.argv holds others too
    print("\n| fit | loss | seed | wall s | graphs built so far |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for i in range(count):
            loss = "ipo" if i % 3 == 2 else "dpo"
            start = time.perf_counter()
            try:
                main(["fit", "--config", f"experiments/{loss}.yaml", "--trainer.max_steps", str(steps),
                      "--trainer.val_check_interval", str(steps), "--model.scoring.compile", "true",
                      "--trainer.logger.init_args.save_dir", out, "--seed_everything", str(i)])
            except SystemExit:
                pass
            print(f"| {i + 1} | {loss} | {i} | {time.perf_counter() - start:.1f} | "
                  f"{counters['stats']['unique_graphs']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64, 160, 320])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--fits", type=int, default=0, help="short fits in this process (0: none)")
    parser.add_argument("--steps", type=int, default=60, help="steps of each fit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread")
    decoder_table(args.rows, args.repeats)
    if args.fits:
        fits(args.fits, args.steps)


if __name__ == "__main__":
    main()
