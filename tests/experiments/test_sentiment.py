"""The sentiment experiment's pieces (corpus, prompts, labelled pairs, cached SFT model) and a smoke run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dpokit.experiments import corpus
from dpokit.experiments.corpus import make_corpus
from dpokit.experiments.lm import load_or_pretrain
from dpokit.experiments.preferences import make_preference_pairs, make_prompts
from dpokit.experiments.reward import vader_reward, vader_score
from dpokit.experiments.sentiment import MODES, run_experiment
from dpokit.training.tracking import read_metrics

SMOKE_LM = MODES["smoke"].lm


def test_corpus_is_deterministic_in_size_and_seed_and_varies_with_the_seed():
    assert make_corpus(50, seed=3) == make_corpus(50, seed=3)
    assert make_corpus(50, seed=3) != make_corpus(50, seed=4)
    assert all(text.endswith(".") and 2 <= text.count(".") <= 4 for text in make_corpus(200))


def test_lexicon_polarity_agrees_with_the_ground_truth_reward():
    """The grammar's positive words must score > 0 under VADER, negative < 0, neutral exactly 0."""
    for word in corpus.POSITIVE_ADJECTIVES + corpus.POSITIVE_VERBS:
        assert vader_score(word) > 0, word
    for word in corpus.NEGATIVE_ADJECTIVES + corpus.NEGATIVE_VERBS:
        assert vader_score(word) < 0, word
    for word in corpus.NEUTRAL_ADJECTIVES + corpus.NEUTRAL_VERBS + corpus.NOUNS:
        assert vader_score(word) == 0, word


def test_corpus_sentiment_is_varied():
    scores = [vader_score(text) for text in make_corpus(500)]
    positive = sum(s > 0.3 for s in scores) / len(scores)
    negative = sum(s < -0.3 for s in scores) / len(scores)
    assert 0.25 < positive < 0.75 and 0.2 < negative < 0.7


def test_vader_reward_scores_prompt_plus_completion_and_ignores_extra_arguments():
    rewards = vader_reward(prompts=["the movie was", "i hated"], completions=[" great.", " it."], trainer_state=None)
    assert rewards == [vader_score("the movie was great."), vader_score("i hated it.")]
    assert rewards[0] > 0 > rewards[1]


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    return load_or_pretrain(SMOKE_LM, tmp_path_factory.mktemp("cache"), log=None)


def test_sft_model_is_cached_by_settings(smoke_model, tmp_path_factory):
    model, tokenizer, model_dir = smoke_model
    again, _, again_dir = load_or_pretrain(SMOKE_LM, model_dir.parent, log=None)
    assert again_dir == model_dir
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    other = dataclasses.replace(SMOKE_LM, steps=SMOKE_LM.steps + 1)
    assert other.cache_key() != SMOKE_LM.cache_key()


def test_prompts_are_two_to_eight_token_prefixes_of_reviews(smoke_model):
    _, tokenizer, _ = smoke_model
    prompts = make_prompts(tokenizer, 40, seed=5)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert min(lengths) >= 2 and max(lengths) <= 8
    assert len(set(lengths)) > 3  # the prefix length varies
    assert all(review.startswith(p) for review, p in zip(make_corpus(40, seed=5), prompts, strict=True))


def test_pairs_prefer_the_higher_reward_and_noisy_labels_sometimes_flip(smoke_model):
    model, tokenizer, _ = smoke_model
    prompts = make_prompts(tokenizer, 10, seed=6)
    kwargs = dict(completions_per_prompt=4, max_new_tokens=10, require_eos=False, seed=0)
    rows, stats = make_preference_pairs(model, tokenizer, prompts, vader_reward, **kwargs)
    assert rows and stats["pairs"] == len(rows) and stats["label_accuracy"] == 1.0
    for row in rows:
        assert row["chosen_reward"] > row["rejected_reward"]
        assert vader_reward([row["prompt"]], [row["chosen"]])[0] == row["chosen_reward"]
    noisy, noisy_stats = make_preference_pairs(model, tokenizer, prompts, vader_reward, label_temperature=10.0, **kwargs)
    assert len(noisy) == len(rows) and noisy_stats["label_accuracy"] < 1.0


