"""The online loop trains on the token ids it sampled, not on its completions' text tokenized again."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpokit.online import run_online
from dpokit.online.records import RoundFiles
from dpokit.online.rounds import OnlineLoop
from tests.online.test_rounds import assets, make_config  # noqa: F401  (the module fixture is used below)


@pytest.fixture
def training_splits(monkeypatch) -> list:
    """Every Split the online loop hands the trainer, as it made it."""
    made: list = []
    original = OnlineLoop.training_split

    def recording(self, r, rows):
        split = original(self, r, rows)
        made.append((rows, split))
        return split

    monkeypatch.setattr(OnlineLoop, "training_split", recording)
    return made


@pytest.mark.parametrize("pairs", ["best_vs_worst", "ranking"])
def test_training_examples_hold_the_sampled_ids_where_retokenized_text_differs(assets, tmp_path: Path, training_splits, pairs):  # noqa: F811
    listwise = ["loss.terms=[{name: plackett_luce}]"] if pairs == "ranking" else []
    cfg = make_config(assets, tmp_path / "run", "online.rounds=1", "online.steps_per_round=1", f"online.pairs={pairs}", *listwise)
    result = run_online(cfg)
    completions = RoundFiles(result.run_dir, 0).read("completions")
    sampled = {(c["prompt_index"], c["sample_index"]): c["token_ids"] for c in completions}
    ((rows, split),) = training_splits
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    checked = differing = 0
    assert len(split.indices) == len(rows)  # nothing dropped: every row is one example, in row order
    for row, index in zip(rows, split.indices, strict=True):
        item = split.dataset[index]
        expected = [sampled[(row["prompt_index"], k)] for k in row["sample_indices"]]
        assert item["response_ids"] == expected
        for text, ids, cut in zip(row["responses"], expected, row["truncated"], strict=True):
            checked += 1
            retokenized = tokenizer(text, add_special_tokens=False)["input_ids"] + ([] if cut else [tokenizer.eos_token_id])
            differing += retokenized != ids
        # A sample cut off at max_new_tokens ends without a stop token; a finished one with it.
        for ids, cut in zip(expected, row["truncated"], strict=True):
            assert (ids[-1] == tokenizer.eos_token_id) != cut
    assert checked >= 4 and differing > 0, (checked, differing)
