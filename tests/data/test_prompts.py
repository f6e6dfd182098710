"""One prompt reader for every sampling command: .txt lines and every source the preference reader
reads, with the same located errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpokit.data.prompts import read_prompt_rows, read_prompts
from dpokit.errors import DataError

CHAT = [{"role": "user", "content": "yo"}]


def test_text_and_chat_prompts_are_read_with_their_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps({"prompt": CHAT}) + "\n")
    rows = read_prompt_rows(str(path))
    assert [r.prompt for r in rows] == ["hi", CHAT]
    assert rows[1].where.endswith("line 3")


def test_every_file_type_gives_the_same_prompts(tmp_path):
    """The demo's eval_prompts.txt (one per line) was refused by `dpokit online` ("unsupported file type
    '.txt'") while `winrate` read it; now txt, jsonl, json, csv, tsv, parquet and a saved dataset agree."""
    prompts = ["the movie was", "i liked the"]
    (tmp_path / "p.txt").write_text("the movie was\n\ni liked the\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": p} for p in prompts]))
    (tmp_path / "p.csv").write_text("prompt\n" + "".join(f"{p}\n" for p in prompts))
    (tmp_path / "p.tsv").write_text("prompt\tother\n" + "".join(f"{p}\tx\n" for p in prompts))
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "p.parquet")
    from datasets import Dataset

    Dataset.from_dict({"prompt": prompts}).save_to_disk(str(tmp_path / "saved"))
    for name in ("p.txt", "p.jsonl", "p.json", "p.csv", "p.tsv", "p.parquet", "saved"):
        assert read_prompts(tmp_path / name) == prompts, name


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"text": "hi"}, "line 2: missing field 'prompt'"),
        ({"prompt": 3}, "line 2: field 'prompt' must be"),
        ({"prompt": "  "}, "line 2: field 'prompt' is empty"),
        ({"prompt": [{"role": "user"}]}, r"line 2: field 'prompt\[0\]'"),
        ({"prompt": "bad \ud800"}, "line 2: field 'prompt' holds a lone surrogate"),
    ],
)
def test_a_bad_prompt_row_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        read_prompt_rows(str(path))


def test_text_file_errors_name_the_line_and_say_what_to_do(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nbroken \xff byte\n")
    with pytest.raises(DataError, match=r"p.txt:line 2: not valid UTF-8.*re-save it as UTF-8"):
        read_prompts(path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_an_unknown_file_type_or_a_missing_file_is_refused_with_the_choices(tmp_path):
    (tmp_path / "p.md").write_text("# prompts\n")
    with pytest.raises(DataError, match=r"unsupported file type '.md' for prompts; use .txt \(one per line\), .jsonl"):
        read_prompts(tmp_path / "p.md")
    with pytest.raises(DataError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")
