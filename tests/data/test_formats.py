"""dpokit.data.formats on its own: one raw row in, one validated example (or a row error) out.

The reader tests go through files; these call the row parser directly, one rule at a time, with the
expected example or the exact field, reason and message written out by hand.
"""

from __future__ import annotations

import json

import pytest

from dpokit.data.formats import check_columns, parse_row
from dpokit.data.schema import InvalidRowError, PreferenceExample
from dpokit.errors import ConfigError

SRC = "d.jsonl:line 7"
USER = {"role": "user", "content": "Hi"}
SYSTEM = {"role": "system", "content": "Be brief."}
GOOD = {"role": "assistant", "content": "Hello!"}
BAD = {"role": "assistant", "content": "Go away."}
FOLLOW_UP = {"role": "user", "content": "And then?"}


def parse(raw, **kwargs):
    return parse_row(raw, SRC, **kwargs)


def row_error(raw, **kwargs) -> InvalidRowError:
    with pytest.raises(InvalidRowError) as info:
        parse(raw, **kwargs)
    return info.value


# ---------------------------------------------------------------- check_columns


def test_check_columns_inverts_the_mapping():
    assert check_columns(None) == {}
    assert check_columns({}) == {}
    assert check_columns({"question": "prompt", "good": "chosen", "bad": "rejected"}) == {
        "prompt": "question",
        "chosen": "good",
        "rejected": "bad",
    }


def test_check_columns_rejects_a_non_mapping():
    with pytest.raises(ConfigError, match=r"columns must be a mapping \{source column: field\}, got list"):
        check_columns(["prompt"])


def test_check_columns_rejects_an_unknown_field():
    with pytest.raises(ConfigError, match="columns maps 'q' to unknown field 'question'; valid fields: prompt, chosen, rejected"):
        check_columns({"q": "question"})


def test_check_columns_rejects_two_columns_for_one_field():
    with pytest.raises(ConfigError, match="columns maps both 'a' and 'b' to 'chosen'"):
        check_columns({"a": "chosen", "b": "chosen"})


# ---------------------------------------------------------------- detection and parse_row


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"prompt": "Q", "chosen": "a", "rejected": "b"}, "standard"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "conversational"),
        ({"prompt": [USER], "chosen": "a", "rejected": "b"}, "conversational"),  # a chat prompt makes it chat
        ({"prompt": "Hi", "chosen": [GOOD], "rejected": [BAD]}, "conversational"),
        ({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "conversational"),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}, "hh"),
        ({"prompt": "Q", "responses": ["a", "b"]}, "ranked"),
        ({"prompt": "Q", "responses": ["a", "b"], "chosen": "c"}, "ranked"),  # responses win
    ],
)
def test_format_detection(raw, expected):
    _, fmt = parse(raw)
    assert fmt == expected


def test_null_fields_count_as_absent():
    # "responses": null is not a ranking, so the row is read as a standard pair.
    example, fmt = parse({"prompt": "Q", "chosen": "a", "rejected": "b", "responses": None})
    assert fmt == "standard" and example.responses == ["a", "b"]


def test_a_row_that_is_not_an_object():
    error = row_error(["Q", "a", "b"])
    assert (error.field, error.reason) == (None, "malformed_row")
    assert str(error) == f"{SRC}: expected an object with prompt/chosen/rejected fields, got a list"


def test_a_row_with_no_known_fields_lists_what_it_has():
    error = row_error({"question": "Q", "answer": "a"})
    assert (error.field, error.reason) == ("chosen", "missing_field")
    assert "(found fields: answer, question)" in str(error)
    assert str(error).endswith("Map other column names with columns={...}")
    assert "(found fields: none)" in str(row_error({}))


def test_an_explicit_format_skips_detection():
    raw = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    error = row_error(raw, format="ranked")
    assert (error.field, error.reason) == ("responses", "missing_field")
    assert str(error) == f"{SRC}: field 'responses': missing"
    example, fmt = parse(raw, format="standard")
    assert fmt == "standard" and example == PreferenceExample("Q", ["a", "b"], None, SRC)
    # Forced to conversational, a promptless pair must be two message lists.
    error = row_error({"chosen": "Hello!", "rejected": [USER, BAD]}, format="conversational")
    assert (error.field, error.reason) == ("chosen", "wrong_type")
    assert error.problem == "expected a list of {role, content} messages, got a string"


