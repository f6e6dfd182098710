"""Judge specs, the reward judges' Bradley-Terry math, the cache, the local-LM judge and templates."""

from __future__ import annotations

import json
import math

import pytest

from dpokit.errors import ConfigError
from dpokit.judges import CachedJudge, JudgmentCache, bradley_terry, load_judge, load_template, parse_judge_spec
from dpokit.judges.base import PairJudgment, text_of
from dpokit.judges.templates import BUILTIN_TEMPLATES, parse_rating, parse_verdict
from tests.helpers import tiny_llama, tiny_tokenizer
from tests.judges.fakes import Oracle

LENGTH = "reward:tests.judges.fakes:length_reward"


def test_specs_parse_with_options_and_yaml_mappings():
    spec = parse_judge_spec("reward:pkg.mod:fn,temperature=0.5")
    assert (spec.kind, spec.target, spec.options) == ("reward", "pkg.mod:fn", {"temperature": "0.5"})
    assert str(spec) == "reward:pkg.mod:fn,temperature=0.5"
    spec = parse_judge_spec({"spec": "openai:m@http://127.0.0.1:1/v1", "concurrency": 2, "reference_free": True})
    assert spec.target == "m@http://127.0.0.1:1/v1" and spec.options == {"concurrency": "2", "reference_free": "true"}
    assert spec.option("reference_free", False, bool) is True and spec.option("concurrency", 8, int) == 2
    for bad in ("nokind", "judge:x", "reward:", "reward:a:b,oops", {"kind": "reward"}):
        with pytest.raises(ConfigError):
            parse_judge_spec(bad)
    with pytest.raises(ConfigError, match="not a valid float"):
        parse_judge_spec("reward:a:b,temperature=hot").option("temperature", 1.0, float)
    with pytest.raises(ConfigError, match="unknown option"):
        load_judge(LENGTH + ",colour=red")


