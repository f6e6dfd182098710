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


def test_a_round_resumed_from_completions_without_token_ids_trains_on_their_text(assets, tmp_path: Path, training_splits, caplog):  # noqa: F811
    import json

    from transformers import AutoTokenizer

    cfg = make_config(assets, tmp_path / "run", "online.rounds=1", "online.steps_per_round=2", "checkpoint.every_steps=1")
    stopped = run_online(cfg, on_step=lambda step, _: step == 1)  # inside round 0
    assert stopped.interrupted
    sampled_split = training_splits[0][1]
    files = RoundFiles(stopped.run_dir, 0)
    rows = files.read("completions")
    sampled = {(c["prompt_index"], c["sample_index"]): c["token_ids"] for c in rows}
    # A completions file written before token ids were kept: the same rows without them.
    files.file("completions").write_text(
        "".join(json.dumps({k: v for k, v in c.items() if k != "token_ids"}) + "\n" for c in rows)
    )
    with caplog.at_level("WARNING"):
        run_online(cfg, resume="latest")
    assert "carry no token ids" in caplog.text
    pairs, split = training_splits[1]
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    for row, index in zip(pairs, split.indices, strict=True):
        expected = [
            tokenizer(text, add_special_tokens=False)["input_ids"] + ([] if cut else [tokenizer.eos_token_id])
            for text, cut in zip(row["responses"], row["truncated"], strict=True)
        ]
        assert split.dataset[index]["response_ids"] == expected
    # The interrupted round had trained on the sampled ids.
    first_rows = training_splits[0][0]
    assert [sampled_split.dataset[i]["response_ids"] for i in sampled_split.indices] == [
        [sampled[(row["prompt_index"], k)] for k in row["sample_indices"]] for row in first_rows
    ]
