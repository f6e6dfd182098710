"""prepare_dataset: the on-disk cache hits on identical inputs and misses when the data, the tokenizer
or a setting changes; the report survives the cache."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from dpokit.data import PreferenceExample, PrepareOptions, prepare_dataset, prepare_from_examples
from dpokit.errors import ConfigError
from tests.helpers import LLAMA2_TEMPLATE, tiny_tokenizer

ROWS = [
    {"prompt": "tell me a story.", "chosen": " it was great", "rejected": " boring"},
    {
        "prompt": [{"role": "user", "content": "why"}],
        "chosen": [{"role": "assistant", "content": "because"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    },
    {"prompt": "rank these.", "responses": ["good", "bad", "ok"], "scores": [3, 1, 2]},
]


def write(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_second_prepare_is_a_cache_hit_with_identical_items_and_report(tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS + ["not an object"])
    tokenizer = tiny_tokenizer()
    cold = prepare_dataset(data, tokenizer, PrepareOptions(skip_invalid=True), cache_dir=tmp_path / "cache")
    warm = prepare_dataset(data, tokenizer, PrepareOptions(skip_invalid=True), cache_dir=tmp_path / "cache")
    assert not cold.from_cache and warm.from_cache
    assert warm.fingerprint == cold.fingerprint and warm.cache_path == cold.cache_path
    assert list(warm.items) == list(cold.items)
    assert warm.sources == cold.sources == [f"{data}:line {i}" for i in (1, 2, 3)]
    assert warm.report.summary() == cold.report.summary()
    assert warm.report.read.skipped == {"malformed_row": 1}
    assert warm.max_responses == 3 and list(warm.lengths) == list(cold.lengths)


def test_a_cache_hit_made_from_another_file_with_the_same_content_names_the_file_asked_for(tmp_path):
    """The cache is keyed by content, so a copy of a file reuses the entry; its report and the examples'
    locations must still name the copy, not the file the entry was first made from."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, copy = write(tmp_path / "a" / "d.jsonl", ROWS), write(tmp_path / "b" / "d.jsonl", ROWS)
    prepare_dataset(first, tiny_tokenizer(), cache_dir=tmp_path / "cache")
    warm = prepare_dataset(copy, tiny_tokenizer(), cache_dir=tmp_path / "cache")
    assert warm.from_cache
    assert warm.report.read.source == str(copy)
    assert warm.sources == [f"{copy}:line {i}" for i in (1, 2, 3)]
    assert str(first) not in warm.report.summary()


@pytest.mark.parametrize(
    "change",
    [
        "data content",
        "tokenizer vocabulary",
        "chat template",
        "max_length",
        "max_prompt_length",
        "truncation_mode",
        "ranked_mode",
        "columns",
    ],
)
def test_any_change_to_data_tokenizer_or_settings_misses_the_cache(tmp_path, change):
    data, cache = write(tmp_path / "d.jsonl", ROWS), tmp_path / "cache"
    base = PrepareOptions(max_length=64, max_prompt_length=32, truncation_mode="keep_end", ranked_mode="listwise")
    first = prepare_dataset(data, tiny_tokenizer(), base, cache_dir=cache)
    tokenizer, options = tiny_tokenizer(), base
    if change == "data content":
        write(data, ROWS[:2])
    elif change == "tokenizer vocabulary":
        tokenizer = tiny_tokenizer(vocab_size=320)
    elif change == "chat template":
        tokenizer = tiny_tokenizer(chat_template=LLAMA2_TEMPLATE)
    elif change == "columns":
        options = replace(base, columns={"scores": "scores"})
    else:
        value = {"max_length": 63, "max_prompt_length": 31, "truncation_mode": "keep_start", "ranked_mode": "all_pairs"}[change]
        options = replace(base, **{change: value})
    second = prepare_dataset(data, tokenizer, options, cache_dir=cache)
    assert not second.from_cache and second.fingerprint != first.fingerprint
    assert prepare_dataset(data, tokenizer, options, cache_dir=cache).from_cache


def test_use_cache_false_writes_nothing(tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS)
    dataset = prepare_dataset(data, tiny_tokenizer(), cache_dir=tmp_path / "cache", use_cache=False)
    assert dataset.cache_path is None and not (tmp_path / "cache").exists()


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS)
    first = prepare_dataset(data, tiny_tokenizer(), cache_dir=tmp_path / "cache")
    (first.cache_path / "tokens.npy").write_bytes(b"garbage")
    again = prepare_dataset(data, tiny_tokenizer(), cache_dir=tmp_path / "cache")
    assert not again.from_cache and list(again.items) == list(first.items)


def test_default_cache_dir_is_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write(tmp_path / "d.jsonl", ROWS)
    dataset = prepare_dataset(data, tiny_tokenizer())
    assert dataset.cache_path.parent.resolve() == (tmp_path / ".dpokit_cache").resolve()


def test_items_have_the_contract_keys_and_ids_are_positions(tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS)
    dataset = prepare_dataset(data, tiny_tokenizer(), cache_dir=tmp_path / "cache")
    assert len(dataset) == 3
    for i, item in enumerate(dataset.items):
        assert set(item) == {"example_id", "prompt_ids", "response_ids"} and item["example_id"] == i
        assert all(isinstance(t, int) for t in item["prompt_ids"])
    assert dataset[-1] == dataset.items[2] and len(dataset.items[1:]) == 2


def test_prepare_from_examples_matches_prepare_dataset(tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS[:1])
    from_file = prepare_dataset(data, tiny_tokenizer(), cache_dir=tmp_path / "cache")
    from_memory = prepare_from_examples([PreferenceExample("tell me a story.", [" it was great", " boring"])], tiny_tokenizer())
    assert list(from_memory.items) == list(from_file.items) and from_memory.cache_path is None


def test_bad_settings_are_config_errors(tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ConfigError, match="truncation_mode"):
        prepare_dataset(data, tiny_tokenizer(), PrepareOptions(truncation_mode="middle"), use_cache=False)
    with pytest.raises(ConfigError, match="max_prompt_length"):
        prepare_dataset(data, tiny_tokenizer(), PrepareOptions(max_length=16, max_prompt_length=16), use_cache=False)