def test_requiring_eos_drops_completions_cut_at_the_length_limit(smoke_model):
    model, tokenizer, _ = smoke_model
    prompts = make_prompts(tokenizer, 6, seed=6)
    rows, stats = make_preference_pairs(
        model, tokenizer, prompts, vader_reward, completions_per_prompt=3, max_new_tokens=1, require_eos=True, seed=0
    )
    # One new token can only end the text if it is EOS, which leaves an empty completion: no pairs.
    assert rows == [] and stats["unterminated_dropped"] + stats["ties_skipped"] > 0


@pytest.mark.slow
def test_smoke_run_of_the_whole_pipeline_writes_the_frontier(tmp_path):
    """Every method at toy size, RL through TRL included; checks outputs, not quality."""
    settings = dataclasses.replace(MODES["smoke"], warmup_steps=0)
    result = run_experiment(settings, tmp_path / "out", tmp_path / "cache", log=None)
    methods = {p.method for p in result.points}
    assert methods == {
        "SFT (reference)",
        "DPO",
        "Preferred-FT",
        "Unlikelihood",
        "ORPO (no reference)",
        "SimPO (no reference)",
        "KTO (unpaired, half the pairs)",
        "Best-of-N",
        "RLOO (TRL, true reward)",
    }
    dpo = [p for p in result.points if p.method == "DPO"]
    assert [p.step for p in dpo] == sorted(p.step for p in dpo) and len(dpo) == 2
    assert all(p.kl_mean != 0.0 for p in dpo)  # the policy moved
    data = json.loads((tmp_path / "out/results.json").read_text())
    assert data["preferences"]["pairs"] > 0 and "DPO" not in data["dpo_dominance"]
    assert (tmp_path / "out/frontier.png").stat().st_size > 1000
    assert "| DPO | dpo-beta0.1 |" in (tmp_path / "out/results.md").read_text()
    assert not list((tmp_path / "out/runs/dpo-beta0.1").glob("checkpoint-*"))  # evaluated, then removed
    # KTO trained on one completion of each pair, labelled by the reward against the median.
    unpaired = [json.loads(line) for line in (tmp_path / "out/data/unpaired.jsonl").read_text().splitlines()]
    assert len(unpaired) == data["preferences"]["pairs"] == data["preferences"]["kto_examples"]
    assert all(row["label"] == (row["reward"] > data["preferences"]["kto_threshold"]) for row in unpaired)
    # Win rates against the SFT model's samples (every trained model's final export and Best-of-N),
    # judged by the ground-truth reward, and the DPO policy as an implicit-reward judge.
    assert result.winrate is not None
    rows = result.winrate.results
    assert {r["model"] for r in rows} == {
        "DPO β=0.1",
        "Preferred-FT",
        "Unlikelihood",
        "ORPO (no reference)",
        "SimPO (no reference)",
        "KTO (unpaired, half the pairs)",
        "Best-of-2",
    }
    assert {r["temperature"] for r in rows} == {0.5, 1.0} and all(r["ci_method"] == "wilson" for r in rows)
    assert all(r["position_bias"] == 0.0 for r in rows)  # a reward judge is symmetric
    implicit = result.winrate.implicit_judges
    assert [j["model"] for j in implicit] == ["DPO β=0.1"] or implicit == []
    assert (tmp_path / "out/winrate/winrate.png").stat().st_size > 1000
    assert "| DPO β=0.1 | 0.5 |" in (tmp_path / "out/winrate/results.md").read_text()
    # A second run reuses every stored point instead of training again, and every sample and judgment.
    again = run_experiment(settings, tmp_path / "out", tmp_path / "cache", log=None)
    assert again.points == result.points and again.winrate == result.winrate


