"""Malformed data files: each case ends in a located error (file, line, field) or a documented acceptance.

Every case is read twice: without ``skip_invalid`` the first bad row stops the read with a
:class:`DataError` naming it; with ``skip_invalid`` the bad row is skipped and counted under its
reason while every valid row is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dpokit.data import PrepareOptions, prepare_dataset
from dpokit.data.reader import read_preferences
from dpokit.errors import ConfigError, DataError
from dpokit.locations import looks_local, missing_local
from dpokit.losses import build_objective
from tests.helpers import tiny_tokenizer

GOOD = {"prompt": "the movie was", "chosen": " very good.", "rejected": " very bad."}
GOOD_LINE = json.dumps(GOOD).encode()
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "chosen": "a", "rejected": "b"}'


def _line(row: dict) -> bytes:
    return json.dumps(row).encode()


# (id, file name, bad line (the file is GOOD, bad, GOOD), read options, skip reason, message fragment)
ROW_CASES = [
    ("deep_nesting", "d.jsonl", DEEP, {}, "malformed_json", "d.jsonl:line 2: malformed JSON (nested too deeply"),
    (
        "lone_surrogate",
        "d.jsonl",
        b'{"prompt": "x\\ud800y", "chosen": "a", "rejected": "b"}',
        {},
        "not_utf8",
        "d.jsonl:line 2: field 'prompt': character 2 is a lone surrogate (\\ud800)",
    ),
    (
        "lone_surrogate_in_message",
        "d.jsonl",
        _line({"prompt": [{"role": "user", "content": "\udc00"}], "chosen": "a", "rejected": "b"}),
        {},
        "not_utf8",
        "d.jsonl:line 2: field 'prompt': character 1 is a lone surrogate",
    ),
    (
        "unknown_role",
        "d.jsonl",
        _line({"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"}),
        {},
        "bad_role",
        "d.jsonl:line 2: field 'prompt': message 0 has the unknown role 'wizard'; chat roles are system, developer, user",
    ),
    (
        "system_only_prompt",
        "d.jsonl",
        _line({"prompt": [{"role": "system", "content": "be nice"}], "chosen": "a", "rejected": "b"}),
        {},
        "bad_role",
        "d.jsonl:line 2: field 'prompt': the prompt has only system messages; it needs a user turn",
    ),
    (
        "system_only_implicit_prompt",
        "d.jsonl",
        _line(
            {
                "chosen": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
            }
        ),
        {},
        "bad_role",
        "d.jsonl:line 2: field 'prompt': the prompt has only system messages",
    ),
    (
        "non_numeric_score_string",
        "d.jsonl",
        _line({"prompt": "p", "responses": ["a", "b"], "scores": ["high", "low"]}),
        {},
        "wrong_type",
        "d.jsonl:line 2: field 'scores[0]': expected a number, got 'high'",
    ),
    (
        "mapped_column_missing",
        "d.jsonl",
        _line({"prompt": "q", "chosen": "a", "rejected": "b"}),
        {"columns": {"question": "prompt"}},
        "missing_field",
        "d.jsonl:line 2: field 'question' (used as 'prompt'): missing; the column 'question' that data.columns maps to "
        "'prompt' is not in the row; the row's columns: chosen, prompt, rejected",
    ),
    ("not_utf8", "d.jsonl", b'{"prompt": "caf\xe9"}', {}, "not_utf8", "d.jsonl:line 2: byte 16 of the line is not valid UTF-8"),
    ("truncated_json", "d.jsonl", b'{"prompt": "p", "chosen": "a", "rej', {}, "malformed_json", "d.jsonl:line 2: malformed JSON"),
    ("not_an_object", "d.jsonl", b"[1, 2]", {}, "malformed_row", "d.jsonl:line 2: expected an object"),
    (
        "identical",
        "d.jsonl",
        _line({"prompt": "p", "chosen": "same", "rejected": "same"}),
        {},
        "identical_responses",
        "d.jsonl:line 2: field 'rejected': chosen and rejected are identical",
    ),
    (
        "empty_response",
        "d.jsonl",
        _line({"prompt": "p", "chosen": "  ", "rejected": "b"}),
        {},
        "empty_response",
        "d.jsonl:line 2: field 'chosen': the response is empty",
    ),
    (
        "infinite_score",
        "d.jsonl",
        b'{"prompt": "p", "responses": ["a", "b"], "scores": [Infinity, 1]}',
        {},
        "wrong_type",
        "d.jsonl:line 2: field 'scores[0]': expected a finite number",
    ),
]


def _write(tmp_path: Path, name: str, bad: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(GOOD_LINE + b"\n" + bad + b"\n" + GOOD_LINE + b"\n")
    return path


@pytest.mark.parametrize(
    ("name", "bad", "options", "reason", "message"), [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES]
)
def test_a_bad_row_is_a_located_error_or_skipped_and_counted(tmp_path, name, bad, options, reason, message):
    path = _write(tmp_path, name, bad)
    if "columns" in options:  # the good rows must carry the mapped column
        good = json.dumps({"question": GOOD["prompt"], "chosen": GOOD["chosen"], "rejected": GOOD["rejected"]}).encode()
        path.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    with pytest.raises(DataError) as caught:
        read_preferences(path, **options)
    assert message in str(caught.value)
    assert "data.skip_invalid=true" in str(caught.value)
    examples, report = read_preferences(path, skip_invalid=True, **options)
    assert len(examples) == 2 and report.skipped == {reason: 1}  # no valid row is dropped
    assert message in report.skipped_messages[reason][0]


def test_numeric_score_strings_are_read_as_numbers_as_documented(tmp_path):
    path = _write(tmp_path, "d.jsonl", _line({"prompt": "p", "responses": ["a", "b", "c"], "scores": ["1", "3", "2.5"]}))
    examples, _ = read_preferences(path)
    assert examples[1].scores == [3.0, 2.5, 1.0] and examples[1].responses == ["b", "c", "a"]


# Whole-file problems: (id, file name, content, message fragment)
FILE_CASES = [
    (
        "pretty_printed_array_as_jsonl",
        "d.jsonl",
        json.dumps([GOOD, GOOD], indent=2).encode(),
        "d.jsonl:line 1: the file is a JSON array spread over several lines (pretty-printed JSON), not JSON Lines "
        "(one object per line); rename it to d.json",
    ),
    (
        "pretty_printed_object_as_jsonl",
        "d.jsonl",
        json.dumps(GOOD, indent=2).encode(),
        "d.jsonl:line 1: the file is one JSON object spread over several lines",
    ),
    ("deep_json_document", "d.json", b"[" * 100_000 + b"]" * 100_000, "d.json: malformed JSON (nested too deeply"),
    ("json_not_utf8", "d.json", b'[{"prompt": "caf\xe9"}]', "d.json:line 1: not valid UTF-8"),
    ("json_scalar", "d.json", b"42", "d.json: expected a JSON list of rows"),
    ("unsupported_suffix", "d.txt", b"hello", "d.txt: unsupported file type '.txt'"),
    ("only_blank_lines", "d.jsonl", b"\n\n", "no valid preference examples in"),
]


@pytest.mark.parametrize(("name", "content", "message"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_an_unreadable_file_is_a_located_error_even_with_skip_invalid(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    for skip in (False, True):
        with pytest.raises(DataError) as caught:
            read_preferences(path, skip_invalid=skip)
        assert message in str(caught.value)


# ---------------------------------------------------------------------------------------- local path or hub id

MISSING_SOURCES = ["nothere.jsonl", "./data", "~/nothere", "runs/x/checkpoint-3", "a\\b", "/abs/path"]


@pytest.mark.parametrize("source", MISSING_SOURCES)
def test_a_missing_local_path_says_no_such_file_at_once(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no such file or directory"):
        read_preferences(source)
    with pytest.raises(DataError, match="no such file or directory"):
        prepare_dataset(source, tiny_tokenizer(), use_cache=False)  # the fingerprint does not go to the hub either


def test_org_slash_name_is_local_when_org_is_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("data/train")
    (tmp_path / "data").mkdir()
    assert looks_local("data/train") and missing_local("data/train")
    assert not looks_local("org/name") and not looks_local("imdb")


def test_a_hub_name_offline_says_the_hub_is_not_reachable(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as caught:
        read_preferences("no-such-org-xyz/no-such-data")
    assert "no-such-org-xyz/no-such-data: no such file or directory, and the hub is not reachable (offline mode" in str(
        caught.value
    )


def test_a_missing_model_directory_is_no_such_file_not_a_repo_id_error(tmp_path):
    from dpokit.models import load_policy, load_tokenizer

    with pytest.raises(ConfigError, match="runs/x/checkpoint-3: no such file or directory"):
        load_policy("runs/x/checkpoint-3")
    with pytest.raises(ConfigError, match="no such file or directory") as caught:
        load_tokenizer(tmp_path / "nope" / "deeper")
    assert "Repo id" not in str(caught.value)


# ---------------------------------------------------------------------------------------- tokenization


def _rows_sharing_a_long_start(n: int, identical_after_cut: int) -> list[dict]:
    shared = " the" * 30
    rows = []
    for i in range(n):
        if i < identical_after_cut:  # differ only after the cut
            rows.append({"prompt": f"question {i}", "chosen": shared + " good.", "rejected": shared + " bad."})
        else:
            rows.append({"prompt": f"question {i}", "chosen": " good.", "rejected": " bad."})
    return rows


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pairs_identical_after_truncation_are_dropped_counted_and_reported(tmp_path):
    path = _write_rows(tmp_path / "d.jsonl", _rows_sharing_a_long_start(6, identical_after_cut=2))
    dataset = prepare_dataset(path, tiny_tokenizer(), PrepareOptions(max_length=16, max_prompt_length=8), use_cache=False)
    assert len(dataset) == 4
    assert dataset.report.tokenize.dropped == {"identical_after_truncation": 2}
    summary = dataset.report.summary()
    assert (
        "dropped 2: identical_after_truncation" in summary
        and "d.jsonl:line 1: the responses are the same tokens once cut to max_length=16" in summary
    )


def test_when_every_pair_is_identical_after_truncation_it_is_an_error(tmp_path):
    path = _write_rows(tmp_path / "d.jsonl", _rows_sharing_a_long_start(3, identical_after_cut=3))
    with pytest.raises(DataError, match="no examples left after tokenization") as caught:
        prepare_dataset(path, tiny_tokenizer(), PrepareOptions(max_length=16, max_prompt_length=8), use_cache=False)
    assert "dropped 3: identical_after_truncation" in str(caught.value)


def test_a_rejected_cache_entry_is_replaced(tmp_path):
    path = _write_rows(tmp_path / "d.jsonl", _rows_sharing_a_long_start(4, identical_after_cut=0))
    tokenizer = tiny_tokenizer()
    first = prepare_dataset(path, tokenizer, cache_dir=tmp_path / "cache")
    entry = first.cache_path
    assert entry is not None
    np.save(entry / "tokens.npy", np.array([object()], dtype=object), allow_pickle=True)  # unsafe: needs pickle
    rebuilt = prepare_dataset(path, tokenizer, cache_dir=tmp_path / "cache")
    assert not rebuilt.from_cache
    again = prepare_dataset(path, tokenizer, cache_dir=tmp_path / "cache")
    assert again.from_cache  # replaced, so later runs load it
    np.testing.assert_array_equal(again.columns.tokens, first.columns.tokens)
    (entry / "segment_offsets.npy").write_bytes(b"garbage")
    assert not prepare_dataset(path, tokenizer, cache_dir=tmp_path / "cache").from_cache
    np.save(entry / "example_segments.npy", np.array([0, 99], dtype=np.int64))  # loads, but does not fit
    assert not prepare_dataset(path, tokenizer, cache_dir=tmp_path / "cache").from_cache
    assert prepare_dataset(path, tokenizer, cache_dir=tmp_path / "cache").from_cache


# ---------------------------------------------------------------------------------------- loss terms

TERM_CASES = [
    ("negative_weight", [{"name": "sigmoid", "weight": -1.0}], "loss 'sigmoid': weight must be >= 0, got -1.0"),
    ("all_zero", [{"name": "sigmoid", "weight": 0}, {"name": "sft", "weight": 0.0}], "every loss term has weight 0"),
    ("string_weight", [{"name": "sigmoid", "weight": "1"}], "loss 'sigmoid': weight must be a finite number, got '1'"),
    ("nan_weight", [{"name": "sigmoid", "weight": float("nan")}], "weight must be a finite number, got nan"),
]


@pytest.mark.parametrize(("terms", "message"), [c[1:] for c in TERM_CASES], ids=[c[0] for c in TERM_CASES])
def test_loss_weights_that_would_train_wrongly_are_refused(terms, message):
    with pytest.raises(ConfigError) as caught:
        build_objective(terms, beta=0.1)
    assert message in str(caught.value)


def test_a_zero_weight_next_to_a_positive_one_is_accepted():
    objective = build_objective([{"name": "sigmoid"}, {"name": "sft", "weight": 0}], beta=0.1)
    assert [t.weight for t in objective.terms] == [1.0, 0.0]