# ---------------------------------------------------------------- standard


def test_standard_pair():
    example, _ = parse({"prompt": "Tell me.", "chosen": " Yes.", "rejected": " No.", "extra": 1})
    assert example == PreferenceExample("Tell me.", [" Yes.", " No."], None, SRC)


@pytest.mark.parametrize(
    ("raw", "field", "reason", "message"),
    [
        ({"prompt": "Q", "chosen": "a"}, "rejected", "missing_field", "missing"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "wrong_type", "expected a string, got a number"),
        ({"prompt": "Q", "chosen": True, "rejected": "b"}, "chosen", "wrong_type", "expected a string, got a boolean"),
        ({"prompt": "  \n", "chosen": "a", "rejected": "b"}, "prompt", "empty_prompt", "the prompt is empty"),
        ({"prompt": "Q", "chosen": " ", "rejected": "b"}, "chosen", "empty_response", "the response is empty"),
        ({"prompt": "Q", "chosen": "a", "rejected": ""}, "rejected", "empty_response", "the response is empty"),
        (
            {"prompt": "Q", "chosen": "same", "rejected": "same"},
            "rejected",
            "identical_responses",
            "chosen and rejected are identical; a pair needs two different responses",
        ),
    ],
)
def test_standard_errors(raw, field, reason, message):
    error = row_error(raw)
    assert (error.source, error.field, error.reason, error.problem) == (SRC, field, reason, message)


def test_responses_that_differ_only_in_whitespace_are_different():
    example, _ = parse({"prompt": "Q", "chosen": "a", "rejected": "a "})
    assert example.responses == ["a", "a "]


# ---------------------------------------------------------------- conversational


