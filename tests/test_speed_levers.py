"""The speed levers change no number beyond float rounding: prompt sharing, label-only (chunked) log-probs,
length-grouped batching, and the every-N-steps finite check. No timings here: speed is measured by
benchmarks/bench_dpo.py, never by tests."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from micro_fixtures import micro_base, micro_model, micro_pairs, poison_loss  # noqa: F401  (fixtures)

from prefopt.train.batching import EpochSeededSampler, LengthGroupedSampler, padding_fraction
from prefopt.cli import main
from prefopt.train.data import PreferenceDataModule
from prefopt.fast.head import completion_token_logps, label_logps_from_hidden
from prefopt.logps import forward_logits, pair_logps, token_logps
from prefopt.losses import LossConfig
from prefopt.train.models import load_causal_lm
from prefopt.train.module import PreferenceModule
from prefopt.fast.scorer import ScoringOptions
from prefopt.fast.prefix_sharing import collate_shared_pairs, shared_attention_mask, shared_token_logps, trim_last_layer

RECORD_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "policy_chosen_shared_logps",
                 "policy_rejected_shared_logps", "chosen_lengths", "rejected_lengths")


def _dm(micro_model, micro_pairs, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(dataset=str(micro_pairs), tokenizer=str(micro_model), val_fraction=0.25, batch_size=4,
                              **kwargs)
    dm.setup("fit")
    return dm


def test_shared_layout_by_hand():
    """Pair 0: prompt [1, 5], chosen [6, 2], rejected [7, 8, 2]; pair 1: prompt [1], chosen [9, 2], rejected [2]."""
    b = collate_shared_pairs([[1, 5], [1]], [[6, 2], [9, 2]], [[7, 8, 2], [2]], pad_id=0)
    # Each response enters without its last token (2 here: the eos), which predicts nothing and which nothing sees.
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 8], [1, 9, 0, 0, 0]]
    assert b["position_ids"].tolist()[0] == [0, 1, 2, 2, 3]  # the rejected part restarts after the prompt
    assert b["position_ids"].tolist()[1][:2] == [0, 1]
    assert b["part_ids"].tolist() == [[0, 0, 1, 2, 2], [0, 1, 3, 3, 3]]
    # Label slots, chosen rows then rejected rows, left-aligned; column 0 of completion_mask is always 0.
    assert b["completion_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 0, 0]]
    # Predicting positions (flattened B x T, T = 5): w_j <- P-1+j; l_0 <- P-1; l_j <- P+(C-1)+j-1.
    assert b["pred_index"].tolist() == [1, 2, 5, 6, 1, 3, 4, 5]
    assert b["labels"].tolist() == [6, 2, 9, 2, 7, 8, 2, 2]  # every token a label, the eos included
    assert b["read_rows"].tolist() == [1, 2, 3, 4, 5, 6]
    m = shared_attention_mask(b)[:, 0].int().tolist()
    assert m[0] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # chosen: causal
        [1, 1, 0, 1, 0],  # rejected: the prompt and itself, never the chosen tokens
        [1, 1, 0, 1, 1],
    ]
    assert m[1][1] == [1, 1, 0, 0, 0] and m[1][3] == [0, 0, 0, 1, 0]  # padding sees only itself


def _sharing_matches_standard(model, dm, grads: bool) -> None:
    """The record of 5 pairs, and (grads) the gradients of a mix of its fields, standard layout vs prompt-shared."""
    device = next(model.parameters()).device
    examples = dm.train_examples[:5]
    standard = {k: v.to(device) for k, v in dm.collate_pairs(examples).items()}
    shared = {k: v.to(device) for k, v in dm.collate_shared_pairs(examples).items()}
    assert standard["input_ids"].shape[0] == 10 and shared["input_ids"].shape[0] == 5

    def record_and_grads(batch, tokens):
        lp = pair_logps(tokens, batch["completion_mask"])
        loss = (lp.policy_chosen_logps - 0.7 * lp.policy_rejected_logps + 0.3 * lp.policy_chosen_shared_logps).sum()
        return lp, (torch.autograd.grad(loss, list(model.parameters())) if grads else [])

    with torch.enable_grad() if grads else torch.no_grad():
        a, grads_a = record_and_grads(standard, token_logps(forward_logits(model, standard), standard["input_ids"],
                                                            standard["completion_mask"]))
        b, grads_b = record_and_grads(shared, shared_token_logps(model, shared))
    for field in RECORD_FIELDS:
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5, msg=field)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prompt_sharing_gives_the_same_record_and_gradients(micro_model, micro_pairs, attn):
    model = load_causal_lm(str(micro_model), attn_implementation=attn)
    _sharing_matches_standard(model, _dm(micro_model, micro_pairs), grads=True)


def test_trimmed_last_layer_gives_the_same_record_and_gradients_with_its_mlp_on_the_read_rows_only(micro_model,
                                                                                                micro_pairs):
    """trim_last_layer: the last layer's MLP sees only the distinct predicting positions, and nothing changes."""
    dm = _dm(micro_model, micro_pairs)
    model = load_causal_lm(str(micro_model))
    assert trim_last_layer(model)
    rows = []
    model.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    _sharing_matches_standard(model, dm, grads=True)
    shared = dm.collate_shared_pairs(dm.train_examples[:5])
    n_read = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) - 1 for e in dm.train_examples[:5])
    assert len(shared["read_rows"]) == n_read == len(shared["pred_index"]) - 5  # each last prompt token once
    assert rows[-1] == n_read < shared["input_ids"].numel()  # the shared pass; the standard one ran every row
    assert rows[0] == 10 * dm.collate_pairs(dm.train_examples[:5])["input_ids"].shape[1]


