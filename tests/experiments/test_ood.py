"""Out-of-distribution generalisation: the shifted text domain, its prompts, and a smoke run of the experiment."""

from __future__ import annotations

import json

import pytest

from dpokit.errors import ConfigError
from dpokit.experiments import corpus
from dpokit.experiments.corpus import make_corpus, make_news_corpus
from dpokit.experiments.lm import load_or_pretrain
from dpokit.experiments.ood import MODES, run_ood_experiment
from dpokit.experiments.preferences import make_prompts
from dpokit.experiments.reward import vader_score

NEWS_SENTIMENT_WORDS = (
    corpus.POSITIVE_NEWS_ADJECTIVES
    + corpus.NEGATIVE_NEWS_ADJECTIVES
    + corpus.POSITIVE_NEWS_NOUNS
    + corpus.NEGATIVE_NEWS_NOUNS
    + corpus.POSITIVE_NEWS_VERBS
    + corpus.NEGATIVE_NEWS_VERBS
)


def test_news_corpus_is_deterministic_and_has_three_to_five_sentences():
    assert make_news_corpus(40, seed=3) == make_news_corpus(40, seed=3)
    assert make_news_corpus(40, seed=3) != make_news_corpus(40, seed=4)
    assert all(text.endswith(".") and 3 <= text.count(". ") + 1 <= 5 for text in make_news_corpus(200))


def test_news_lexicon_polarity_agrees_with_the_ground_truth_reward():
    for word in corpus.POSITIVE_NEWS_ADJECTIVES + corpus.POSITIVE_NEWS_NOUNS + corpus.POSITIVE_NEWS_VERBS:
        assert vader_score(word) > 0, word
    for word in corpus.NEGATIVE_NEWS_ADJECTIVES + corpus.NEGATIVE_NEWS_NOUNS + corpus.NEGATIVE_NEWS_VERBS:
        assert vader_score(word) < 0, word
    neutral = corpus.NEUTRAL_NEWS_ADJECTIVES + corpus.NEUTRAL_NEWS_NOUNS + corpus.NEUTRAL_NEWS_VERBS
    for phrase in neutral + corpus.NEWS_SUBJECTS + corpus.NEWS_TOPICS + corpus.NEWS_PLACES + corpus.DAYS:
        assert vader_score(phrase) == 0, phrase


def test_news_domain_shares_only_function_words_and_intensifiers_with_the_reviews():
    review_words = {w.strip(".,") for text in make_corpus(2000) for w in text.split()}
    news_words = {w.strip(".,") for text in make_news_corpus(2000) for w in text.split()}
    assert news_words & review_words <= {"the", "a", "was", *corpus.INTENSIFIERS}, news_words & review_words
    assert set(NEWS_SENTIMENT_WORDS) <= news_words  # every sentiment word of the grammar occurs
    scores = [vader_score(text) for text in make_news_corpus(500)]
    assert 0.25 < sum(s > 0.3 for s in scores) / 500 < 0.75 and 0.2 < sum(s < -0.3 for s in scores) / 500 < 0.7


@pytest.fixture(scope="module")
def smoke_tokenizer(tmp_path_factory):
    return load_or_pretrain(MODES["smoke"].sentiment.lm, tmp_path_factory.mktemp("cache"), log=None)[1]


def test_shifted_prompts_are_whole_word_prefixes_of_news_within_the_token_limit(smoke_tokenizer):
    prompts = make_prompts(smoke_tokenizer, 40, seed=5, domain="news", whole_words_within=12)
    reports = make_news_corpus(40, seed=5)
    assert all(report.startswith(p) and report[len(p)] == " " for report, p in zip(reports, prompts, strict=True))
    lengths = [len(smoke_tokenizer(p)["input_ids"]) for p in prompts]
    assert all(n <= 12 or len(p.split()) == 1 for n, p in zip(lengths, prompts, strict=True))
    assert len({len(p.split()) for p in prompts}) > 2  # the prefix length varies
    # A token prefix of the same domain often ends inside a word; the whole-word prefixes never do.
    cut = make_prompts(smoke_tokenizer, 40, seed=5, domain="news")
    assert any(not report[len(p) :].startswith(" ") for report, p in zip(reports, cut, strict=True))


def test_unknown_text_domain_is_refused_with_the_choices(smoke_tokenizer):
    with pytest.raises(ConfigError, match=r"unknown text domain 'poems'; choose from \['news', 'reviews'\]"):
        make_prompts(smoke_tokenizer, 3, seed=0, domain="poems")