def test_conversational_with_explicit_prompt():
    example, _ = parse({"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]})
    assert example == PreferenceExample([SYSTEM, USER], [[GOOD], [BAD]], None, SRC)
    assert example.is_conversational


def test_conversational_drops_a_prompt_repeated_in_both_responses():
    example, _ = parse({"prompt": [USER], "chosen": [USER, GOOD], "rejected": [USER, BAD]})
    assert example.prompt == [USER] and example.responses == [[GOOD], [BAD]]


def test_conversational_a_prompt_repeated_in_only_one_response_is_an_error():
    error = row_error({"prompt": [USER], "chosen": [USER, GOOD], "rejected": [BAD]})
    assert (error.field, error.reason) == ("rejected", "prompt_mismatch")
    error = row_error({"prompt": [USER], "chosen": [GOOD], "rejected": [USER, BAD]})
    assert (error.field, error.reason) == ("chosen", "prompt_mismatch")


def test_conversational_a_response_equal_to_the_prompt_is_not_a_repeat():
    # chosen == prompt (not longer than it) is not stripped, so it is a response starting with a user turn.
    error = row_error({"prompt": [USER], "chosen": [USER], "rejected": [USER, BAD]})
    assert (error.field, error.reason) == ("chosen", "prompt_mismatch")


def test_forced_conversational_on_an_all_text_row_keeps_the_texts():
    # Only message lists can repeat the prompt's turns; strings are never cut at the prompt's text.
    example, fmt = parse({"prompt": "Hi", "chosen": "Hi there", "rejected": "Hi you"}, format="conversational")
    assert fmt == "conversational" and example == PreferenceExample("Hi", ["Hi there", "Hi you"], None, SRC)
    example, _ = parse({"prompt": "A", "chosen": "A lot", "rejected": "Nope"}, format="conversational")
    assert example.responses == ["A lot", "Nope"]


def test_string_prompt_with_chat_responses_becomes_one_user_message():
    example, _ = parse({"prompt": "Hi", "chosen": [GOOD], "rejected": [BAD]})
    assert example.prompt == [{"role": "user", "content": "Hi"}]
    assert example.responses == [[GOOD], [BAD]]


def test_chat_prompt_with_string_responses_become_assistant_messages():
    example, _ = parse({"prompt": [USER], "chosen": "Hello!", "rejected": "Go away."})
    assert example.prompt == [USER]
    assert example.responses == [[GOOD], [BAD]]


def test_conversational_messages_keep_only_role_and_content():
    tagged = GOOD | {"name": "bot", "weight": 1}
    example, _ = parse({"prompt": [USER], "chosen": [tagged], "rejected": [BAD]})
    assert example.chosen == [GOOD]


def test_conversational_without_prompt_splits_at_the_last_shared_message():
    example, _ = parse({"chosen": [USER, GOOD, FOLLOW_UP, GOOD], "rejected": [USER, GOOD, FOLLOW_UP, BAD, FOLLOW_UP, GOOD]})
    assert example.prompt == [USER, GOOD, FOLLOW_UP]
    assert example.responses == [[GOOD], [BAD, FOLLOW_UP, GOOD]]


@pytest.mark.parametrize(
    ("raw", "field", "reason", "message"),
    [
        (
            {"chosen": [USER, GOOD], "rejected": [USER, GOOD]},
            "rejected",
            "identical_responses",
            "chosen and rejected are identical; a pair needs two different responses",
        ),
        (
            {"chosen": [GOOD], "rejected": [BAD]},
            "chosen",
            "no_shared_prompt",
            "chosen and rejected share no leading message, so the prompt cannot be inferred; add a 'prompt' field",
        ),
        (
            {"chosen": [USER], "rejected": [USER, BAD]},
            "chosen",
            "empty_response",
            "the conversation has no messages after the shared prompt",
        ),
        (
            {"chosen": [USER, GOOD], "rejected": [USER]},
            "rejected",
            "empty_response",
            "the conversation has no messages after the shared prompt",
        ),
        (
            {"chosen": [USER, GOOD], "rejected": "Go away."},
            "rejected",
            "wrong_type",
            "expected a list of {role, content} messages, got a string",
        ),
        (
            {"chosen": [USER, GOOD], "rejected": 5},
            "rejected",
            "wrong_type",
            "expected a string or a list of {role, content} messages, got a number",
        ),
        (
            {"chosen": [USER, FOLLOW_UP], "rejected": [USER, BAD]},
            "chosen",
            "bad_role",
            "the response must start with an assistant message, got role 'user'",
        ),
    ],
)
def test_conversational_without_prompt_errors(raw, field, reason, message):
    error = row_error(raw)
    assert (error.field, error.reason, error.problem) == (field, reason, message)


def test_a_string_chosen_without_prompt_is_read_as_hh():
    # Only a message-list chosen says "conversational"; otherwise both must be HH dialogue strings.
    error = row_error({"chosen": "Hello!", "rejected": [USER, BAD]})
    assert (error.field, error.reason, error.problem) == ("rejected", "wrong_type", "expected a string, got a list")
    error = row_error({"chosen": "Hello!", "rejected": "Go away."})
    assert (error.field, error.reason) == ("prompt", "missing_field")


@pytest.mark.parametrize(
    ("messages", "reason", "message"),
    [
        ([], "empty_response", "the message list is empty"),
        (["Hello"], "wrong_type", "message 0 must be an object with 'role' and 'content', got a string"),
        ([{"role": "assistant"}], "missing_field", "message 0 has no 'content'"),
        ([{"content": "x"}], "missing_field", "message 0 has no 'role'"),
        ([GOOD, {"role": "", "content": "x"}], "wrong_type", "message 1: 'role' must be a non-empty string, got a string"),
        ([{"role": 1, "content": "x"}], "wrong_type", "message 0: 'role' must be a non-empty string, got a number"),
        (
            [{"role": "assistant", "content": ["x"]}],
            "wrong_type",
            """message 0 part 0 must be {"type": "text", "text": ...} or {"type": "image"}, got 'x'""",
        ),
        (
            [{"role": "assistant", "content": 3}],
            "wrong_type",
            "message 0: 'content' must be a string or a list of parts, got a number",
        ),
        ([{"role": "assistant", "content": " "}], "empty_response", "the response is empty"),
    ],
)
def test_message_list_validation(messages, reason, message):
    error = row_error({"prompt": [USER], "chosen": messages, "rejected": [BAD]})
    assert (error.field, error.reason, error.problem) == ("chosen", reason, message)


def test_an_empty_prompt_message_list_is_an_empty_prompt():
    error = row_error({"prompt": [], "chosen": [GOOD], "rejected": [BAD]})
    assert (error.field, error.reason, error.problem) == ("prompt", "empty_prompt", "the message list is empty")


def test_a_blank_string_prompt_with_chat_responses_is_empty():
    error = row_error({"prompt": " ", "chosen": [GOOD], "rejected": [BAD]})
    assert (error.field, error.reason) == ("prompt", "empty_prompt")


# ---------------------------------------------------------------- hh


def test_hh_prompt_is_chosen_up_to_its_last_assistant_turn():
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke."
    example, fmt = parse({"chosen": dialogue + "\n\nAssistant: A pun.", "rejected": dialogue + "\n\nAssistant: No."})
    assert fmt == "hh"
    assert example == PreferenceExample(dialogue + "\n\nAssistant:", [" A pun.", " No."], None, SRC)


@pytest.mark.parametrize(
    ("raw", "field", "reason", "message"),
    [
        (
            {"chosen": "Just text.", "rejected": "Other text."},
            "prompt",
            "missing_field",
            "missing, and 'chosen' has no '\\n\\nAssistant:' turn to infer it from (Anthropic HH format); add a 'prompt' field",
        ),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Hello!"},
            "rejected",
            "prompt_mismatch",
            "does not start with the same dialogue as 'chosen' (up to the last '\\n\\nAssistant:')",
        ),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: No."},
            "chosen",
            "empty_response",
            "the response is empty",
        ),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hi\n\nAssistant: A"},
            "rejected",
            "identical_responses",
            "chosen and rejected are identical; a pair needs two different responses",
        ),
        ({"rejected": "\n\nHuman: Hi\n\nAssistant: A"}, "chosen", "missing_field", "missing"),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": ["x"]},
            "rejected",
            "wrong_type",
            "expected a string, got a list",
        ),
    ],
)
def test_hh_errors(raw, field, reason, message):
    error = row_error(raw)
    assert (error.field, error.reason, error.problem) == (field, reason, message)


