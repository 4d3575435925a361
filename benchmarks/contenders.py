"""The three contenders, each run in its own process by bench_dpo.py: prefopt, a plain PyTorch loop, TRL.

Every contender trains the same model directory on the same pairs (one epoch of warm-up + timed steps), with DPO
(beta 0.1, sigmoid loss), AdamW (fused, lr 1e-6, no weight decay), no gradient clipping, no dropout, and a live or
precomputed reference; on the CPU in fp32, on a GPU in bf16 mixed precision (fp32 weights, bf16 autocast: what TRL's
`bf16=True` does). The clock starts at the end of the last warm-up optimizer step and stops at the end of the last
timed one (on a GPU after a synchronize at both ends), so one-off costs (imports, loading, tokenizing, precomputing
reference log-probs, compiling) are outside it. Forward pre-hooks on each model's decoder count the token positions
it processes inside the window (padding included) and keep its input ids, from which every pair it saw is identified
after the clock stops: useful tokens (no padding, each prompt once) are exact for each contender's own batches, and a
pair tokenized differently by a contender shows up as unmatched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_gpu_mb, peak_rss_mb, tokenized_pairs  # noqa: E402

BETA, LR, PAD, BOS = 0.1, 1e-6, 256, 257


def _split_at_bos(tokens: list[int]) -> list[tuple[int, ...]]:
    """Every sequence starts with bos (257), which occurs nowhere else."""
    starts = [i for i, t in enumerate(tokens) if t == BOS] + [len(tokens)]
    return [tuple(tokens[a:b]) for a, b in zip(starts, starts[1:])]


class Window:
    """Step clock and token counters for the timed window (steps warmup+1 .. warmup+steps)."""

    def __init__(self, warmup: int, examples: list[dict[str, list[int]]], steps: int, cuda: bool = False) -> None:
        self.warmup, self.steps, self.step, self.open, self.start, self.end = warmup, steps, 0, False, 0.0, 0.0
        self.last, self.step_s = 0.0, []  # durations of the timed steps (CPU; on a GPU only the total is exact)
        self.counts = {"policy_positions": 0, "reference_positions": 0, "unmatched_rows": 0}
        self.policy_ids: list[torch.Tensor] = []  # read after the clock stops (no host sync inside the window)
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.threads = torch.get_num_threads()
        # Every row layout a contender may use, stripped of padding, -> pair index. prefopt's rows leave out the
        # last token of each response (it predicts nothing), so those layouts are keys too.
        self.index: dict[tuple[int, ...], int] = {}
        for i, e in enumerate(examples):
            p, c, r = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
            for row in (p + c, p + r, p + c + r, p + c[:-1] + r[:-1], p + c[:-1], p + r[:-1]):
                self.index[tuple(row)] = i
        self.examples = examples

    def step_end(self) -> None:
        self.step += 1
        if self.step == self.warmup:
            self.sync()
            self.open, self.start = True, time.perf_counter()
            self.threads = torch.get_num_threads()
        elif self.open:
            if self.step == self.warmup + self.steps:
                self.sync()
                self.open = False
            self.end = time.perf_counter()
            self.step_s.append(self.end - self.last)
        self.last = time.perf_counter()

    def hook(self, role: str):
        def count(module, args, kwargs):
            if not self.open:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.counts[f"{role}_positions"] += ids.numel()
            if role == "policy":
                self.policy_ids.append(ids)

        return count

    def attach(self, model: Any, role: str) -> None:
        model.get_decoder().register_forward_pre_hook(self.hook(role), with_kwargs=True)

    def pairs_seen(self) -> set[int]:
        seen = set()
        for ids in self.policy_ids:
            for row in ids.tolist():
                for key in _split_at_bos([t for t in row if t != PAD]):  # a row holds one pair or one response
                    if key in self.index:
                        seen.add(self.index[key])
                    else:
                        self.counts["unmatched_rows"] += 1
        return seen

    def result(self, steps: int, batch: int) -> dict[str, Any]:
        ex = [self.examples[i] for i in sorted(self.pairs_seen())]
        elapsed = self.end - self.start
        return {
            "elapsed_s": elapsed,
            "timed_steps": self.step - self.warmup,
            "pairs": steps * batch,
            "pairs_identified": len(ex),
            "useful_tokens": sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex),
            "completion_tokens": sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex),
            "threads": self.threads,
            "step_s": [round(t, 5) for t in self.step_s],
            **self.counts,
        }


# ------------------------------------------------------------------------------------------------ plain loop
def run_plain(inputs: dict[str, str], live: bool, warmup: int, steps: int, batch: int) -> dict[str, Any]:
    """The minimal loop: 2B concatenated rows, one forward per model, reference under no_grad, DPO, AdamW."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = inputs["device"]
    tok = AutoTokenizer.from_pretrained(inputs["model"])
    examples = tokenized_pairs(inputs["jsonl"], tok)
    policy = AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float32).to(device).train()
    reference = AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float32).to(device)
    reference.eval().requires_grad_(False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if inputs["bf16"] else nullcontext
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0, fused=True)

    def collate(exs: list[dict[str, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [e["prompt_ids"] + e["chosen_ids"] for e in exs] + [e["prompt_ids"] + e["rejected_ids"] for e in exs]
        prompt = [len(e["prompt_ids"]) for e in exs] * 2
        ids = torch.full((len(rows), max(map(len, rows))), PAD)
        attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
            comp[i, prompt[i] : len(r)] = 1
        return ids.to(device), attn.to(device), comp.to(device)

    def logps(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        logits, labels = logits.float(), ids[:, 1:]
        tok_logps = logits.gather(-1, labels[..., None]).squeeze(-1) - logits.logsumexp(-1)
        return (tok_logps * comp[:, 1:]).sum(-1)  # (2B,)

    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [[examples[i] for i in order[s : s + batch]] for s in range(0, len(order), batch)]
    ref_table = None
    if not live:  # precomputed once before training, then the reference is dropped
        with torch.no_grad():
            ref_table = [logps(reference, *collate(b)) for b in batches]
        del reference
    window = Window(warmup, examples, steps, cuda=device == "cuda")
    window.attach(policy, "policy")
    if live:
        window.attach(reference, "reference")
    for k, b in enumerate(batches[: warmup + steps]):
        ids, attn, comp = collate(b)
        pol = logps(policy, ids, attn, comp)
        if live:
            with torch.no_grad():
                ref = logps(reference, ids, attn, comp)
        else:
            ref = ref_table[k]
        n = len(b)
        margin = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
        loss = -torch.nn.functional.logsigmoid(BETA * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.step_end()
    return window.result(steps, batch)


# ------------------------------------------------------------------------------------------------ TRL
def run_trl(inputs: dict[str, str], live: bool, warmup: int, steps: int, batch: int) -> dict[str, Any]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(inputs["model"])
    examples = tokenized_pairs(inputs["jsonl"], tok)
    window = Window(warmup, examples, steps, cuda=inputs["device"] == "cuda")

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            window.step_end()

    model = AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="bench-trl-")
    config = DPOConfig(
        output_dir=out, per_device_train_batch_size=batch, max_length=inputs["max_length"], beta=BETA,
        loss_type=["sigmoid"], learning_rate=LR, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
        max_steps=warmup + steps, bf16=inputs["bf16"], fp16=False, gradient_checkpointing=False,
        use_cpu=inputs["device"] == "cpu", precompute_ref_log_probs=not live, optim="adamw_torch_fused",
        save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
    )
    train = datasets.load_dataset("json", data_files=inputs["jsonl"], split="train")
    trainer = DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tok, callbacks=[Clock()])
    window.attach(trainer.model, "policy")
    if live:
        window.attach(trainer.ref_model, "reference")
    trainer.train()
    return window.result(steps, batch)


# ------------------------------------------------------------------------------------------------ prefopt
def run_prefopt(inputs: dict[str, str], live: bool, warmup: int, steps: int, batch: int,
                extra: list[str] = ()) -> dict[str, Any]:
    """prefopt's CLI: configs/base.yaml (its shipped defaults, speed settings included), then prefopt_overrides.yaml."""
    from prefopt.cli import main
    from prefopt_clock import Clock

    root = tempfile.mkdtemp(prefix="bench-prefopt-")
    os.environ["PREFOPT_CACHE"] = str(Path(root) / "cache")  # a fresh reference cache: computed at fit start
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": LR, "weight_decay": 0.0, "fused": True}}
    cli = main([
        "fit", f"--config={Path(__file__).resolve().parent / 'prefopt_overrides.yaml'}",
        f"--model.model={inputs['model']}", f"--model.scoring.reference_cache={str(not live).lower()}",
        f"--model.optimizer={json.dumps(optimizer)}", f"--model.loss={json.dumps({'name': 'dpo', 'beta': BETA})}",
        f"--data.dataset={inputs['dataset']}", f"--data.batch_size={batch}", f"--trainer.max_steps={warmup + steps}",
        f"--data.max_length={inputs['max_length']}", f"--trainer.default_root_dir={root}",
        *(["--trainer.accelerator=gpu", "--trainer.devices=1"] if inputs["device"] == "cuda" else []),
        *(["--trainer.precision=bf16-mixed"] if inputs["bf16"] else []),
        f"--trainer.callbacks+={json.dumps({'class_path': 'prefopt_clock.Clock', 'init_args': {'warmup': warmup, 'steps': steps}})}",
        *extra,
    ])
    clock = next(c for c in cli.trainer.callbacks if isinstance(c, Clock))
    return clock.window.result(steps, batch)


RUNNERS = {"prefopt": run_prefopt, "plain": run_plain, "trl": run_trl}


def worker(argv: list[str]) -> None:
    """`contenders.py CONTENDER INPUTS_JSON live|cached WARMUP STEPS BATCH THREADS [EXTRA_JSON]`: one RESULT line.

    EXTRA_JSON: a list of extra prefopt CLI arguments (a variant); empty for the others.
    """
    name, inputs, mode, warmup, steps, batch, threads, *rest = argv
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    extra = json.loads(rest[0]) if rest else []
    run = RUNNERS[name]
    args = (json.loads(inputs), mode == "live", int(warmup), int(steps), int(batch))
    result = run(*args, extra) if extra else run(*args)
    result.update(contender=name, mode=mode, peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb())
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    worker(sys.argv[1:])
