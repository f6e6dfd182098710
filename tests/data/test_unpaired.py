"""Unpaired preference data (KTO): rows of {prompt, completion, label | score}, paired data read as
unpaired, the desirable/undesirable balance and the KTO paper's weight suggestion, and the label's
way through tokenization, the cache and every batch layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpokit.data import PrepareOptions, make_collator, prepare_dataset, read_preferences
from dpokit.data.collate import mismatched_items
from dpokit.data.reader import balance_summary, suggest_kto_weights
from dpokit.errors import ConfigError, DataError
from tests.helpers import tiny_tokenizer


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"prompt": "How is the film?", "completion": " Wonderful, moving and funny.", "label": True},
    {"prompt": "How is the film?", "completion": " Dull and far too long.", "label": False},
    {
        "prompt": [{"role": "user", "content": "Rate it"}],
        "completion": [{"role": "assistant", "content": "Great"}],
        "label": False,
    },
]


def test_unpaired_rows_are_read_with_their_labels(tmp_path):
    examples, report = read_preferences(_write(tmp_path / "u.jsonl", ROWS), unpaired=True)
    assert [ex.responses for ex in examples][:2] == [[" Wonderful, moving and funny."], [" Dull and far too long."]]
    assert [ex.label for ex in examples] == [True, False, False]
    assert report.formats["unpaired"] == 3 and (report.desirable, report.undesirable) == (1, 2)
    assert "1 desirable" in report.summary() and "2 undesirable" in report.summary()
    assert examples[0].to_dict()["label"] is True


def test_scores_become_labels_with_a_threshold(tmp_path):
    path = _write(
        tmp_path / "s.jsonl", [{"prompt": "p", "completion": "a", "score": 0.9}, {"prompt": "p", "completion": "b", "score": 0.2}]
    )
    examples, _ = read_preferences(path, unpaired=True, score_threshold=0.5)
    assert [ex.label for ex in examples] == [True, False]
    with pytest.raises(ConfigError, match="score_threshold"):
        read_preferences(path, unpaired=True)


def test_csv_labels_are_true_false_strings(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label\nq,good answer,true\nq,bad answer,False\n", encoding="utf-8")
    examples, _ = read_preferences(path, unpaired=True)
    assert [ex.label for ex in examples] == [True, False]


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "p", "completion": "c", "label": "yes"}, "label", "wrong_type"),
        ({"prompt": "p", "completion": "c"}, "label", "missing_field"),
        ({"prompt": "p", "completion": "  ", "label": True}, "completion", "empty_response"),
        ({"prompt": "", "completion": "c", "label": True}, "prompt", "empty_prompt"),
        ({"prompt": "p", "completion": "c", "score": "high"}, "score", "wrong_type"),
    ],
)
def test_invalid_unpaired_rows_name_file_line_and_field_and_are_counted_when_skipped(tmp_path, row, field, reason):
    path = _write(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=rf"bad.jsonl:line 2: field '{field}'"):
        read_preferences(path, unpaired=True, score_threshold=0.0)
    examples, report = read_preferences(path, unpaired=True, score_threshold=0.0, skip_invalid=True)
    assert len(examples) == 1 and report.skipped == {reason: 1}


def test_paired_data_read_as_unpaired_splits_each_pair(tmp_path):
    pairs = [{"prompt": "p1", "chosen": "good", "rejected": "bad"}, {"prompt": "p2", "chosen": "fine", "rejected": "awful"}]
    examples, report = read_preferences(_write(tmp_path / "p.jsonl", pairs), unpaired=True)
    assert [(ex.prompt, ex.responses[0], ex.label) for ex in examples] == [
        ("p1", "good", True),
        ("p1", "bad", False),
        ("p2", "fine", True),
        ("p2", "awful", False),
    ]
    assert report.pairs_as_unpaired == 2 and (report.desirable, report.undesirable) == (2, 2)
    assert "balanced" in balance_summary(2, 2)


def test_a_paired_objective_refuses_unpaired_rows(tmp_path):
    with pytest.raises(DataError, match="unpaired loss"):
        read_preferences(_write(tmp_path / "u.jsonl", ROWS))


def test_kto_weight_suggestion_keeps_the_papers_ratio():
    """KTO paper: desirable_weight * n_D / (undesirable_weight * n_U) in [1, 4/3]."""
    assert suggest_kto_weights(100, 100) is None and suggest_kto_weights(120, 100) is None
    d, u, upper = suggest_kto_weights(10, 90)
    assert (d, u) == (9.0, 1.0) and upper == pytest.approx(12.0)
    assert d * 10 / (u * 90) == pytest.approx(1.0) and upper * 10 / 90 == pytest.approx(4 / 3)
    d, u, upper = suggest_kto_weights(90, 10)
    assert (d, u) == (1.0, 9.0) and 90 / (0.75 * u * 10) == pytest.approx(4 / 3)
    assert "desirable_weight between 9 and 12" in balance_summary(10, 90)
    assert "undesirable_weight between 6.75 and 9" in balance_summary(90, 10)
    assert "only one class" in balance_summary(5, 0)


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "packed"])
def test_labels_reach_every_layout_and_survive_the_cache(tmp_path, layout):
    tokenizer = tiny_tokenizer()
    path = _write(tmp_path / "u.jsonl", ROWS[:2] + [{"prompt": "Why?", "completion": " Because.", "label": True}])
    first = prepare_dataset(path, tokenizer, PrepareOptions(unpaired=True), cache_dir=tmp_path / "cache")
    again = prepare_dataset(path, tokenizer, PrepareOptions(unpaired=True), cache_dir=tmp_path / "cache")
    assert again.from_cache and again.desirable is not None and again.desirable.tolist() == [True, False, True]
    items = list(first.items)
    assert [item["desirable"] for item in items] == [True, False, True]
    options = {"pack_tokens": 256} if layout == "packed" else {}
    collate = make_collator(layout, tokenizer.pad_token_id or 0, **options)
    batch = collate(items)
    assert batch.num_responses == 1 and batch.desirable is not None and batch.desirable.tolist() == [True, False, True]
    partners = [items[-1], *items[:-1]]
    mismatched = collate(mismatched_items(items, partners))
    assert mismatched.desirable.tolist() == [True, False, True]  # labels of the prompts' examples; unused by KL
    assert mismatched.response_lengths[:, 0].tolist() == [int(batch.response_lengths[(b - 1) % 3, 0]) for b in range(3)]
    moved = batch
    moved.mismatched = mismatched
    assert moved.to("cpu").mismatched is not None
    # paired reading of the same file is refused; a paired file read as unpaired gets labels too
    assert (
        prepare_dataset(path, tokenizer, PrepareOptions(unpaired=True), use_cache=False).fingerprint
        != prepare_dataset(
            _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}]),
            tokenizer,
            PrepareOptions(unpaired=True),
            use_cache=False,
        ).fingerprint
    )
    assert isinstance(batch.desirable, torch.Tensor)
