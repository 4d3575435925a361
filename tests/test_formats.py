"""Formats: detection, implicit prompts, chat templates, unpaired rows, the tokenization cache, and bad rows."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from chat_fixtures import (
    BROKEN_TEMPLATE,
    byte_tokenizer,
    hh_rows,
    message_rows,
    save_byte_model,
    unpaired_rows,
    write_hub_layout,
    write_jsonl,
)
from micro_fixtures import micro_base, micro_model, micro_pairs  # noqa: F401  (fixtures; micro_base needs micro_pairs)

from prefopt.train import encoding, formats
from prefopt.train.data import PreferenceDataModule
from prefopt.train.formats import RowError, detect_layout, split_messages, split_text

USER = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_byte_model(tmp_path_factory.mktemp("chat_model"))


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """The same byte model, saved without a chat template."""
    return save_byte_model(tmp_path_factory.mktemp("plain_model"), chat_template=None)


def _dm(dataset, model, **kwargs) -> PreferenceDataModule:
    kwargs = {"val_fraction": 0.25, "batch_size": 4, "max_length": 256, **kwargs}
    dm = PreferenceDataModule(dataset=str(dataset), tokenizer=str(model), **kwargs)
    dm.setup("fit")
    return dm


def _ids(text: str) -> list[int]:
    return byte_tokenizer()(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- unit rules
def test_text_prompt_is_cut_after_the_last_assistant_marker_of_the_shared_part():
    chosen = "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: A film?\n\nAssistant: A good one."
    rejected = "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: A film?\n\nAssistant: A bad one."
    prompt, c, r = split_text(chosen, rejected, "Assistant:", "src", 0)
    assert prompt == "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: A film?\n\nAssistant:"
    assert (c, r) == (" A good one.", " A bad one.")  # the shared " A " stays in the completions
    # Transcripts that part in an earlier assistant turn: the prompt ends at that turn's marker.
    prompt, c, _ = split_text("\n\nHuman: Hi.\n\nAssistant: Yes.\n\nHuman: Ok?\n\nAssistant: Ok.",
                              "\n\nHuman: Hi.\n\nAssistant: No.", "Assistant:", "src", 0)
    assert prompt == "\n\nHuman: Hi.\n\nAssistant:" and c.startswith(" Yes.")
    with pytest.raises(RowError, match=r"src: row 4 \(counting from 1\), fields 'chosen' and 'rejected': no 'Assistant:'"):
        split_text("Q: hi A: yes", "Q: hi A: no", "Assistant:", "src", 3)  # row index 3: the 4th row


def test_message_prompt_is_cut_at_a_message_boundary_before_an_assistant_turn():
    a1, a2, follow = ({"role": "assistant", "content": t} for t in ("yes", "no", "more"))
    prompt, c, r = split_messages([USER, a1], [USER, a2], "src", 0)
    assert (prompt, c, r) == ([USER], [a1], [a2])
    # Shared messages that end on an assistant turn followed by different user turns: back off to the last
    # boundary after which both continue with the assistant.
    u2, u3 = {"role": "user", "content": "x"}, {"role": "user", "content": "y"}
    prompt, c, r = split_messages([USER, a1, u2, follow], [USER, a1, u3, follow], "src", 0)
    assert prompt == [USER] and c == [a1, u2, follow]
    with pytest.raises(RowError, match=r"src: row 6 \(counting from 1\), fields 'good' and 'bad'"):
        split_messages([a1], [a2], "src", 5, ("good", "bad"))


@pytest.mark.parametrize(
    ("rows", "columns", "fmt", "expected"),
    [
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], {}, "auto", ("standard", False)),
        ([{"chosen": "a", "rejected": "b"}], {}, "auto", ("implicit_prompt", False)),
        (message_rows(1, "implicit"), {}, "auto", ("implicit_prompt", True)),
        (message_rows(1, "explicit"), {}, "auto", ("standard", True)),
        (message_rows(1, "h4"), {}, "auto", ("implicit_prompt", True)),  # a string prompt beside full lists
        (unpaired_rows(2), {}, "auto", ("unpaired", False)),
        (unpaired_rows(2, conversational=True), {}, "auto", ("unpaired", True)),
        ([{"q": "p", "good": "a", "bad": "b"}], {"prompt": "q", "chosen": "good", "rejected": "bad"}, "auto",
         ("standard", False)),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], {}, "implicit_prompt", ("implicit_prompt", False)),
    ],
)
def test_format_detection(rows, columns, fmt, expected):
    layout = detect_layout(datasets.Dataset.from_list(rows).features, columns, "src", fmt)
    assert (layout.structure, layout.conversational) == expected


def test_undetectable_columns_say_what_is_expected():
    with pytest.raises(ValueError, match="cannot tell the format.*data.columns"):
        detect_layout(datasets.Dataset.from_list([{"a": "x", "b": "y"}]).features, {}, "src")
    with pytest.raises(ValueError, match="missing column 'label'"):
        detect_layout(datasets.Dataset.from_list([{"prompt": "x", "completion": "y"}]).features, {}, "src")


# ---------------------------------------------------------------------------------------------- end to end
def test_hh_rlhf_transcripts_split_into_prompt_and_completion(chat_model, tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    dm = _dm(path, chat_model)
    tok = dm.tokenizer
    assert dm.layout.structure == "implicit_prompt" and not dm.layout.conversational
    for e in dm.train_examples + dm.val_examples:
        prompt = tok.decode(e["prompt_ids"])
        assert prompt.startswith("\n\nHuman:") and prompt.endswith("\n\nAssistant:")
        assert e["chosen_ids"][-1] == tok.eos_token_id and tok.decode(e["chosen_ids"][:-1]).startswith(" ")
    originals = {r["chosen"] for r in hh_rows()}
    assert {tok.decode(e["prompt_ids"] + e["chosen_ids"][:-1]) for e in dm.train_examples} <= originals


@pytest.mark.parametrize("style", ["implicit", "explicit", "h4"])
def test_message_lists_render_with_the_chat_template_and_an_exact_boundary(style, chat_model, tmp_path):
    """trl-lib/ultrafeedback_binarized layout (hub-style parquet folder with train/test splits), in three styles."""
    train, test = message_rows(20, style), message_rows(6, style)
    repo = write_hub_layout(tmp_path / "repo", train, test)
    dm = _dm(repo, chat_model, val_split="test")
    tok = dm.tokenizer
    assert dm.layout.conversational and len(dm.val_examples) == 6
    reference = message_rows(20, "implicit")
    for e, row in zip(dm.train_examples, reference):
        prompt_msgs = row["chosen"][:-1]
        prompt_text = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        assert e["prompt_ids"] == _ids(prompt_text)  # no special tokens added: the template writes them
        full = tok.apply_chat_template(row["chosen"], tokenize=False)
        assert e["prompt_ids"] + e["chosen_ids"] == _ids(full)  # <|end|> (eos) ends the turn: nothing appended
        assert e["chosen_ids"].count(tok.eos_token_id) == 1


def test_unpaired_rows_train_unpaired_losses_and_validate_as_regrouped_pairs(chat_model, tmp_path):
    for conversational in (False, True):
        path = write_jsonl(tmp_path / f"kto{conversational}.jsonl", unpaired_rows(40, conversational))
        dm = _dm(path, chat_model, unpaired=True, val_fraction=0.5)
        assert dm.layout.structure == "unpaired" and dm.layout.conversational == conversational
        assert dm.train_examples == [] and len(dm.unpaired_rows()) == len(dm.train_rows) > 0
        assert {r["desirable"] for r in dm.train_rows} == {True, False}
        # Whole prompts are held out, so every held-out prompt keeps its desirable and undesirable row.
        assert len(dm.val_examples) > 0 and 2 * len(dm.val_examples) + len(dm.train_rows) == 40
        assert not {tuple(e["prompt_ids"]) for e in dm.val_examples} & {tuple(r["prompt_ids"]) for r in dm.train_rows}
        batch = next(iter(dm.train_dataloader()))
        assert batch["input_ids"].shape[0] == 2 * batch["desirable"].shape[0]
    with pytest.raises(ValueError, match="unpaired rows .* this loss needs chosen/rejected pairs"):
        _dm(path, chat_model)


def test_forced_format_overrides_detection(chat_model, tmp_path):
    rows = [{"prompt": "ignored", **r} for r in hh_rows()]
    path = write_jsonl(tmp_path / "hh_with_prompt.jsonl", rows)
    assert _dm(path, chat_model).layout.structure == "standard"
    dm = _dm(path, chat_model, format="implicit_prompt")
    assert dm.layout.structure == "implicit_prompt"
    assert dm.tokenizer.decode(dm.train_examples[0]["prompt_ids"]).endswith("Assistant:")


def test_a_chat_template_can_be_given_in_the_config(plain_model, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", message_rows(12))
    with pytest.raises(ValueError, match="conversational .* has no chat template; set data.chat_template"):
        _dm(path, plain_model)
    template = tmp_path / "template.jinja"
    template.write_text(byte_tokenizer().chat_template)
    assert len(_dm(path, plain_model, chat_template=str(template)).train_examples) == 9


# ---------------------------------------------------------------------------------------------- cache
def test_tokenization_is_cached_across_runs(chat_model, tmp_path, monkeypatch):
    unique = f"\n\nHuman: {tmp_path}?\n\nAssistant:"
    rows = hh_rows(16) + [{"chosen": f"{unique} yes", "rejected": f"{unique} no"}]
    path = write_jsonl(tmp_path / "cached.jsonl", rows)  # unique content: the first run cannot hit a cache
    calls = []
    real = encoding._encode_batch
    monkeypatch.setattr(encoding, "_encode_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = _dm(path, chat_model, val_fraction=0.2)
    assert calls, "the first run tokenizes"
    calls.clear()
    second = _dm(path, chat_model, val_fraction=0.2)
    assert not calls, "the second run read the cached tokenization"
    assert second.train_examples == first.train_examples
    _dm(path, chat_model, val_fraction=0.2, assistant_marker="Human:")  # another encoding: tokenized again
    assert calls


def test_multiprocess_tokenization_gives_the_same_examples(chat_model, tmp_path):
    path = write_jsonl(tmp_path / "mp.jsonl", hh_rows(24))
    assert _dm(path, chat_model, num_proc=2).train_examples == _dm(path, chat_model).train_examples


# ---------------------------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (unpaired_rows(4)[:3] + [{"prompt": "p", "completion": "c", "label": 1}], {"unpaired": True},
         r"row 4 \(counting from 1\), field 'label': label must be a boolean"),
        ([{"prompt": "p", "completion": "c", "label": "true"}] * 4, {"unpaired": True},
         r"row 1 \(counting from 1\), field 'label'"),
        (hh_rows(4) + [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:"}], {},
         r"row 5 \(counting from 1\), field 'rejected': empty completion"),
        (message_rows(3) + [{"chosen": [USER, {"role": "assistant"}], "rejected": [USER]}], {},
         r"row 4 \(counting from 1\), field 'chosen': message 1 is not a"),
        (message_rows(3, "explicit") + [{"prompt": [USER], "chosen": [USER], "rejected": [USER]}], {},
         r"row 4 \(counting from 1\), field 'chosen': the completion must start with an assistant message"),
        (message_rows(3, "explicit") + [{"prompt": [USER], "chosen": [], "rejected": [USER]}], {},
         r"row 4 \(counting from 1\), field 'chosen': expected a non-empty list"),
        ([{"chosen": 1, "rejected": 2}], {}, "column 'chosen' holds"),
    ],
)
def test_bad_rows_are_errors_naming_source_row_and_field(rows, kwargs, message, chat_model, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as exc:
        _dm(path, chat_model, **kwargs)
    assert str(path) in str(exc.value)


def test_bad_rows_are_counted_and_can_be_skipped(chat_model, tmp_path):
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:"}
    path = write_jsonl(tmp_path / "some_bad.jsonl", hh_rows(16) + [bad] * 3)
    with pytest.raises(ValueError, match=r"row 17 \(counting from 1\), field 'rejected': empty completion \(2 more rows fail checks"):
        _dm(path, chat_model)
    dm = _dm(path, chat_model, bad_rows="skip")
    assert sum(c["bad_rows"] for c in dm.drop_counts.values()) == 3
    assert len(dm.train_examples) + len(dm.val_examples) == 16


def test_identical_pairs_are_skipped_and_counted(chat_model, tmp_path):
    rows = hh_rows(8) + [{"chosen": "\n\nHuman: a\n\nAssistant: b"} | {"rejected": "\n\nHuman: a\n\nAssistant: b"}] * 4
    dm = _dm(write_jsonl(tmp_path / "same.jsonl", rows), chat_model, val_fraction=0.5)
    assert sum(c["identical"] for c in dm.drop_counts.values()) == 4
    assert len(dm.train_examples) + len(dm.val_examples) == 8


def test_a_template_that_breaks_the_prefix_property_fails_naming_the_row(tmp_path):
    model = save_byte_model(tmp_path / "broken", chat_template=BROKEN_TEMPLATE)
    with pytest.raises(ValueError, match=r"row 1 \(counting from 1\), field 'chosen': the chat template's rendering of the prompt .* is not a prefix"):
        _dm(write_jsonl(tmp_path / "m.jsonl", message_rows(8)), model)


def test_standard_text_rows_keep_their_tokenization(micro_model, tmp_path):
    """The plain text path is unchanged: tokenizer(prompt) with its special tokens, completions + eos."""
    rows = [{"prompt": "film :", "chosen": "good fun", "rejected": "bad"}] * 8
    dm = _dm(write_jsonl(tmp_path / "s.jsonl", rows), micro_model)
    tok = dm.tokenizer
    e = dm.train_examples[0]
    assert e["prompt_ids"] == tok("film :")["input_ids"] and e["prompt_ids"][0] == tok.bos_token_id
    assert e["chosen_ids"] == tok("good fun", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert torch.equal(dm.collate_pairs([e])["completion_mask"][0], torch.tensor([0, 0, 0, 1, 1, 1]))


# ---------------------------------------------------------------------------------------------- runs
def test_runs_on_conversational_and_on_unpaired_data(micro_base, chat_model, tmp_path, capsys):
    """A DPO run on ultrafeedback-style message lists; a KTO run on unpaired rows; DPO on unpaired rows fails."""
    import json

    from prefopt.cli import main

    chat = write_jsonl(tmp_path / "chat.jsonl", message_rows(24))
    cli = main(["fit", f"--model.model={chat_model}", f"--data.dataset={chat}", "--data.max_length=128"])
    assert cli.trainer.global_step == 4 and cli.datamodule.layout.conversational
    unpaired = write_jsonl(tmp_path / "unpaired.jsonl", unpaired_rows(40))
    cli = main(["fit", f"--model.model={chat_model}", f"--data.dataset={unpaired}", "--data.max_length=64",
                "--model.loss={name: kto}"])
    assert cli.trainer.global_step == 4 and cli.datamodule.train_rows
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert "val/accuracy" in metrics["final"]  # validated on regrouped pairs
    with pytest.raises(SystemExit) as exc:  # a data error: one `error: ...` line, exit code 2 (tests/test_errors.py)
        main(["fit", f"--model.model={chat_model}", f"--data.dataset={unpaired}"])
    assert exc.value.code == 2 and f"error: {unpaired} holds unpaired rows" in capsys.readouterr().err
