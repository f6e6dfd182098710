"""Reading preference rows: every source type, every accepted format, column mapping, ranked modes,
and every error naming its file, line/row and field."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpokit.data import PreferenceExample, read_preferences
from dpokit.errors import ConfigError, DataError

PAIR = {"prompt": "Tell me a story.", "chosen": " Once upon a time.", "rejected": " No."}
USER = {"role": "user", "content": "Hi, how are you?"}
GOOD = {"role": "assistant", "content": "Fine, thanks!"}
BAD = {"role": "assistant", "content": "Go away."}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------- sources


def test_reads_jsonl_rows_with_provenance(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, PAIR | {"chosen": " Yes."}])
    examples, report = read_preferences(path)
    assert [e.responses for e in examples] == [[" Once upon a time.", " No."], [" Yes.", " No."]]
    assert examples[1].source == f"{path}:line 2"
    assert report.rows == 2 and report.examples == 2 and report.formats == {"standard": 2}


def test_reads_json_list_and_json_with_split_key(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([PAIR]))
    (tmp_path / "split.json").write_text(json.dumps({"train": [PAIR, PAIR], "test": [PAIR]}))
    assert len(read_preferences(tmp_path / "list.json")[0]) == 1
    assert len(read_preferences(tmp_path / "split.json")[0]) == 2
    assert len(read_preferences(tmp_path / "split.json", split="test")[0]) == 1


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n")
    assert len(read_preferences(path)[0]) == 2


def test_reads_csv_including_quoted_multiline_cells_and_json_cells(tmp_path):
    path = tmp_path / "d.csv"
    conversation = json.dumps([USER, GOOD]).replace('"', '""')
    path.write_text(
        'prompt,chosen,rejected\n"Line one\nline two",yes,no\n'
        f'"{json.dumps([USER]).replace(chr(34), chr(34) * 2)}","{json.dumps([GOOD]).replace(chr(34), chr(34) * 2)}",'
        f'"{json.dumps([BAD]).replace(chr(34), chr(34) * 2)}"\n'
    )
    examples, report = read_preferences(path)
    assert examples[0].prompt == "Line one\nline two"
    assert examples[1].prompt == [USER] and examples[1].responses == [[GOOD], [BAD]]
    assert examples[1].source == f"{path}:line 4"
    assert conversation  # the JSON text in a cell is read as messages, not as a string


def test_reads_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([PAIR, PAIR]), path)
    examples, _ = read_preferences(path)
    assert len(examples) == 2 and examples[0].source == f"{path}:row 1"


def test_reads_save_to_disk_directory_and_picks_the_split(tmp_path):
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([PAIR] * 3), "test": datasets.Dataset.from_list([PAIR])}
    ).save_to_disk(tmp_path / "saved")
    assert len(read_preferences(tmp_path / "saved")[0]) == 3
    assert len(read_preferences(tmp_path / "saved", split="test")[0]) == 1
    with pytest.raises(DataError, match="no split 'dev'.*train"):
        read_preferences(tmp_path / "saved", split="dev")


def test_load_dataset_code_path_on_a_local_data_directory(tmp_path):
    """A directory that is not a save_to_disk dump goes through datasets.load_dataset (as a hub name would)."""
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [PAIR, PAIR])
    examples, report = read_preferences(folder)
    assert len(examples) == 2 and report.source == str(folder)


def test_unreachable_dataset_name_is_a_data_error(monkeypatch):
    # Offline mode makes the failure immediate instead of waiting on network timeouts.
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no such file or directory, and the hub is not reachable"):
        read_preferences("no-such-org-xyz/no-such-dataset-xyz")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_preferences(tmp_path / "absent.jsonl")


def test_in_memory_rows_and_datasets(tmp_path):
    assert len(read_preferences([PAIR, PAIR])[0]) == 2
    assert len(read_preferences(datasets.Dataset.from_list([PAIR]))[0]) == 1


# ---------------------------------------------------------------- formats


def test_conversational_with_explicit_prompt():
    [example], report = read_preferences([{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}])
    assert example.prompt == [USER] and example.responses == [[GOOD], [BAD]]
    assert report.formats == {"conversational": 1}


def test_conversational_full_dialogues_split_after_the_last_common_message():
    system = {"role": "system", "content": "Be nice."}
    reply = {"role": "assistant", "content": "Hello!"}
    follow_up = {"role": "user", "content": "And?"}
    row = {"chosen": [system, USER, reply, follow_up, GOOD], "rejected": [system, USER, reply, follow_up, BAD]}
    [example], _ = read_preferences([row])
    assert example.prompt == [system, USER, reply, follow_up]
    assert example.responses == [[GOOD], [BAD]]


def test_conversational_responses_that_repeat_the_prompt_lose_the_repeat():
    """UltraFeedback-binarized style: a string prompt next to full conversations."""
    row = {"prompt": USER["content"], "chosen": [USER, GOOD], "rejected": [USER, BAD]}
    [example], _ = read_preferences([row])
    assert example.prompt == [USER] and example.responses == [[GOOD], [BAD]]


def test_anthropic_hh_prompt_is_everything_up_to_the_last_assistant_marker():
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant:"
    row = {"chosen": dialogue + " Knock knock.", "rejected": dialogue + " No."}
    [example], report = read_preferences([row])
    assert example.prompt == dialogue
    assert example.responses == [" Knock knock.", " No."]
    assert report.formats == {"hh": 1}


def test_column_mapping_renames_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "se.jsonl", [{"question": "Q?", "response_j": " good", "response_k": " bad", "prompt": "ignored"}]
    )
    [example], _ = read_preferences(path, columns={"question": "prompt", "response_j": "chosen", "response_k": "rejected"})
    assert (example.prompt, example.responses) == ("Q?", [" good", " bad"])


def test_column_mapping_errors_name_the_users_column(tmp_path):
    path = write_jsonl(tmp_path / "se.jsonl", [{"question": "Q?", "response_j": 3, "response_k": " bad"}])
    with pytest.raises(DataError, match=r"se.jsonl:line 1: field 'response_j' \(used as 'chosen'\): expected a string"):
        read_preferences(path, columns={"question": "prompt", "response_j": "chosen", "response_k": "rejected"})


def test_bad_column_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown field 'answer'"):
        read_preferences([PAIR], columns={"x": "answer"})


# ---------------------------------------------------------------- rankings

RANKED = {"prompt": "Q?", "responses": ["mid", "best", "worst", "good"], "scores": [5, 9, 1, 7]}


def test_ranked_scores_order_responses_best_first_and_listwise_keeps_the_ranking():
    [example], report = read_preferences([RANKED])
    assert example.responses == ["best", "good", "mid", "worst"]
    assert example.scores == [9.0, 7.0, 5.0, 1.0]
    assert report.formats == {"ranked": 1}


def test_ranked_without_scores_is_taken_as_given_best_first():
    [example], _ = read_preferences([{"prompt": "Q?", "responses": ["a", "b", "c"]}])
    assert example.responses == ["a", "b", "c"] and example.scores is None


def test_ultrafeedback_style_completion_objects_with_scores():
    row = {
        "instruction": "Q?",
        "completions": [{"response": "ok", "overall_score": 6}, {"response": "great", "overall_score": 8.5}],
    }
    [example], _ = read_preferences([row], columns={"instruction": "prompt", "completions": "responses"})
    assert example.responses == ["great", "ok"] and example.scores == [8.5, 6.0]


@pytest.mark.parametrize(
    "mode, expected",
    [
        (
            "all_pairs",
            [("best", "good"), ("best", "mid"), ("best", "worst"), ("good", "mid"), ("good", "worst"), ("mid", "worst")],
        ),
        ("best_vs_rest", [("best", "good"), ("best", "mid"), ("best", "worst")]),
        ("best_vs_worst", [("best", "worst")]),
    ],
)
def test_ranked_pair_modes(mode, expected):
    examples, report = read_preferences([RANKED], ranked_mode=mode)
    assert [tuple(e.responses) for e in examples] == expected
    assert report.pairs_from_rankings == len(expected)
    assert all(e.scores[0] > e.scores[1] for e in examples)


def test_pairs_with_tied_scores_are_not_made_and_are_counted():
    row = {"prompt": "Q?", "responses": ["a", "b", "c"], "scores": [2, 2, 1]}
    examples, report = read_preferences([row], ranked_mode="all_pairs")
    assert [tuple(e.responses) for e in examples] == [("a", "c"), ("b", "c")]
    assert report.tied_pairs_skipped == 1
    assert "tie" in report.summary()


def test_unknown_ranked_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="best_vs_worst"):
        read_preferences([RANKED], ranked_mode="pairs")


# ---------------------------------------------------------------- errors name file, line and field


@pytest.mark.parametrize(
    "row, field, words",
    [
        ({"prompt": "Q", "chosen": "a"}, "rejected", "missing"),
        ({"prompt": "Q", "chosen": 7, "rejected": "b"}, "chosen", "expected a string"),
        ({"prompt": "Q", "chosen": "a", "rejected": "   "}, "rejected", "empty"),
        ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty"),
        ({"prompt": [USER], "chosen": [{"role": "assistant"}], "rejected": [BAD]}, "chosen", "no 'content'"),
        ({"chosen": [USER, GOOD], "rejected": [BAD]}, "chosen", "share no leading message"),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
            "rejected",
            "same dialogue",
        ),
        ({"chosen": "no markers", "rejected": "b"}, "prompt", "Assistant"),
        ({"prompt": "Q", "responses": ["a"]}, "responses", "at least 2"),
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [1, "x"]}, "scores[1]", "expected a number"),
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [3, 3]}, "scores", "no preference"),
        ({"prompt": "Q", "responses": ["a", "b", "a"]}, "responses[2]", "identical"),
    ],
)
def test_invalid_row_message_names_file_line_and_field(tmp_path, row, field, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIR, row])
    with pytest.raises(DataError) as info:
        read_preferences(path)
    message = str(info.value)
    assert f"bad.jsonl:line 2: field '{field}'" in message
    assert words in message
    assert "skip_invalid=True" in message


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + '{"prompt": "Q", "chosen": "a",' + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:line 2: malformed JSON \(column \d+"):
        read_preferences(path)


def test_non_utf8_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(PAIR).encode() + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:line 2: .*not valid UTF-8"):
        read_preferences(path)


def test_non_utf8_csv_row_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"prompt,chosen,rejected\nQ,a,b\nQ,caf\xe9,b\n")
    with pytest.raises(DataError, match=r"bad.csv:line 3: .*not valid UTF-8"):
        read_preferences(path)


def test_mistyped_row_in_parquet_names_the_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([PAIR, {"prompt": "Q", "chosen": None, "rejected": "b"}]), path)
    with pytest.raises(DataError, match=r"bad.parquet:row 2: field 'chosen': missing"):
        read_preferences(path)


def test_skip_invalid_skips_and_counts_each_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(PAIR),
        '{"prompt": broken',
        json.dumps({"prompt": "Q", "chosen": "x", "rejected": "x"}),
        json.dumps({"prompt": "Q", "chosen": "x", "rejected": "y"}),
        json.dumps({"prompt": "Q", "chosen": "x"}),
        "",
        json.dumps({"prompt": "Q", "chosen": "", "rejected": "y"}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff"}\n')
    examples, report = read_preferences(path, skip_invalid=True)
    assert len(examples) == 2
    assert report.rows == 7 and report.blank_lines == 2
    assert dict(report.skipped) == {
        "malformed_json": 1,
        "identical_responses": 1,
        "missing_field": 1,
        "empty_response": 1,
        "not_utf8": 1,
    }
    summary = report.summary()
    assert "skipped 5 invalid rows" in summary and "mixed.jsonl:line 2" in summary


def test_no_valid_rows_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "Q"}])
    with pytest.raises(DataError, match="(?s)no valid preference examples.*missing_field"):
        read_preferences(path, skip_invalid=True)


def test_examples_are_preference_examples():
    [example], _ = read_preferences([PAIR])
    assert isinstance(example, PreferenceExample) and example.chosen == PAIR["chosen"] and example.rejected == PAIR["rejected"]