@pytest.mark.slow
def test_demo_prints_reward_and_kl_before_and_after_with_paired_samples(tmp_path, capfd):
    import warnings

    from dpokit.commands.experiment import demo_report
    from dpokit.experiments.sentiment import run_sentiment_demo

    lines: list[str] = []
    settings = dataclasses.replace(MODES["smoke"], warmup_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_sentiment_demo(tmp_path / "demo", tmp_path / "cache", settings=settings, log=lines.append)
    lines += demo_report(result)
    # Quiet: no deprecation/future warnings, no transformers logger notices, no "Loading weights" bars.
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))], [
        str(w.message) for w in caught
    ]
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "deprecated" not in err and "[transformers]" not in err, err
    text = "\n".join(lines)
    assert "before (SFT model)" in text and "after DPO (beta=0.1)" in text
    assert result.before.kl_mean == 0.0 and result.after.kl_mean != 0.0
    # Samples shown side by side answer the same prompts.
    shown = [line for line in lines if line.startswith("prompt: ")]
    assert shown and all(b["prompt"] == a["prompt"] for b, a in zip(result.before_samples, result.after_samples, strict=True))
    # The DPO run directory is a normal dpokit run: held-out metrics, TensorBoard events and the plot.
    run_dir = result.run_dir
    evals = [r for r in read_metrics(run_dir) if r["split"] == "eval"]
    assert evals and all("rewards/accuracies" in r and "rewards/margins" in r for r in evals)
    assert "reward accuracy" in text and f"{evals[-1]['rewards/margins']:8.3f}" in text
    assert list((run_dir / "tensorboard").iterdir()) and (run_dir / "curves.png").stat().st_size > 10_000


def test_stored_points_are_keyed_by_every_setting_except_the_method_selection():
    full = MODES["full"]
    assert dataclasses.replace(full, methods=("dpo",)).key() == full.key()
    assert dataclasses.replace(full, lr=full.lr * 2).key() != full.key()
    assert dataclasses.replace(full, lm=dataclasses.replace(full.lm, steps=1)).key() != full.key()


def test_win_rate_settings_do_not_change_the_stored_points_key():
    full = MODES["full"]
    assert dataclasses.replace(full, winrate_temperatures=(1.0,), winrate_prompts=3).key() == full.key()
    assert dataclasses.replace(full, simpo_beta=1.0).key() != full.key()


def test_quick_mode_leaves_out_the_new_objectives_and_the_win_rates():
    quick = MODES["quick"]
    assert not {"orpo", "simpo", "kto"} & set(quick.methods) and quick.winrate_temperatures == ()
    assert {"orpo", "simpo", "kto"} <= set(MODES["full"].methods) and MODES["full"].winrate_temperatures


def test_unpaired_data_keeps_one_completion_per_pair_alternating_with_a_median_threshold(tmp_path):
    from dpokit.experiments.preferences import write_jsonl
    from dpokit.experiments.sentiment import Experiment

    rewards = [(0.9, 0.1), (0.8, -0.5), (0.3, 0.2), (0.7, -0.9)]
    pairs = [
        {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "chosen_reward": c, "rejected_reward": r}
        for i, (c, r) in enumerate(rewards)
    ]
    experiment = Experiment(MODES["smoke"], tmp_path, tmp_path / "cache", log=None)
    experiment.train_path = write_jsonl(pairs, tmp_path / "pairs.jsonl")
    experiment.preference_stats = {}
    rows = [json.loads(line) for line in experiment.unpaired_data().read_text().splitlines()]
    # Sorted rewards -0.9 -0.5 0.1 0.2 0.3 0.7 0.8 0.9: the threshold is the upper median, 0.3.
    assert experiment.preference_stats == {"kto_threshold": 0.3, "kto_desirable": 1, "kto_examples": 4}
    assert [r["completion"] for r in rows] == ["c0", "r1", "c2", "r3"]
    assert [r["label"] for r in rows] == [True, False, False, False]