@pytest.mark.slow
def test_ood_smoke_run_measures_dpo_and_rloo_on_both_distributions_and_reuses_them(tmp_path):
    result = run_ood_experiment("smoke", tmp_path / "out", tmp_path / "cache", log=None)
    assert result.reference["in-distribution"].kl_mean == result.reference["shifted"].kl_mean == 0.0
    assert [(p.method, p.beta) for p in result.policies] == [("dpo", 0.1), ("rl", 0.1)]
    shifted_prompts = (tmp_path / "out/data/shifted_prompts.txt").read_text().splitlines()
    assert shifted_prompts and not set(shifted_prompts) & set((tmp_path / "out/data/eval_prompts.txt").read_text().splitlines())
    for policy in result.policies:
        inside, shifted = policy.points["in-distribution"], policy.points["shifted"]
        assert [p.step for p in inside] == [p.step for p in shifted] and inside
        assert all(p.kl_mean != 0.0 for p in shifted)  # measured against the SFT model on the news prompts
        # Only the last checkpoint stays on disk: the policy the win rates sample.
        checkpoints = sorted((tmp_path / "out/runs" / policy.run).glob("checkpoint-*"))
        assert [c.name for c in checkpoints] == [f"checkpoint-{inside[-1].step}"]
    # Win rates vs the SFT model (both policies) and DPO vs RLOO, on both distributions, length-controlled too.
    keys = {(r["distribution"], r["model"], r["baseline"]) for r in result.winrates}
    assert keys == {
        (d, m, b)
        for d in ("in-distribution", "shifted")
        for m, b in (("DPO β=0.1", "SFT"), ("RLOO β=0.1", "SFT"), ("DPO β=0.1", "RLOO β=0.1"))
    }
    assert all(0 <= r["lc_win_rate"] <= 1 and r["n"] == 6 for r in result.winrates)
    data = json.loads((tmp_path / "out/results.json").read_text())
    assert data["machine"] and data["date"] and {row["label"] for row in data["finals"]} == {"DPO β=0.1", "RLOO β=0.1"}
    text = (tmp_path / "out/results.md").read_text()
    assert "| DPO β=0.1 | RLOO β=0.1 | 1 |" in text and "| SFT (reference) |" in text
    assert (tmp_path / "out/ood.png").stat().st_size > 10_000
    # A second run trains nothing: every policy's points come from the store, its checkpoint from disk.
    lines: list[str] = []
    again = run_ood_experiment("smoke", tmp_path / "out", tmp_path / "cache", log=lines.append)
    assert again.policies == result.policies and again.winrates == result.winrates
    assert "dpo-beta0.1: stored" in lines and "rloo-beta0.1: stored" in lines
    assert not [line for line in lines if "training" in line or "RLOOTrainer" in line], lines


def test_ood_doctests():
    import doctest

    from dpokit.experiments import ood

    result = doctest.testmod(ood)
    assert result.attempted > 0 and result.failed == 0


def test_ood_command_refuses_a_method_selection_before_running(tmp_path, capsys):
    from dpokit.commands.main import main

    assert main(["experiment", "ood", "--mode", "quick", "--out", str(tmp_path / "out"), "--methods", "dpo"]) != 0
    assert "--methods applies to the sentiment experiment" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_selection_picks_among_the_sentiment_runs_and_leaves_the_store_key_alone():
    import dataclasses

    full = MODES["full"]
    assert full.runs() == [("dpo-beta0.05", "dpo", 0.05), ("dpo-beta0.5", "dpo", 0.5), ("rloo-beta0.05", "rl", 0.05)]
    every = dataclasses.replace(full, dpo_betas=None, rl_betas=None)
    assert [run for run, _, _ in every.runs()] == [
        "dpo-beta0.05",
        "dpo-beta0.1",
        "dpo-beta0.5",
        "dpo-beta1",
        "rloo-beta0.05",
        "rloo-beta0.2",
    ]
    assert every.key() == full.key()
    assert dataclasses.replace(full, domain="reviews").key() != full.key()
    with pytest.raises(ConfigError, match=r"dpo_betas \[0.3\] must be among the sentiment experiment's dpo_betas"):
        dataclasses.replace(full, dpo_betas=(0.3,)).runs()