def test_hh_with_an_empty_first_turn_has_an_empty_prompt_text():
    # "\n\nAssistant:" alone is the prompt; it is whitespace plus a tag, so not empty.
    example, _ = parse({"chosen": "\n\nAssistant: A", "rejected": "\n\nAssistant: B"})
    assert example.prompt == "\n\nAssistant:" and example.responses == [" A", " B"]


# ---------------------------------------------------------------- ranked


def test_ranked_best_first_without_scores():
    example, fmt = parse({"prompt": "Q", "responses": ["best", "mid", "worst"]})
    assert fmt == "ranked"
    assert example == PreferenceExample("Q", ["best", "mid", "worst"], None, SRC)
    assert (example.chosen, example.rejected) == ("best", "worst")


def test_ranked_is_sorted_by_scores_highest_first_ties_in_input_order():
    example, _ = parse({"prompt": "Q", "responses": ["a", "b", "c", "d"], "scores": [1, 3, "2.5", 3]})
    # scores 1, 3, 2.5, 3 -> order b (3), d (3, after b), c (2.5), a (1)
    assert example.responses == ["b", "d", "c", "a"]
    assert example.scores == [3.0, 3.0, 2.5, 1.0]


def test_ranked_response_objects_carry_text_and_score():
    responses = [
        {"text": "ok", "rating": 2},
        {"response": "great", "score": 9.5, "model": "m1"},
        {"completion": "bad", "overall_score": -1},
    ]
    example, _ = parse({"prompt": "Q", "responses": responses})
    assert example.responses == ["great", "ok", "bad"]
    assert example.scores == [9.5, 2.0, -1.0]


def test_ranked_object_text_key_priority_and_no_score():
    # "response" is looked up before "text"; objects without a score keep the given order.
    example, _ = parse({"prompt": "Q", "responses": [{"text": "t", "response": "r"}, {"text": "u"}]})
    assert example.responses == ["r", "u"] and example.scores is None


def test_ranked_scores_field_wins_over_object_scores():
    responses = [{"text": "a", "score": 1}, {"text": "b", "score": 2}]
    example, _ = parse({"prompt": "Q", "responses": responses, "scores": [5, 4]})
    assert example.responses == ["a", "b"] and example.scores == [5.0, 4.0]