def test_bradley_terry_on_rewards_with_temperature_and_ties():
    assert bradley_terry(1.0, 0.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert bradley_terry(0.0, 1.0, temperature=0.5) == pytest.approx(1 / (1 + math.exp(2)))
    assert bradley_terry(-800.0, 0.0) == pytest.approx(0.0) and bradley_terry(800.0, 0.0) == 1.0
    assert bradley_terry(0.3, 0.3) == 0.5
    judge = load_judge(LENGTH + ",temperature=2")
    pairs = judge.judge_pairs(["p", "p", "p"], ["one two three", "x", "a b"], ["one", "x y z", "c d"])
    assert pairs[0].prob_a == pytest.approx(1 / (1 + math.exp(-1.0)))  # (3 - 1) / 2
    assert pairs[1].verdict == "B" and pairs[2].verdict == "tie" and pairs[2].prob_a == 0.5
    assert "A=3.0 B=1.0" in pairs[0].raw
    assert judge.score(["p"], ["a b"]) == [2.0]
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        load_judge(LENGTH + ",temperature=0")
    with pytest.raises(ConfigError, match="returned 1 scores"):
        load_judge("reward:tests.judges.fakes:wrong_count_reward").score(["a", "b"], ["x", "y"])
    with pytest.raises(ConfigError, match="takes no template"):
        load_judge(LENGTH, "dialogue")
    with pytest.raises(ConfigError, match="one response per prompt"):
        judge.judge_pairs(["p"], ["a", "b"], ["c"])
    with pytest.raises(ConfigError, match="reward:MODULE:FUNCTION"):
        load_judge("reward:justamodule")


def test_vader_reward_judge_prefers_the_positive_review():
    judge = load_judge("reward:dpokit.experiments.reward:vader_reward")
    [judgment] = judge.judge_pairs(["the movie was"], [" wonderful and funny."], [" awful and boring."])
    assert judgment.prob_a > 0.5
    chat = judge.judge_pairs([[{"role": "user", "content": "the movie was"}]], [" bad."], [" great."])
    assert chat[0].verdict == "B"
    assert text_of([{"role": "user", "content": "hi"}]) == "user: hi"


def test_the_cache_answers_reruns_without_asking_and_keys_on_order_and_texts(tmp_path):
    path = tmp_path / "judgments.jsonl"
    oracle = Oracle()
    cached = CachedJudge(oracle, JudgmentCache(path))
    first = cached.judge_pairs(["p", "p"], ["long answer", "b"], ["s", "longer b"])
    assert oracle.calls == 2 and (cached.hits, cached.misses) == (0, 2)
    again = CachedJudge(oracle, JudgmentCache(path))  # a fresh process reads the file
    assert again.judge_pairs(["p", "p"], ["long answer", "b"], ["s", "longer b"]) == first
    assert oracle.calls == 2 and again.hits == 2
    swapped = again.judge_pairs(["p"], ["s"], ["long answer"])  # the other order is another judgment
    assert oracle.calls == 3 and swapped[0].verdict == "B"
    assert again.score(["p", "p"], ["abc", "ab"]) == [3.0, 2.0] and oracle.calls == 5
    assert again.score(["p"], ["abc"]) == [3.0] and oracle.calls == 5
    with path.open("a") as handle:
        handle.write('{"key": "torn')  # an interrupted append
    reread = JudgmentCache(path)
    assert len(reread) == 5
    lines = [json.loads(line) for line in path.read_text().splitlines()[:5]]
    assert {line["kind"] for line in lines} == {"pair", "score"}
    unread = PairJudgment(float("nan"), "no verdict", parsed=False)
    assert PairJudgment.from_dict(unread.to_dict()).verdict is None


def test_a_different_template_or_judge_is_a_different_cache_entry(tmp_path):
    from dpokit.judges.cache import judgment_key

    base = judgment_key("judge", "template", "pair", "p", "a", "b")
    assert base != judgment_key("judge", "other template", "pair", "p", "a", "b")
    assert base != judgment_key("other judge", "template", "pair", "p", "a", "b")
    assert base != judgment_key("judge", "template", "pair", "p", "b", "a")
    assert base == judgment_key("judge", "template", "pair", "p", "a", "b")


def test_templates_verdict_parsing_is_strict(tmp_path):
    assert parse_verdict("Comparison: A is shorter.\nPreferred: A", "Preferred") == "A"
    assert parse_verdict('Comparison: x\n**More helpful:** "B"', "More helpful") == "B"
    assert parse_verdict("Preferred: A\nPreferred: B", "Preferred") == "B"  # the last verdict line counts
    for text in ("A is better", "Preferred: both", "Preferred: A or B", ""):
        assert parse_verdict(text, "Preferred") is None
    assert parse_rating("Rating: 7") == 7.0 and parse_rating("Rating: 11") is None and parse_rating("great") is None
    summarization = BUILTIN_TEMPLATES["summarization"]
    question = summarization.chat_prompt("POST", "SUM A", "SUM B")
    assert "precise and concise" in question and "Summary A:\nSUM A" in question and question.endswith('Preferred: <"A" or "B">')
    assert BUILTIN_TEMPLATES["dialogue"].label_prompt("q", "a", "b").endswith("More helpful:")
    custom = tmp_path / "terse.txt"
    custom.write_text("Q: {prompt}\n1: {a}\n2: {b}\nWhich is better?")
    assert load_template(str(custom)).render("x", "y", "z") == "Q: x\n1: y\n2: z\nWhich is better?"
    (tmp_path / "bad.txt").write_text("no placeholders")
    with pytest.raises(ConfigError, match="placeholders"):
        load_template(str(tmp_path / "bad.txt"))
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_template("nonexistent")


@pytest.fixture(scope="module")
def judge_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("judge")
    tiny_llama(seed=3).save_pretrained(directory)
    tiny_tokenizer(chat_template=None).save_pretrained(directory)
    return directory


def test_llm_judge_reads_the_next_token_probabilities_of_the_two_labels(judge_model_dir):
    import torch

    from dpokit.judges.llm import LLMJudge

    judge = load_judge(f"llm:{judge_model_dir},batch_size=2", "summarization")
    assert isinstance(judge, LLMJudge) and not judge.chat
    prompts, a, b = ["the movie", "a plot", "i liked"], ["was good", "is long", "it"], ["was bad", "is short", "nothing"]
    judgments = judge.judge_pairs(prompts, a, b)
    tokenizer = judge.tokenizer
    for prompt, x, y, judgment in zip(prompts, a, b, judgments, strict=True):
        ids = tokenizer(judge.template.label_prompt(prompt, x, y))["input_ids"]
        with torch.no_grad():
            logits = judge.model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        first_a, first_b = (
            tokenizer(" A", add_special_tokens=False)["input_ids"],
            tokenizer(" B", add_special_tokens=False)["input_ids"],
        )
        if len(first_a) == 1 and len(first_b) == 1:
            expected = 1 / (1 + math.exp(float(logits[first_b[0]] - logits[first_a[0]])))
            assert judgment.prob_a == pytest.approx(expected, abs=1e-5)
        assert 0 < judgment.prob_a < 1 and judgment.raw.startswith("logp A=")
    scores = judge.score(prompts, a)
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)
    other = judge.with_template(load_template("dialogue"))
    assert other.template_text != judge.template_text and other.model is judge.model
    assert judge.judge_pairs([], [], []) == []


