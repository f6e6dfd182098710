"""Unlabelled prompts: read from the reader's sources with located errors; a round's selection is seeded."""

from __future__ import annotations

import json

import pytest

from dpokit.errors import DataError
from dpokit.online.prompts import read_prompt_rows, round_prompt_indices


def test_text_and_chat_prompts_are_read_with_their_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps({"prompt": [{"role": "user", "content": "yo"}]}) + "\n")
    rows = read_prompt_rows(str(path))
    assert [r.prompt for r in rows] == ["hi", [{"role": "user", "content": "yo"}]]
    assert rows[1].where.endswith("line 3")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"text": "hi"}, "line 2: missing field 'prompt'"),
        ({"prompt": 3}, "line 2: field 'prompt' must be"),
        ({"prompt": "  "}, "line 2: field 'prompt' is empty"),
        ({"prompt": [{"role": "user"}]}, r"line 2: field 'prompt\[0\]'"),
    ],
)
def test_a_bad_prompt_row_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        read_prompt_rows(str(path))


def test_rounds_walk_every_prompt_once_per_pass_and_are_seeded():
    first_pass = [i for r in range(3) for i in round_prompt_indices(9, 3, seed=0, round_index=r)]
    assert sorted(first_pass) == list(range(9))
    assert round_prompt_indices(9, 3, seed=0, round_index=4) == round_prompt_indices(9, 3, seed=0, round_index=4)
    assert [round_prompt_indices(9, 9, seed=s, round_index=0) for s in (0, 1)][0] != round_prompt_indices(
        9, 9, seed=1, round_index=0
    )