def test_ranked_chat_responses():
    example, _ = parse({"prompt": [USER], "responses": [[GOOD], "Go away.", [BAD, FOLLOW_UP]]})
    assert example.prompt == [USER]
    assert example.responses == [[GOOD], [BAD], [BAD, FOLLOW_UP]]


@pytest.mark.parametrize(
    ("raw", "field", "reason", "message"),
    [
        ({"prompt": "Q", "responses": "a"}, "responses", "wrong_type", "expected a list of responses, got a string"),
        ({"prompt": "Q", "responses": ["a"]}, "responses", "too_few_responses", "a ranking needs at least 2 responses, got 1"),
        ({"prompt": "Q", "responses": []}, "responses", "too_few_responses", "a ranking needs at least 2 responses, got 0"),
        ({"responses": ["a", "b"]}, "prompt", "missing_field", "missing"),
        ({"prompt": "", "responses": ["a", "b"]}, "prompt", "empty_prompt", "the prompt is empty"),
        (
            {"prompt": "Q", "responses": ["a", 2]},
            "responses[1]",
            "wrong_type",
            "expected a string or a list of {role, content} messages, got a number",
        ),
        (
            {"prompt": "Q", "responses": [{"answer": "a"}, "b"]},
            "responses[0]",
            "missing_field",
            "a response object needs one of the keys response, text, completion",
        ),
        (
            {"prompt": "Q", "responses": ["a", "b", "a"]},
            "responses[2]",
            "identical_responses",
            "identical to responses[0]; ranked responses must differ",
        ),
        ({"prompt": "Q", "responses": ["a", " "]}, "responses[1]", "empty_response", "the response is empty"),
        (
            {"prompt": "Q", "responses": ["a", "b"], "scores": "1,2"},
            "scores",
            "wrong_type",
            "expected a list of numbers, got a string",
        ),
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [1]}, "scores", "wrong_type", "has 1 scores for 2 responses"),
        (
            {"prompt": "Q", "responses": ["a", "b"], "scores": [1, True]},
            "scores[1]",
            "wrong_type",
            "expected a number, got a boolean",
        ),
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [1, None]}, "scores[1]", "wrong_type", "expected a number, got null"),
        (
            {"prompt": "Q", "responses": ["a", "b"], "scores": [1, "high"]},
            "scores[1]",
            "wrong_type",
            "expected a number, got 'high'",
        ),
        (
            {"prompt": "Q", "responses": ["a", "b"], "scores": [1, "1e999"]},
            "scores[1]",
            "wrong_type",
            "expected a finite number, got '1e999'",
        ),
        (
            {"prompt": "Q", "responses": ["a", "b"], "scores": [float("nan"), 1]},
            "scores[0]",
            "wrong_type",
            "expected a finite number, got nan",
        ),
        (
            {"prompt": "Q", "responses": ["a", "b", "c"], "scores": [2, 2, 2.0]},
            "scores",
            "tied_scores",
            "all 3 responses score 2, so there is no preference",
        ),
        (
            {"prompt": "Q", "responses": [{"text": "a", "score": 1}, {"text": "b"}]},
            "responses[1]",
            "missing_field",
            "has no score while other responses do",
        ),
        (
            {"prompt": "Q", "responses": [{"text": "a", "score": [1]}, {"text": "b", "score": 0}]},
            "responses[0].score",
            "wrong_type",
            "expected a number, got a list",
        ),
    ],
)
def test_ranked_errors(raw, field, reason, message):
    error = row_error(raw)
    assert (error.field, error.reason, error.problem) == (field, reason, message)


# ---------------------------------------------------------------- column mapping and error names


def test_columns_are_read_through_the_mapping():
    inverse = check_columns({"question": "prompt", "good": "chosen", "bad": "rejected"})
    example, fmt = parse({"question": "Q", "good": "a", "bad": "b", "prompt": "ignored"}, inverse_columns=inverse)
    assert fmt == "standard" and example.prompt == "Q" and example.responses == ["a", "b"]


def test_errors_name_the_users_column_and_the_field_it_is_used_as():
    inverse = check_columns({"question": "prompt", "good": "chosen", "bad": "rejected"})
    error = row_error({"question": "Q", "good": "a", "bad": 3}, inverse_columns=inverse)
    assert error.field == "bad"
    assert str(error) == f"{SRC}: field 'bad' (used as 'rejected'): expected a string, got a number"


