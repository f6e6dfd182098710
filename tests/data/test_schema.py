"""dpokit.data.schema on its own: the example's accessors, the row error's message, type names."""

from __future__ import annotations

import ast
import inspect

import pytest

from dpokit.data import formats, reader, tokenize
from dpokit.data.schema import SKIP_REASONS, InvalidRowError, PreferenceExample, type_name
from dpokit.errors import DataError

USER = {"role": "user", "content": "Hi"}
GOOD = {"role": "assistant", "content": "Hello!"}
BAD = {"role": "assistant", "content": "Go away."}


def test_a_pair_is_chosen_then_rejected():
    example = PreferenceExample("Q?", [" yes", " no"], source="d.jsonl:line 3")
    assert example.chosen == " yes"
    assert example.rejected == " no"
    assert example.num_responses == 2
    assert example.scores is None
    assert not example.is_conversational


def test_a_ranking_rejected_is_the_worst_response():
    example = PreferenceExample("Q?", ["best", "middle", "worst"], scores=[3.0, 2.0, 1.0])
    assert example.chosen == "best"
    assert example.rejected == "worst"
    assert example.num_responses == 3


def test_conversational_means_a_message_list_prompt():
    assert PreferenceExample([USER], [[GOOD], [BAD]]).is_conversational
    # Only the prompt decides (the reader unifies rows, so responses follow the prompt).
    assert not PreferenceExample("Hi", [[GOOD], [BAD]]).is_conversational


def test_defaults_and_to_dict():
    example = PreferenceExample([USER], [[GOOD], [BAD]])
    assert example.source == ""
    assert example.to_dict() == {"prompt": [USER], "responses": [[GOOD], [BAD]], "scores": None, "source": ""}
    scored = PreferenceExample("p", ["a", "b"], [1.5, -2.0], "f.csv:row 7")
    assert scored.to_dict() == {"prompt": "p", "responses": ["a", "b"], "scores": [1.5, -2.0], "source": "f.csv:row 7"}


def test_examples_compare_by_value():
    assert PreferenceExample("p", ["a", "b"]) == PreferenceExample("p", ["a", "b"])
    assert PreferenceExample("p", ["a", "b"]) != PreferenceExample("p", ["b", "a"])


def test_invalid_row_error_message_names_source_and_field():
    error = InvalidRowError("data.jsonl:line 4", "chosen", "empty_response", "the response is empty")
    assert str(error) == "data.jsonl:line 4: field 'chosen': the response is empty"
    assert (error.source, error.field, error.reason, error.problem) == (
        "data.jsonl:line 4",
        "chosen",
        "empty_response",
        "the response is empty",
    )
    assert isinstance(error, DataError)


def test_invalid_row_error_without_a_field_names_only_the_source():
    error = InvalidRowError("data.jsonl:line 9", None, "malformed_json", "malformed JSON")
    assert str(error) == "data.jsonl:line 9: malformed JSON"
    assert error.field is None


def test_invalid_row_error_names_the_canonical_field_a_column_was_used_as():
    error = InvalidRowError("d.csv:row 2", "answer_a", "wrong_type", "expected a string", alias="chosen")
    assert str(error) == "d.csv:row 2: field 'answer_a' (used as 'chosen'): expected a string"


@pytest.mark.parametrize("alias", [None, "chosen"])
def test_invalid_row_error_omits_an_alias_equal_to_the_field(alias):
    error = InvalidRowError("d.jsonl:line 1", "chosen", "wrong_type", "expected a string", alias=alias)
    assert str(error) == "d.jsonl:line 1: field 'chosen': expected a string"


def test_an_alias_without_a_field_is_ignored():
    error = InvalidRowError("d.jsonl:line 1", None, "malformed_row", "not an object", alias="chosen")
    assert str(error) == "d.jsonl:line 1: not an object"


def _raised_reasons(module) -> set[str]:
    """The reason literals passed to ``row.error(field, reason, ...)`` / ``InvalidRowError(source, field, reason, ...)``."""
    reasons = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        position = 1 if isinstance(func, ast.Attribute) and func.attr == "error" else None
        if isinstance(func, ast.Name) and func.id == "InvalidRowError":
            position = 2
        if position is not None and len(node.args) > position:
            argument = node.args[position]
            if isinstance(argument, ast.Name):  # _Row.error forwarding its parameter
                continue
            # A literal, or a conditional between literals ("empty_response" if ... else "empty_prompt").
            choices = [argument.body, argument.orelse] if isinstance(argument, ast.IfExp) else [argument]
            literals = [c.value for c in choices if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            assert len(literals) == len(choices), f"{module.__name__}:{node.lineno}: the reason is not a literal"
            reasons.update(literals)
    return reasons


def test_every_reason_the_readers_raise_is_a_skip_reason():
    # The reasons key the read report's skip counts, so each needs a description.
    raised = _raised_reasons(formats) | _raised_reasons(reader) | _raised_reasons(tokenize)
    assert {"wrong_type", "identical_responses", "tied_scores", "not_utf8", "chat_template_prefix"} <= raised
    assert raised <= set(SKIP_REASONS)
    assert all(isinstance(text, str) and text for text in SKIP_REASONS.values())


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (None, "null"),
        (True, "a boolean"),
        (False, "a boolean"),  # bool before int: a JSON true is not a number
        (0, "a number"),
        (2.5, "a number"),
        ("", "a string"),
        ([], "a list"),
        ({"a": 1}, "an object"),
        ((1, 2), "tuple"),
        (b"x", "bytes"),
    ],
)
def test_type_name(value, name):
    assert type_name(value) == name
