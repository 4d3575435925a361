"""Models: any causal LM by path, dtype and attention options, bad model paths, LoRA end to end, and export."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from micro_fixtures import micro_base, micro_model, micro_pairs, micro_tokenizer  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from prefopt.cli import main
from prefopt.fast.scorer import ScoringOptions
from prefopt.logps import forward_logits, token_logps
from prefopt.train.models import check_model_path, load_causal_lm, load_tokenizer
from prefopt.train.module import PreferenceModule

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason='LoRA needs peft (the "lora" extra)')


def _fit(*args: str):
    cli = main(["fit", *args])
    return cli, json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


def _logps(model, cli) -> torch.Tensor:
    """Per-token completion log-probs of `model` on 4 validation pairs of the run's data; shape (8, T-1)."""
    batch = cli.datamodule.collate_pairs(cli.datamodule.val_examples[:4])
    with torch.no_grad():
        return token_logps(forward_logits(model, batch), batch["input_ids"], batch["completion_mask"])


def _ckpt(cli) -> Path:
    return Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------------------------------------- any model
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_any_causal_lm_trains_from_a_save_pretrained_directory(arch, micro_base, tmp_path):
    tok = micro_tokenizer()
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id}
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **ids))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, **ids))
    model.save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)
    cli, metrics = _fit(f"--model.model={tmp_path / arch}", "--trainer.max_steps=2")
    assert type(cli.model.policy).__name__ == type(model).__name__
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_attention_implementations_agree(micro_model):
    eager = load_causal_lm(str(micro_model), attn_implementation="eager")
    sdpa = load_causal_lm(str(micro_model), attn_implementation="sdpa")
    ids = torch.tensor([[1, 4, 5, 6, 7, 2]])
    torch.testing.assert_close(eager(input_ids=ids).logits, sdpa(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_model_paths_say_what_is_wrong(micro_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory: ./no/such/model"):
        check_model_path("./no/such/model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_causal_lm(str(tmp_path / "empty"))
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_causal_lm(str(tmp_path / "empty" / "config.json"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="holds a LoRA adapter.*model.lora.adapter"):
        load_causal_lm(str(tmp_path / "adapter"))
    with pytest.raises(FileNotFoundError, match="has no weights"):  # the tokenizer loads first in a run
        main(["fit", f"--model.model={tmp_path / 'empty'}"])


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    tok = micro_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<eos>"


# ---------------------------------------------------------------------------------------------- dtype, memory
def test_bf16_on_cpu_trains_a_micro_model(micro_base):
    """Correctness only: CPU bf16 is emulated and about 100x slower than fp32."""
    cli, metrics = _fit("--model.dtype=bfloat16", "--trainer.max_steps=2")
    assert next(cli.model.policy.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["final"].values())
    cli, metrics = _fit("--trainer.precision=bf16-mixed", "--trainer.max_steps=2")  # fp32 weights, bf16 autocast
    assert next(cli.model.policy.parameters()).dtype == torch.float32
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_gradient_checkpointing_gives_the_same_gradients(micro_model, micro_pairs):
    from prefopt.train.data import PreferenceDataModule

    dm = PreferenceDataModule(dataset=str(micro_pairs), tokenizer=str(micro_model), batch_size=4)
    dm.setup("fit")
    batch = dm.collate_pairs(dm.train_examples[:4])
    grads = []
    for checkpointing in (False, True):
        scoring = ScoringOptions(gradient_checkpointing=checkpointing, reference_cache=False)
        module = PreferenceModule(model=str(micro_model), scoring=scoring)
        module.configure_model()
        assert any(getattr(m, "gradient_checkpointing", False) for m in module.policy.modules()) == checkpointing
        module.training_step(batch, 0)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.policy.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- LoRA, export
@needs_peft
def test_lora_trains_adapters_only_against_the_base_with_adapters_disabled(micro_base, micro_model, tmp_path):
    cli, _ = _fit("--model.lora={r: 4, alpha: 8}")
    module, base = cli.model, load_causal_lm(str(micro_model))
    policy, reference = module.policy, module.reference
    # No second copy: the reference is a view of the policy, its weights the policy's own tensors.
    assert reference.model is policy and len(module._reference) == 1
    assert {id(p) for p in reference.parameters()} <= {id(p) for p in policy.parameters()}
    assert not any(p.requires_grad for p in reference.parameters())
    # Only adapter weights trained: every base weight equals the loaded model's, and the adapters moved.
    base_state = base.state_dict()
    for name, p in policy.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        torch.testing.assert_close(p.detach(), base_state[key], rtol=0, atol=0)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in policy.named_parameters())
    # The reference is the base model; the policy is not.
    torch.testing.assert_close(_logps(reference, cli), _logps(base, cli))
    assert not torch.allclose(_logps(policy, cli), _logps(base, cli))
    # Checkpoints hold the adapter and the buffers only.
    keys = torch.load(_ckpt(cli), weights_only=False)["state_dict"]
    assert keys and all("lora_" in k or k.startswith("logratio") for k in keys)

    # Export merged: a plain model that transformers loads, with the policy's log-probs.
    main(["export", f"--ckpt={_ckpt(cli)}", f"--out={tmp_path / 'merged'}", "--merge-lora"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logps(merged, cli), _logps(policy, cli), atol=1e-5, rtol=1e-5)
    # Export the adapter alone: transformers (with peft) loads it onto its base.
    main(["export", f"--ckpt={_ckpt(cli)}", f"--out={tmp_path / 'adapter'}"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    adapted = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(_logps(adapted, cli), _logps(policy, cli), atol=1e-5, rtol=1e-5)

    # Continue from the trained adapter: it is the frozen reference; the policy's copy of it trains.
    cli2, _ = _fit(f"--model.lora={{adapter: {tmp_path / 'adapter'}}}")
    torch.testing.assert_close(_logps(cli2.model.reference, cli2), _logps(adapted, cli2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logps(cli2.model.policy, cli2), _logps(adapted, cli2))
    assert not any(p.requires_grad for p in cli2.model.reference.parameters())
    keys = torch.load(_ckpt(cli2), weights_only=False)["state_dict"]
    assert keys and all(".default." in k or k.startswith("logratio") for k in keys)


@needs_peft
def test_a_lora_run_resumes_from_its_adapter_only_checkpoint(micro_base, tmp_path):
    every2 = "--trainer.callbacks+={class_path: lightning.pytorch.callbacks.ModelCheckpoint, " \
             "init_args: {every_n_train_steps: 2, save_top_k: -1, dirpath: %s}}" % (tmp_path / "ckpts")
    _, full = _fit("--model.lora={r: 4}", every2)
    step2 = next((tmp_path / "ckpts").glob("*step=2.ckpt"))
    _, resumed = _fit("--model.lora={r: 4}", f"--ckpt_path={step2}")
    assert resumed["step"] == full["step"] == 4
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_full_fine_tuning_exports_a_model_transformers_loads(micro_base, tmp_path):
    cli, _ = _fit()
    out = main(["export", f"--ckpt={_ckpt(cli)}", f"--out={tmp_path / 'out'}"])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logps(reloaded, cli), _logps(cli.model.policy, cli), atol=1e-6, rtol=1e-6)
    assert load_tokenizer(str(out)).get_vocab() == cli.datamodule.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="--merge-lora given, but this run trained every weight"):
        main(["export", f"--ckpt={_ckpt(cli)}", f"--out={tmp_path / 'x'}", "--merge-lora"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.lora={r: 0}", "r.*does not conform"),
        ("--model.lora={dropout: 1.0}", "dropout.*does not conform"),
        ("--data.format=standrd", "implicit_prompt"),
    ],
)
def test_bad_lora_and_format_options_fail_at_parse_time(override, message, micro_base, capsys):
    import re

    with pytest.raises(SystemExit) as exc:
        main(["fit", override, "--print_config"])
    assert exc.value.code != 0 and re.search(message, capsys.readouterr().err, re.S)


def test_unknown_column_fields_fail_when_the_datamodule_is_made():
    from prefopt.train.data import PreferenceDataModule

    with pytest.raises(ValueError, match=r"unknown field\(s\) \['promt'\]"):
        PreferenceDataModule(columns={"promt": "question"})


def test_models_load_straight_onto_the_accelerator_where_the_strategy_keeps_whole_models(micro_model, monkeypatch):
    """One device or DDP on an accelerator: policy and reference are loaded onto it (the host never holds both
    fp32 copies); on the CPU, or under a sharding strategy, they are loaded on the host as before."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    import prefopt.train.module

    seen = []

    def fake_load(name, **kwargs):
        seen.append(kwargs["device"])
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(prefopt.train.module, "load_causal_lm", fake_load)
    cuda = torch.device("cuda", 0)
    cases = [(None, None), (SingleDeviceStrategy(device=torch.device("cpu")), None),
             (SingleDeviceStrategy(device=cuda), cuda), (FSDPStrategy(), None)]
    for strategy, expected in cases:
        module = PreferenceModule(model=str(micro_model), scoring=ScoringOptions(reference_cache=False))
        module._trainer = None if strategy is None else SimpleNamespace(strategy=strategy)
        seen.clear()
        module.configure_model()
        assert seen == [expected, expected], strategy  # policy and reference
