"""`dpokit demo`: a complete SFT -> DPO run that builds its own model, tokenizer and data."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpokit.cli import main
from dpokit.demo import DemoSettings, is_positive, make_preference_rows, run_demo, train_tokenizer
from dpokit.errors import ConfigError
from dpokit.tracking import read_metrics

# A smaller run than the default so the test takes seconds; same code path.
QUICK = dict(train_pairs=240, eval_pairs=16, sft_steps=120, dpo_steps=30, log_every=10, eval_every=10, sample_prompts=2, samples_per_prompt=2)


def test_preference_rows_pair_a_positive_chosen_with_a_negative_rejected():
    rows = make_preference_rows(50, seed=3)
    assert all(is_positive(row["chosen"]) and is_positive(row["rejected"]) is False for row in rows)
    assert make_preference_rows(50, seed=3) == rows  # seeded
    unlabelled = make_preference_rows(200, seed=4, sentiment_labels=False)
    share = sum(bool(is_positive(row["chosen"])) for row in unlabelled) / len(unlabelled)
    assert 0.35 < share < 0.65  # the SFT data prefers neither sentiment


def test_demo_tokenizer_round_trips_the_demo_text():
    text = "Q: How was the plot?\nA: the plot was very charming, and i loved the music."
    tokenizer = train_tokenizer([text] * 20 + [row["prompt"] + row["chosen"] for row in make_preference_rows(100, 0)])
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None and tokenizer.chat_template


@pytest.mark.slow
def test_demo_trains_and_leaves_metrics_tensorboard_events_and_plot(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", settings=DemoSettings(**QUICK))
    printed = capsys.readouterr().out
    run_dir = tmp_path / "demo" / "dpo"
    assert summary["run_dir"] == run_dir
    records = read_metrics(run_dir)
    evals = [record for record in records if record["split"] == "eval"]
    assert [record["step"] for record in evals] == [10, 20, 30]
    # DPO against the SFT reference learns the preference: held-out margins grow and pairs are ranked right.
    assert 0 < evals[0]["rewards/margins"] < evals[-1]["rewards/margins"]
    assert evals[-1]["rewards/accuracies"] >= 0.9
    assert evals[-1]["loss"] < evals[0]["loss"] < 0.6932
    assert (run_dir / "curves.png").stat().st_size > 10_000
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    assert len(accumulator.Scalars("eval/rewards/accuracies")) == 3
    for expected in ("reward acc", "samples for held-out prompts", "SFT:", "DPO:", str(run_dir)):
        assert expected in printed
    assert (tmp_path / "demo" / "sft" / "final" / "config.json").is_file()


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not made by `dpokit demo`"):
        run_demo(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert main(["demo", "--run-dir", str(tmp_path)]) == 2