def test_indexed_fields_map_through_their_base_column():
    inverse = check_columns({"q": "prompt", "answers": "responses"})
    error = row_error({"q": "Q", "answers": ["a", 7]}, inverse_columns=inverse)
    assert error.field == "answers[1]"
    assert str(error).startswith(f"{SRC}: field 'answers[1]' (used as 'responses[1]'): ")


# ---------------------------------------------------------------- text tables (CSV cells are strings)


def test_text_table_cells_holding_json_lists_are_parsed():
    raw = {"prompt": json.dumps([USER]), "chosen": json.dumps([GOOD]), "rejected": json.dumps([BAD])}
    example, fmt = parse(raw, text_table=True)
    assert fmt == "conversational" and example == PreferenceExample([USER], [[GOOD], [BAD]], None, SRC)
    # Without text_table the same cells are plain strings.
    example, fmt = parse(raw)
    assert fmt == "standard" and example.prompt == json.dumps([USER])


def test_text_table_responses_and_scores_cells():
    example, _ = parse({"prompt": "Q", "responses": '["a", "b"]', "scores": " [1, 2] "}, text_table=True)
    assert example.responses == ["b", "a"] and example.scores == [2.0, 1.0]


@pytest.mark.parametrize(
    "cell",
    [
        "[not json",  # starts like a list but does not parse
        '["just", "strings"]',  # a list, but not of message objects
        "[]",  # an empty list is not a conversation
        " plain text",
    ],
)
def test_text_table_cells_that_are_not_conversations_stay_text(cell):
    example, fmt = parse({"prompt": "Q", "chosen": cell, "rejected": "other"}, text_table=True)
    assert fmt == "standard" and example.chosen == cell


def test_text_table_list_fields_that_do_not_parse_stay_text():
    # A cell that starts like a JSON list but is not valid JSON is left as the string it was.
    error = row_error({"prompt": "Q", "responses": "[oops", "scores": None}, text_table=True)
    assert (error.field, error.reason) == ("responses", "wrong_type")
    error = row_error({"prompt": "Q", "responses": ["a", "b"], "scores": "[1, 2"}, text_table=True)
    assert (error.field, error.problem) == ("scores", "expected a list of numbers, got a string")
    # Cells that are not lists at all are never parsed, even when they are valid JSON.
    error = row_error({"prompt": "Q", "responses": '{"a": 1}'}, text_table=True)
    assert (error.field, error.problem) == ("responses", "expected a list of responses, got a string")


# ---------------------------------------------------------------- truncation flags


def test_pair_truncation_flags_are_read_and_absent_flags_mean_complete():
    base = {"prompt": "p", "chosen": "a", "rejected": "b"}
    example, _ = parse({**base, "rejected_truncated": True})
    assert example.truncated == [False, True] and example.is_truncated(1) and not example.is_truncated(0)
    assert parse(base)[0].truncated is None
    assert parse({**base, "chosen_truncated": False})[0].truncated is None  # no flag set: nothing to carry


def test_ranked_truncation_flags_follow_the_responses_when_scores_reorder_them():
    raw = {"prompt": "p", "responses": ["low", "high", "mid"], "scores": [1, 3, 2], "truncated": [False, True, False]}
    example, _ = parse(raw)
    assert example.responses == ["high", "mid", "low"] and example.truncated == [True, False, False]
    assert example.to_dict()["truncated"] == [True, False, False]


@pytest.mark.parametrize(
    "extra, field, message",
    [
        ({"truncated": "yes"}, "truncated", "expected a list of true/false, one per response, got a string"),
        ({"truncated": [True]}, "truncated", "has 1 flags for 2 responses"),
        ({"truncated": [True, 1]}, "truncated[1]", "expected true or false, got a number"),
    ],
)
def test_bad_ranked_truncation_flags_name_the_field(extra, field, message):
    error = row_error({"prompt": "p", "responses": ["a", "b"], **extra})
    assert error.field == field and error.reason == "wrong_type" and message in str(error)


def test_a_non_boolean_pair_truncation_flag_names_the_field():
    error = row_error({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_truncated": 3})
    assert error.field == "chosen_truncated" and "expected true or false, got a number" in str(error)