def test_llm_judge_through_a_chat_template(tmp_path):
    directory = tmp_path / "chat-judge"
    tiny_llama(seed=4).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    judge = load_judge(f"llm:{directory}")
    assert judge.chat and judge.template.name == "dialogue"
    [judgment] = judge.judge_pairs([[{"role": "user", "content": "hi"}]], ["hello"], ["go away"])
    assert 0 < judgment.prob_a < 1


def test_implicit_judge_is_dpo_preference_model_and_reward_model_judge_scores(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from dpokit.analysis.score import ScoreJob, run_score, text_rows

    policy, reference = tmp_path / "policy", tmp_path / "reference"
    for directory, seed in ((policy, 0), (reference, 1)):
        tiny_llama(seed=seed).save_pretrained(directory)
        tiny_tokenizer().save_pretrained(directory)
    judge = load_judge(f"implicit:{policy},reference={reference},beta=0.25")
    [judgment] = judge.judge_pairs(["the movie"], ["was good"], ["was bad"])
    report = run_score(
        ScoreJob(model=str(policy), reference=str(reference), beta=0.25), text_rows("the movie", ["was good", "was bad"])
    )
    assert judgment.prob_a == pytest.approx(report.rows[0].preference_prob, abs=1e-5)  # dpokit score's P(first preferred)
    assert judgment.raw == f"reward A={report.rows[0].rewards[0]!r} B={report.rows[0].rewards[1]!r}"
    assert judge.judge_pairs(["p"], ["same"], ["same"])[0].prob_a == 0.5  # identical responses: a tie, no forward
    assert "beta=0.25" in judge.description
    with pytest.raises(ConfigError, match="--reference"):
        load_judge(f"implicit:{policy}")
    classifier = tmp_path / "classifier"
    tokenizer = tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    GPT2ForSequenceClassification(config).save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    rm = load_judge(f"reward_model:{classifier},temperature=0.5")
    scores = rm.score(["the movie", "the movie"], ["was good", "was bad"])
    [pair] = rm.judge_pairs(["the movie"], ["was good"], ["was bad"])
    assert pair.prob_a == pytest.approx(bradley_terry(scores[0], scores[1], 0.5), abs=1e-6)
    with pytest.raises(ConfigError, match="not a model directory"):
        load_judge(f"reward_model:{tmp_path / 'missing'}")


def test_implicit_judge_pointwise_score_is_dpokit_score_reward(tmp_path):
    from dpokit.analysis.score import ScoreJob, run_score, text_rows

    policy, reference = tmp_path / "policy", tmp_path / "reference"
    for directory, seed in ((policy, 0), (reference, 1)):
        tiny_llama(seed=seed).save_pretrained(directory)
        tiny_tokenizer().save_pretrained(directory)
    judge = load_judge(f"implicit:{policy},reference={reference},beta=0.25")
    report = run_score(
        ScoreJob(model=str(policy), reference=str(reference), beta=0.25), text_rows("the movie", ["was good", "was bad"])
    )
    assert judge.score(["the movie"], ["was good"])[0] == pytest.approx(report.rows[0].rewards[0], abs=1e-5)