def test_only_llama_structured_layers_are_trimmed():
    """Olmo2 has `layers` too, but normalizes after attention and MLP: left alone. GPT-2 has no `layers`."""
    from transformers import GPT2Config, GPT2LMHeadModel, Olmo2Config, Olmo2ForCausalLM

    olmo = Olmo2ForCausalLM(Olmo2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2))
    assert len(olmo.model.layers) == 2 and not trim_last_layer(olmo)
    assert not trim_last_layer(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32)))


def test_a_trimmed_layer_runs_whole_under_gradient_checkpointing_and_its_copy_computes_with_its_own_weights(
        micro_model, micro_pairs):
    import copy

    from prefopt.train.models import enable_gradient_checkpointing

    dm = _dm(micro_model, micro_pairs)
    batch = dm.collate_shared_pairs(dm.train_examples[:5])
    model = load_causal_lm(str(micro_model)).train()
    enable_gradient_checkpointing(model)
    assert trim_last_layer(model)
    rows = []
    model.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    shared_token_logps(model, batch).sum().backward()
    assert rows and all(n == batch["input_ids"].numel() for n in rows)  # every row, checkpointed as before
    copied = copy.deepcopy(model).eval()
    with torch.no_grad():
        before = shared_token_logps(copied, batch)
        copied.model.layers[-1].mlp.down_proj.weight.zero_()  # the copy's own last MLP, not the original's
        assert not torch.allclose(shared_token_logps(copied, batch), before)


def test_prompt_sharing_under_flex_attention_gives_the_same_record(micro_model, micro_pairs):
    """flex_attention takes the shared mask as a BlockMask. Its backward runs on CUDA only (`..._on_cuda` below);
    here the forward, as the reference's log-probs use it."""
    model = load_causal_lm(str(micro_model), attn_implementation="flex_attention")
    _sharing_matches_standard(model, _dm(micro_model, micro_pairs), grads=False)


