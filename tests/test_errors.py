"""What a user meets when something is wrong: short errors naming the file, line or row, and field, before any model
loads; and two tokenizer edge cases (a completion that already ends in eos; a tokenizer that appends eos to every
text). Rows are counted from 1 in messages, as lines are; `datasets` indexes (and the `row` column) count from 0.
"""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from micro_fixtures import micro_base, micro_model, micro_pairs, micro_tokenizer  # noqa: F401  (fixtures)
from tokenizers import processors

from prefopt.cli import main
from prefopt.train.data import PreferenceDataModule
from prefopt.train.formats import DataError
from prefopt.train.sources import load_rows

WORDS = ("fun", "nice", "great", "a", "it")
ROWS = [{"prompt": "film :", "chosen": f"good {w}", "rejected": f"bad {w}"} for w in WORDS]


def _lines(rows: list[dict]) -> list[str]:
    return [json.dumps(r) for r in rows]


def _write(path, rows: list[dict]):
    """A .jsonl file of these rows."""
    path.write_text("\n".join(_lines(rows)) + "\n")
    return path


def _dm(path, model, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(dataset=str(path), tokenizer=str(model), val_fraction=0.25, batch_size=2, **kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture(autouse=True)
def _fresh_log_handler(monkeypatch):
    """prefopt's log handler (added once by the CLI) writes to the stderr of the test that added it, closed since:
    start without it, so that the CLI adds one writing to this test's captured stderr."""
    monkeypatch.setattr(logging.getLogger("prefopt"), "handlers", [])


def _no_model_load(monkeypatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr("prefopt.train.module.load_causal_lm", no_model)


def _short_error(err: str) -> str:
    """The `error: ...` part of stderr, checked to be short and free of usage dumps and tracebacks."""
    assert "Traceback" not in err and "usage:" not in err, err
    lines = err.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert len(lines) - start < 5, err
    return "\n".join(lines[start:])


# ---------------------------------------------------------------------------------------------- 9a: JSON lines
def test_a_truncated_jsonl_line_is_named_by_its_line_number(tmp_path):
    lines = _lines(ROWS)
    lines[2] = lines[2][: len(lines[2]) // 2]  # the 3rd line cut in half (an interrupted download or copy)
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        load_rows(str(path))
    assert str(exc.value) == f"{path}: line 3: not valid JSON (Unterminated string starting at: column 32); " \
        "truncated or corrupt?"
    path.write_text("\n".join(lines[:2] + [lines[2][:20]]) + "\n")  # cut after a comma, at the end of the file
    with pytest.raises(DataError, match=rf"^{path}: line 3: not valid JSON \(.* at the end of the line\); truncated"):
        load_rows(str(path))


def test_a_garbage_jsonl_line_is_named_by_its_line_number(tmp_path):
    lines = _lines(ROWS)
    path = tmp_path / "garbage.jsonl"
    path.write_text("\n".join(lines[:3] + ["", "<html>oops</html>"] + lines[3:]) + "\n")  # blank line 4 is fine
    with pytest.raises(DataError, match=rf"^{path}: line 5: not valid JSON \(Expecting value: column 1\)"):
        load_rows(str(path))
    path.write_text("\n".join(lines[:1] + ['["a", "list"]'] + lines[1:]) + "\n")
    with pytest.raises(DataError, match=rf"^{path}: line 2: expected a JSON object .* per line, got list"):
        load_rows(str(path))


def test_a_json_file_with_a_syntax_error_is_named_by_its_line(tmp_path):
    path = tmp_path / "rows.json"
    text = json.dumps(ROWS, indent=1)  # one field per line: the 3rd row's chosen on line 14, its rejected on 15
    assert text.splitlines()[13].strip() == '"chosen": "good great",'
    path.write_text(text.replace('"good great",', '"good great"'))  # a missing comma: line 15 cannot go on
    with pytest.raises(DataError, match=rf"^{path}: line 15: not valid JSON \(Expecting ',' delimiter: column 3\)"):
        load_rows(str(path))
    jsonl_named_json = tmp_path / "lines.json"  # JSON Lines under a .json name: lines are named too
    jsonl_named_json.write_text("\n".join(_lines(ROWS[:2]) + ['{"prompt": "x", "cho']) + "\n")
    with pytest.raises(DataError, match=rf"^{jsonl_named_json}: line 3: not valid JSON"):
        load_rows(str(jsonl_named_json))


# ---------------------------------------------------------------------------------------------- 9c: numbers in text
NUMBER_ROW = {"prompt": "film :", "chosen": 5, "rejected": "bad"}


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_number_in_a_text_column_names_the_row_and_field(suffix, micro_model, tmp_path):
    rows = ROWS[:2] + [NUMBER_ROW] + ROWS[2:]  # the 3rd row
    path = tmp_path / f"num.{suffix}"
    path.write_text("\n".join(_lines(rows)) + "\n" if suffix == "jsonl" else json.dumps(rows))
    with pytest.raises(DataError) as exc:
        _dm(path, micro_model)
    assert str(exc.value) == f"{path}: row 3 (counting from 1), field 'chosen': expected a string, got int"
    # A list in a text column: the column's kind is what most rows hold, and the odd row is named.
    rows[2] = {**NUMBER_ROW, "chosen": [{"role": "assistant", "content": "hi"}]}
    path.write_text("\n".join(_lines(rows)) + "\n" if suffix == "jsonl" else json.dumps(rows))
    with pytest.raises(DataError, match=r"row 3 \(counting from 1\), field 'chosen': expected a string, got list"):
        _dm(path, micro_model)


def test_numbers_in_csv_and_parquet_columns(micro_model, tmp_path):
    """CSV holds text, so a number among texts is read as its digits; a whole column of numbers (or, in parquet, a
    typed column) is named with its field and first row; a missing value names its row."""
    rows = ROWS[:2] + [NUMBER_ROW] + ROWS[2:]
    path = tmp_path / "mixed.csv"
    path.write_text("prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n"
                                                        for r in rows))
    assert load_rows(str(path))[2]["chosen"] == "5"  # a text, as every CSV value
    numbers = [{"prompt": "film :", "chosen": i, "rejected": "bad"} for i in range(4)]
    for suffix in ("csv", "parquet"):
        path = tmp_path / f"numbers.{suffix}"
        getattr(datasets.Dataset.from_list(numbers), f"to_{suffix}")(str(path))
        with pytest.raises(DataError) as exc:
            _dm(path, micro_model)
        assert str(exc.value).startswith(f"{path}: column 'chosen' holds int64 from row 1 (counting from 1) on "
                                         "(field 'chosen'); expected strings")
    path = tmp_path / "typed.parquet"
    datasets.Dataset.from_list([{**r, "rejected": i} for i, r in enumerate(ROWS)]).to_parquet(str(path))
    with pytest.raises(DataError, match=rf"^{path}: row 1 \(counting from 1\), field 'rejected': expected a string"):
        _dm(path, micro_model)
    path = tmp_path / "missing.parquet"
    missing = [{**r, "chosen": None} if i == 1 else r for i, r in enumerate(ROWS)]
    datasets.Dataset.from_list(missing).to_parquet(str(path))
    with pytest.raises(DataError, match=r"row 2 \(counting from 1\), field 'chosen': expected a string, got a missing"):
        _dm(path, micro_model)


# ---------------------------------------------------------------------------------------------- 9b, 9d: config errors
def test_a_yaml_syntax_error_names_the_file_and_line(micro_base, tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  loss: {name: dpo\ndata:\n  batch_size: 4\n")  # an unclosed flow mapping
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(bad)])
    assert exc.value.code == 2
    err = _short_error(capsys.readouterr().err)
    assert err.startswith(f"error: {bad}: line 3, column 5: YAML syntax error:"), err
    assert "(while parsing a flow mapping at line 2)" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.bogus=1", "error: unrecognized arguments: --model.bogus=1"),
        ("--model.loss={name: dpoo}", "unknown loss 'dpoo'; valid names: "),
        ("--data.max_length=abc", 'error: Parser key "data.max_length":\n  Expected a <class \'int\'>. Got value: abc'),
        ("--config=missing.yaml", "File does not exist"),
    ],
)
def test_a_config_error_is_one_short_message_without_the_usage(override, message, micro_base, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["fit", override])
    assert exc.value.code == 2
    whole = capsys.readouterr().err
    err = _short_error(whole)
    assert err == whole.rstrip("\n"), "nothing before the error: the usage is not printed"
    assert message in err
    assert err.endswith("(`python -m prefopt fit --help` lists the options)")


def test_help_still_lists_the_options(micro_base, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--data.max_length" in out and "--model.loss" in out


# ---------------------------------------------------------------------------------------------- 9e: data errors in fit
def test_a_data_error_in_fit_is_one_short_message_naming_file_and_line(micro_base, tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    lines = _lines(ROWS)
    lines[2] = lines[2][:20]
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exc:
        main(["fit", f"--data.dataset={path}"])
    assert exc.value.code == 2
    err = _short_error(capsys.readouterr().err)
    assert err.startswith(f"error: {path}: line 3: not valid JSON"), err


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (lambda tmp: tmp / "nope.jsonl", "error: no such data file or directory: {tmp}/nope.jsonl"),
        (lambda tmp: _write(tmp / "cols.jsonl", [{"prompt": "film :", "chosen": "good"}] * 4),
         "error: {tmp}/cols.jsonl: missing column 'rejected' (field 'rejected', needed by format 'standard')"),
        (lambda tmp: _write(tmp / "row.jsonl", ROWS[:3] + [NUMBER_ROW]),
         "error: {tmp}/row.jsonl: row 4 (counting from 1), field 'chosen': expected a string, got int"),
    ],
)
def test_data_errors_in_fit_stop_before_the_model_loads(dataset, message, micro_base, tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["fit", f"--data.dataset={dataset(tmp_path)}"])
    assert exc.value.code == 2
    assert _short_error(capsys.readouterr().err).startswith(message.format(tmp=tmp_path))


def test_prefopt_traceback_shows_the_exception_and_other_errors_keep_theirs(micro_base, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    path = _write(tmp_path / "row.jsonl", ROWS[:3] + [NUMBER_ROW])
    monkeypatch.setenv("PREFOPT_TRACEBACK", "1")
    with pytest.raises(DataError, match=r"row 4 \(counting from 1\), field 'chosen'"):
        main(["fit", f"--data.dataset={path}"])
    monkeypatch.delenv("PREFOPT_TRACEBACK")

    def bug(*args, **kwargs):
        raise KeyError("a bug, not a data error")

    monkeypatch.setattr("prefopt.train.formats.detect_layout", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["fit", f"--data.dataset={path}"])


# ---------------------------------------------------------------------------------------------- 13: eos edge cases
# micro_tokenizer ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, good 4, great 5, fun 6, ..., bad 8, ..., film 16, ":" 18.
BOS, EOS, GOOD, FUN, BAD, FILM, COLON = 1, 2, 4, 6, 8, 16, 18


def _tokenizer_dir(tmp_path, appends_eos: bool):
    tok = micro_tokenizer()
    if appends_eos:  # like a Llama/Qwen tokenizer set up with add_eos_token: eos after every text it encodes
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)])
        assert tok("film :")["input_ids"] == [BOS, FILM, COLON, EOS]
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.mark.parametrize("appends_eos", [False, True])
def test_a_text_completion_that_ends_in_eos_gets_no_second_eos(appends_eos, tmp_path):
    rows = [{"prompt": "film :", "chosen": "good fun<eos>", "rejected": "bad"}] * 8
    dm = _dm(_write(tmp_path / "eos.jsonl", rows), _tokenizer_dir(tmp_path, appends_eos))
    e = dm.train_examples[0]
    assert e["prompt_ids"] == [BOS, FILM, COLON]
    assert e["chosen_ids"] == [GOOD, FUN, EOS]  # the text's own eos, not another
    assert e["rejected_ids"] == [BAD, EOS]
    assert dm.collate_pairs([e])["input_ids"].tolist() == [[BOS, FILM, COLON, GOOD, FUN, EOS],
                                                           [BOS, FILM, COLON, BAD, EOS, 0]]


def test_a_tokenizer_that_appends_eos_to_every_text_leaves_none_inside_the_prompt(tmp_path):
    rows = [{"prompt": "film :", "chosen": "good fun", "rejected": "bad"}] * 8
    dm = _dm(_write(tmp_path / "plain.jsonl", rows), _tokenizer_dir(tmp_path, appends_eos=True))
    e = dm.train_examples[0]
    assert e["prompt_ids"] == [BOS, FILM, COLON]  # not [..., EOS]: the completion follows
    assert e["chosen_ids"] == [GOOD, FUN, EOS] and e["rejected_ids"] == [BAD, EOS]  # exactly one eos each
    batch = dm.collate_pairs([e])
    assert batch["input_ids"][0].tolist() == [BOS, FILM, COLON, GOOD, FUN, EOS]
    assert batch["completion_mask"][0].tolist() == [0, 0, 0, 1, 1, 1]