def test_unknown_methods_are_refused(tmp_path):
    from dpokit.errors import ConfigError
    from dpokit.experiments.sentiment import Experiment

    with pytest.raises(ConfigError, match="unknown methods"):
        Experiment(dataclasses.replace(MODES["smoke"], methods=("ppo",)), tmp_path, tmp_path, log=None)


def test_experiment_command_uses_the_modes_methods_unless_given(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from dpokit.commands.main import main
    from dpokit.experiments import sentiment

    seen = []

    def fake_run(settings, out_dir, cache_dir, **kwargs):
        seen.append(settings.methods)
        return SimpleNamespace(points=[])

    monkeypatch.setattr(sentiment, "run_experiment", fake_run)
    assert main(["experiment", "sentiment", "--mode", "quick", "--out", str(tmp_path)]) == 0
    assert main(["experiment", "sentiment", "--mode", "full", "--out", str(tmp_path), "--methods", "dpo,kto"]) == 0
    assert seen == [MODES["quick"].methods, ("dpo", "kto")]


def test_best_of_n_through_a_sampling_engine_draws_the_same_pool_as_in_process():
    from dpokit.experiments.baselines import best_of_n_points
    from dpokit.generation import DpokitEngine
    from tests.helpers import tiny_gpt2, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer), seed=1, initializer_range=0.5)
    by_length = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    args = (model, tokenizer, ["the movie was", "i liked", "a"], by_length, [1, 4])
    direct = best_of_n_points(*args, max_new_tokens=6, seed=5)
    through = best_of_n_points(*args, max_new_tokens=6, seed=5, engine=DpokitEngine(model, tokenizer))
    assert through == direct and direct[1].reward_mean > direct[0].reward_mean


def test_experiment_engine_option_reaches_every_experiment_but_shapes(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from dpokit.commands.main import main
    from dpokit.experiments import online, ood, overoptimisation
    from dpokit.generation import EngineOptions

    seen: dict[str, object] = {}

    def fake(name: str):
        def run(*args, engine=None, **kwargs):
            seen[name] = engine
            return SimpleNamespace(summary=dict, curves={})

        return run

    for module, runner in ((online, "run_online_experiment"), (overoptimisation, "run_overoptimisation_experiment")):
        monkeypatch.setattr(module, runner, fake(module.__name__.rsplit(".", 1)[1]))
    monkeypatch.setattr(ood, "run_ood_experiment", fake("ood"))
    monkeypatch.setattr(online, "run_online_seeds", fake("online --seeds"))
    for module in (online, overoptimisation, ood):
        monkeypatch.setattr(module, "summary_markdown", lambda anything: "")
    monkeypatch.setattr(online, "seeds_markdown", lambda anything: "")
    engine = ["--engine", "vllm", "--engine-url", "http://127.0.0.1:9"]
    for name in ("online", "overoptimisation", "ood"):
        assert main(["experiment", name, "--mode", "quick", "--out", str(tmp_path / name), *engine]) == 0
    assert main(["experiment", "online", "--mode", "quick", "--out", str(tmp_path / "seeds"), "--seeds", "0,1", *engine]) == 0
    vllm = EngineOptions("vllm", "http://127.0.0.1:9")
    assert seen == {"online": vllm, "overoptimisation": vllm, "ood": vllm, "online --seeds": vllm}
    capsys.readouterr()
    assert main(["experiment", "shapes", "--mode", "quick", *engine]) == 2
    assert "--engine vllm does not apply to the shapes experiment: its prompts have images" in capsys.readouterr().err
    assert main(["experiment", "sentiment", "--mode", "quick", "--engine", "vllm"]) == 2
    assert "--engine vllm needs --engine-url" in capsys.readouterr().err