@pytest.mark.parametrize(("args", "message"), [
    (["--model.scoring.attn_implementation=flex_attention"], "flex_attention cannot train on the CPU"),
    (["--model.scoring.attn_implementation=flash_attention_2", "--model.scoring.share_prompt=true"], "share_prompt needs .*not 'flash"),
])
def test_attention_that_cannot_train_is_refused_before_loading(micro_base, monkeypatch, args, message):
    import prefopt.train.module

    monkeypatch.setattr(prefopt.train.module, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises(ValueError, match=message):
        main(["fit", *args])


def test_unpaired_training_takes_any_attention_with_share_prompt_on(micro_base, monkeypatch):
    """Unpaired rows (KTO: data.unpaired follows the loss) are never prompt-shared, so flash_attention_2 passes the
    check and the run goes on to load."""
    import prefopt.train.module

    monkeypatch.setattr(prefopt.train.module, "load_causal_lm", lambda *a, **k: pytest.fail("loading"))
    with pytest.raises(pytest.fail.Exception, match="loading"):
        main(["fit", "--model.scoring.attn_implementation=flash_attention_2", "--model.scoring.share_prompt=true",
              "--model.loss={name: kto}"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward needs CUDA")
def test_prompt_sharing_under_flex_attention_gives_the_same_gradients_on_cuda(micro_model, micro_pairs):
    model = load_causal_lm(str(micro_model), attn_implementation="flex_attention", device=torch.device("cuda"))
    _sharing_matches_standard(model, _dm(micro_model, micro_pairs), grads=True)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_label_logps_match_full_logits_in_value_and_gradient(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    full = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, labels[:, None]).squeeze(1)
    got = label_logps_from_hidden(hidden, weight, labels, bias, chunk_size=chunk)
    torch.testing.assert_close(got.double(), full, rtol=1e-6, atol=1e-6)  # computed in fp32 like every log-prob
    g = torch.randn(7, dtype=torch.float64)
    expected = torch.autograd.grad((full * g).sum(), (hidden, weight, bias))
    for e, x in zip(expected, torch.autograd.grad((got * g).sum(), (hidden, weight, bias))):
        torch.testing.assert_close(x, e, rtol=1e-5, atol=1e-5)


def test_chunked_label_logps_backward_runs_in_the_forwards_autocast_dtype():
    """Under bf16 autocast the chunked LM head's backward matmuls run in bf16, as autograd runs the unchunked head's
    (in fp32 they cost a 0.5B model with a 151,936-token vocabulary 57 ms of GPU time a step at batch 8 on an H100),
    with the same values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
                self.seen.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    labels = torch.randint(0, 11, (7,))
    grads = []
    for chunk in (None, 3):
        hidden = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        weight = torch.randn(11, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values = label_logps_from_hidden(hidden, weight, labels, chunk_size=chunk)
        with MatmulDtypes() as mode:
            values.sum().backward()
        assert mode.seen == {torch.bfloat16}, chunk
        grads.append((values.detach(), hidden.grad, weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def test_label_only_logps_match_full_logits(micro_model, micro_pairs):
    dm = _dm(micro_model, micro_pairs)
    model = load_causal_lm(str(micro_model))
    batch = dm.collate_pairs(dm.train_examples[:4])
    full = token_logps(forward_logits(model, batch), batch["input_ids"], batch["completion_mask"])
    for chunk in (None, 5):
        torch.testing.assert_close(completion_token_logps(model, batch, chunk), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk", [None, 4])
def test_training_step_loss_is_the_same_with_every_lever(micro_model, micro_pairs, lora, chunk):
    """Live reference, DPO with LD-DPO's shared-prefix weighting; with LoRA the reference is the adapter-free view."""
    if lora:
        pytest.importorskip("peft")
    loss = LossConfig("dpo", beta=0.5, ld_alpha=0.5)
    options = {}
    if lora:
        from prefopt.train.lora import LoraOptions

        options = {"lora": LoraOptions(r=4)}
    torch.manual_seed(0)
    plain = PreferenceModule(model=str(micro_model), loss=loss, **options)
    plain.configure_model()
    torch.manual_seed(0)
    fast = PreferenceModule(model=str(micro_model), loss=loss, scoring=ScoringOptions(share_prompt=True, logps_chunk_size=chunk),
                            **options)
    fast.configure_model()
    fast.policy.load_state_dict(plain.policy.state_dict())
    if lora:  # move the policy away from its reference, so that the reference view matters
        with torch.no_grad():
            for m in (plain, fast):
                for name, p in m.policy.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
    dm = _dm(micro_model, micro_pairs)
    examples = dm.train_examples[:4]
    expected = plain.training_step(dm.collate_pairs(examples), 0)["loss"]
    got = fast.training_step(dm.collate_shared_pairs(examples), 0)["loss"]
    assert abs(got.item() - expected.item()) < 1e-6


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(20, 180) for _ in range(n)]


def test_length_grouped_sampler_visits_every_example_once_and_cuts_padding():
    lengths = _lengths(203)
    sampler = LengthGroupedSampler(lengths, batch_size=8, group=16, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(203))
    assert order == list(sampler), "the order depends only on (seed, epoch)"
    sampler.set_epoch(1)
    assert list(sampler) != order
    plain = list(EpochSeededSampler(203, seed=3))
    assert padding_fraction(lengths, order, 8) < 0.5 * padding_fraction(lengths, plain, 8)
    # group 1 keeps the plain shuffle's batches (in another order).
    ones = list(LengthGroupedSampler(lengths, batch_size=8, group=1, seed=3))
    batches = lambda o: sorted(sorted(o[s : s + 8]) for s in range(0, 203, 8))  # noqa: E731
    assert batches(ones) == batches(plain)


def test_length_grouped_sampler_splits_over_ranks_and_resumes():
    lengths = _lengths(64)
    ranks = [LengthGroupedSampler(lengths, batch_size=4, group=4, seed=0, rank=r, world_size=2) for r in (0, 1)]
    parts = [list(s) for s in ranks]
    assert set(parts[0]).isdisjoint(parts[1]) and len(parts[0] + parts[1]) == 64
    # Step k's global batch (both ranks' k-th batch) is one length-sorted group of 8.
    single = LengthGroupedSampler(lengths, batch_size=8, group=4, seed=0).global_order()
    assert sorted(parts[0][:4] + parts[1][:4]) == sorted(single[:8])
    resumed = LengthGroupedSampler(lengths, batch_size=4, group=4, seed=0, rank=0, world_size=2)
    resumed.skip = 8
    assert list(resumed) == parts[0][8:]


def test_data_module_flags_build_shared_and_length_grouped_batches(micro_model, micro_pairs):
    dm = _dm(micro_model, micro_pairs, share_prompt=True, group_by_length=2)
    batches = list(dm.train_dataloader())
    assert all("pred_index" in b and b["input_ids"].shape[0] <= 4 for b in batches)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(dm.train_examples)
    assert "pred_index" not in next(iter(dm.val_dataloader())), "validation keeps the two-row layout"


def test_a_run_with_every_lever_matches_a_run_without(micro_base):
    """Same batches (no length grouping), so the same run: prompt sharing, chunked log-probs and the trimmed last
    layer change no number. (The allocator setting is process-wide: once on, it is on for both runs; it changes
    where memory comes from, never a value.)"""
    runs = []
    every_lever = ["--model.scoring.share_prompt=true", "--model.scoring.logps_chunk_size=3", "--model.scoring.check_finite_every_n_steps=2",
                   "--model.scoring.trim_last_layer=true", "--model.scoring.keep_freed_host_memory=true"]
    for args in ([], every_lever):
        cli = main(["fit", "--model.scoring.share_prompt=false", "--model.scoring.reference_cache=false", *args])
        runs.append(json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text()))
    for key, value in runs[0]["final"].items():
        assert runs[1]["final"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_step_metrics_are_computed_on_exactly_the_steps_lightning_logs(micro_base, tmp_path, monkeypatch):
    """Pair metrics are computed only on the steps Lightning writes, and every step it writes has all of them."""
    import pandas as pd

    import prefopt.train.module

    computed = []
    real = prefopt.train.module.pair_metrics
    monkeypatch.setattr(prefopt.train.module, "pair_metrics", lambda *a, **k: computed.append(1) or real(*a, **k))
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}
    cli = main(["fit", "--trainer.max_steps=7", "--trainer.log_every_n_steps=3", "--trainer.val_check_interval=null",
                "--trainer.limit_val_batches=0", f"--trainer.logger={json.dumps(logger)}"])
    rows = pd.read_csv(Path(cli.trainer.log_dir) / "metrics.csv")
    train = rows[rows["train/loss"].notna()]
    assert list(train["step"]) == [2, 5], "Lightning writes every 3rd step (steps numbered from 0)"
    for name in ("train/margin_nats", "train/accuracy", "train/chosen_logps"):
        assert train[name].notna().all(), name
    assert len(computed) == 2, "computed on the 2 written steps of 7, not on every step"


def test_finite_check_every_n_steps_names_the_step_range(micro_base, monkeypatch):
    poison_loss(monkeypatch, lambda call: call == 2)  # only step 1 is NaN
    with pytest.raises(FloatingPointError, match="within training steps 0-2"):
        main(["fit", "--model.scoring.check_finite_every_n_steps=3"])


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decoders_give_the_same_loss_and_gradients(micro_model, micro_pairs):
    """torch.compile (model.scoring.compile), with the trimmed last layer traced into it, changes no number beyond float
    rounding, on a prompt-shared batch.

    SimPO (reference-free) so that only the policy compiles (~20 s on 2 cores; the reference is the same decoder).
    """
    dm = _dm(micro_model, micro_pairs)
    batch = dm.collate_shared_pairs(dm.train_examples[:4])
    losses, grads = [], []
    for compile in (False, True):
        scoring = ScoringOptions(share_prompt=True, compile=compile, trim_last_layer=compile)  # against neither
        module = PreferenceModule(model=str(micro_model), loss=LossConfig("simpo"), scoring=scoring)
        module.configure_model()
        with torch.no_grad():  # move the policy off its reference so that the loss has a gradient to compare
            for p in module.policy.parameters():
                p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape))
        loss = module.training_step(batch, 0)["loss"]
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad for p in module.policy.parameters()])
    assert abs(losses[0] - losses[1]) < 1e-6
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


FAULT_PATTERN = """
import resource, sys, torch
from prefopt.fast.allocator import keep_freed_host_memory
torch.set_num_threads(1)  # one thread allocates and fills: the counts do not depend on the machine's threads
on = sys.argv[1] == "on" and keep_freed_host_memory()
counts = []
for _ in range(8):  # hold 8 + 16 + 24 MB of touched tensors, free them, again
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(2**21 * (k + 1)) for k in range(3)]
    del held
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(on, sum(counts[-3:]))  # the last three rounds: the heap has settled
"""


def test_kept_host_memory_is_reused_without_page_faults():
    """keep_freed_host_memory: memory freed in one round serves the later ones without being faulted in again.
    (With glibc's defaults the same rounds usually fault in all 48 MB, 12,000 pages, every time; its thresholds
    adapt, and in about one process of four they keep it too, so the default is not asserted.)"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FAULT_PATTERN, "on"], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    applied, kept = out.stdout.split()
    if applied != "True":
        pytest.skip("no glibc mallopt here")
    assert int(kept) < 100, f"{kept} page faults in the last rounds, with the freed memory kept"
