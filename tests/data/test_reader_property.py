"""Property: whatever rows or bytes the reader is fed, it yields valid examples or raises DataError --
never another exception type, and never an example that breaks the PreferenceExample invariants."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpokit.data import PreferenceExample, read_preferences
from dpokit.errors import DataError

FIELDS = ["prompt", "chosen", "rejected", "responses", "scores", "role", "content", "response", "score"]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "user", "assistant", "\n\nHuman: hi\n\nAssistant: yo", "\n\nAssistant:"]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]), "content": st.text(max_size=8)})
messages = st.lists(message, max_size=4)
plausible_rows = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(max_size=10), messages, json_values),
        "chosen": st.one_of(st.text(max_size=10), messages, json_values),
        "rejected": st.one_of(st.text(max_size=10), messages, json_values),
        "responses": st.lists(st.one_of(st.text(max_size=6), messages, json_values), max_size=4),
        "scores": st.lists(st.one_of(st.integers(-3, 3), st.floats(), st.text(max_size=3)), max_size=4),
    },
)
rows = st.one_of(plausible_rows, json_values)
modes = st.sampled_from(["listwise", "all_pairs", "best_vs_rest", "best_vs_worst"])


def check_outcome(call) -> None:
    try:
        examples, report = call()
    except DataError:
        return
    assert examples and report.examples == len(examples)
    for example in examples:
        assert isinstance(example, PreferenceExample)
        assert len(example.responses) >= 2
        assert isinstance(example.prompt, (str, list)) and example.source
        if example.scores is not None:
            assert example.scores == sorted(example.scores, reverse=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rows, min_size=1, max_size=5), st.booleans(), modes)
def test_random_rows_in_memory_give_examples_or_data_error(batch, skip_invalid, mode):
    check_outcome(lambda: read_preferences(batch, skip_invalid=skip_invalid, ranked_mode=mode))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(rows.map(lambda r: json.dumps(r).encode()), st.binary(max_size=30)), min_size=1, max_size=5),
    st.sampled_from([".jsonl", ".json", ".csv"]),
    st.booleans(),
)
def test_random_file_bytes_give_examples_or_data_error(lines, suffix, skip_invalid):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        header = b"prompt,chosen,rejected\n" if suffix == ".csv" else b""
        path.write_bytes(header + b"\n".join(lines))
        check_outcome(lambda: read_preferences(path, skip_invalid=skip_invalid))
