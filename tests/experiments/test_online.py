"""The online / self-labelling experiment: its statistics, its settings, and a smoke run of every arm."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from dpokit.errors import ConfigError
from dpokit.experiments.online import (
    MODES,
    across_seeds,
    compare_samples,
    mean_interval,
    prompt_means,
    run_online_experiment,
)
from dpokit.judges.stats import Z95


def _samples(rewards, per_prompt=2):
    return [{"prompt": f"p{i // per_prompt}", "prompt_index": i // per_prompt, "reward": r} for i, r in enumerate(rewards)]


def test_mean_interval_is_the_normal_interval_over_prompts():
    values = [0.2, 0.4, 0.9, 0.5]
    result = mean_interval(values)
    sd = math.sqrt(sum((v - 0.5) ** 2 for v in values) / 3)
    assert result["mean"] == pytest.approx(0.5)
    assert result["ci_high"] - result["mean"] == pytest.approx(Z95 * sd / 2)
    assert result["mean"] - result["ci_low"] == pytest.approx(Z95 * sd / 2)


def test_prompt_means_average_each_prompts_samples_first():
    assert prompt_means(_samples([1.0, 0.0, 0.5, 0.5, 0.2, 0.4]), "reward") == pytest.approx([0.5, 0.5, 0.3])


def test_compare_samples_counts_wins_ties_losses_sample_by_sample():
    ours = _samples([0.9, 0.1, 0.5, 0.5])
    theirs = _samples([0.1, 0.1, 0.7, 0.2])
    result = compare_samples(ours, theirs)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    low, high = result["win_rate_ci"]
    assert 0 < low < result["win_rate"] < high < 1
    # paired differences per prompt: (0.8 + 0) / 2 = 0.4 and (-0.2 + 0.3) / 2 = 0.05
    assert result["reward_difference"]["mean"] == pytest.approx(0.225)


def test_compare_samples_refuses_samples_of_different_prompts():
    ours = _samples([0.1, 0.2])
    theirs = [{**s, "prompt": "other"} for s in ours]
    with pytest.raises(ConfigError, match="same prompts"):
        compare_samples(ours, theirs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"start_steps": 0}, "start_steps must be in"),
        ({"start_steps": 4}, "start_steps must be in"),
        ({"steps_per_round": 3}, "multiple of steps_per_round"),
        ({"self_judges": ("oracle",)}, "self_judges"),
        ({"total_steps": 8, "checkpoints_per_run": 2}, "multiple of the checkpoint interval"),
        ({"labelled_fraction": 0.0}, "labelled_fraction"),
    ],
)
def test_settings_that_cannot_make_equal_step_arms_are_refused(change, message, tmp_path):
    settings = dataclasses.replace(MODES["smoke"], **change)
    with pytest.raises(ConfigError, match=message):
        run_online_experiment(settings, tmp_path / "out", tmp_path / "cache", log=None)


def test_every_mode_gives_every_arm_the_same_number_of_steps():
    for settings in MODES.values():
        settings.validate()  # raises otherwise


@pytest.mark.slow
def test_smoke_run_gives_every_arm_the_same_steps_and_writes_rounds_table_and_frontier(tmp_path):
    """Every arm at toy size through the real trainer, online loop and judges; checks the plan and the
    outputs, not quality."""
    settings = MODES["smoke"]
    result = run_online_experiment(settings, tmp_path / "out", tmp_path / "cache", log=None)
    arms = result.arms
    assert set(arms) == {"reference", "offline", "online-gt", "self-label", "self-label-current", "ten-percent"}
    assert {arm: row["step"] for arm, row in arms.items() if arm != "reference"} == dict.fromkeys(
        ["offline", "online-gt", "self-label", "self-label-current", "ten-percent"], settings.total_steps
    )
    # (c) starts where (d) was after start_steps: the same point, then its own rounds.
    points = {(p.run, p.step): p for p in result.points}
    start = points[("ten-percent", settings.start_steps)]
    assert points[("self-label", settings.start_steps)].reward_mean == start.reward_mean
    runs = tmp_path / "out" / "runs"
    online_rounds = {"online-gt": settings.total_steps, "self-label": settings.total_steps - settings.start_steps}
    for arm, steps in online_rounds.items():
        rounds = sorted((runs / arm / "rounds").glob("round-*"))
        assert len(rounds) == steps // settings.steps_per_round == len(arms[arm]["rounds"])
        completions = [json.loads(line) for line in (rounds[0] / "completions.jsonl").read_text().splitlines()]
        assert len(completions) == settings.prompts_per_round * settings.samples_per_prompt
    judge = (runs / "self-label" / "config.yaml").read_text()
    assert f"implicit:{runs / 'ten-percent' / f'checkpoint-{settings.start_steps}' / 'model'}" in judge
    comparison = result.comparisons["self-label vs ten-percent"]
    assert (
        comparison["wins"] + comparison["ties"] + comparison["losses"]
        == settings.num_eval_prompts * settings.eval_samples_per_prompt
    )
    assert 0 <= comparison["win_rate_ci"][0] <= comparison["win_rate"] <= comparison["win_rate_ci"][1] <= 1
    out = tmp_path / "out"
    assert (out / "frontier.png").stat().st_size > 1000
    text = (out / "results.md").read_text()
    assert "| (c) 10% DPO + self-labelled rounds (frozen 10% policy) vs (d) 10% DPO only (baseline) |" in text
    assert json.loads((out / "results.json").read_text())["labelled_pairs"]["fraction"] < result.labelled_pairs["all"]
    # A second run in the same directory reuses every arm's stored points instead of training again.
    lines: list[str] = []
    again = run_online_experiment(settings, out, tmp_path / "cache", log=lines.append)
    assert [line for line in lines if line.endswith(": stored")] == [
        f"{arm}: stored" for arm in ("offline", "ten-percent", "online-gt", "self-label", "self-label-current")
    ]
    assert again.points == result.points and again.comparisons == result.comparisons


def test_an_unknown_mode_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown mode 'huge'.*full.*quick.*smoke"):
        run_online_experiment("huge", tmp_path / "out", tmp_path / "cache", log=None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"self_reward": "length_normalized"}, "set self_judges=\\('current',\\)"),
        ({"self_reward": "length_regularized", "self_judges": ("current",)}, "that form needs it > 0"),
        ({"length_penalty": 0.1}, "used by online.self_reward=length_regularized only"),
        ({"prefer_shorter_within": -1.0}, "prefer_shorter_within must be >= 0"),
    ],
)
def test_length_control_settings_are_refused_before_any_arm_trains(change, message, tmp_path):
    settings = dataclasses.replace(MODES["smoke"], **change)
    with pytest.raises(ConfigError, match=message):
        run_online_experiment(settings, tmp_path / "out", tmp_path / "cache", log=None)
    assert not (tmp_path / "out").exists()


def test_length_control_at_its_defaults_leaves_the_stored_results_key_alone(tmp_path):
    """Results stored before the length-control settings existed stay valid: at their defaults they are not
    part of the key; any other value is."""
    import hashlib
    from dataclasses import asdict

    from dpokit.experiments.online import LENGTH_CONTROL_DEFAULTS, STORE_LAYOUT, OnlineExperiment

    settings = MODES["smoke"]
    before = {k: v for k, v in asdict(settings).items() if k not in LENGTH_CONTROL_DEFAULTS}
    expected = hashlib.sha256(json.dumps({**before, "store_layout": STORE_LAYOUT}, sort_keys=True).encode()).hexdigest()[:10]
    assert OnlineExperiment(settings, tmp_path / "a", tmp_path / "cache").key() == expected
    shorter = dataclasses.replace(settings, prefer_shorter_within=0.5)
    assert OnlineExperiment(shorter, tmp_path / "b", tmp_path / "cache").key() != expected


@pytest.mark.slow
def test_smoke_run_with_length_control_labels_the_current_policys_arm_with_it(tmp_path):
    """(c') with the DICE-form self-label and the length-aware pair choice at toy size: its online config
    carries them, its rounds are labelled and paired with them, and its label names them."""
    settings = dataclasses.replace(
        MODES["smoke"],
        self_judges=("current",),
        self_reward="length_regularized",
        length_penalty=0.01,
        prefer_shorter_within=0.5,
    )
    result = run_online_experiment(settings, tmp_path / "out", tmp_path / "cache", log=None)
    arm = result.arms["self-label-current"]
    assert "self-label" not in result.arms and arm["step"] == settings.total_steps
    note = " [length-regularized reward, alpha=0.01; shortest within 0.5 of the best chosen]"
    assert arm["label"] == "(c') 10% DPO + self-labelled rounds (current policy)" + note
    assert result.arms["online-gt"]["label"] == "(b) online DPO, ground-truth judge"  # the other arms as before
    config = (tmp_path / "out" / "runs" / "self-label-current" / "config.yaml").read_text()
    assert "self_reward: length_regularized" in config and "prefer_shorter_within: 0.5" in config
    gt_config = (tmp_path / "out" / "runs" / "online-gt" / "config.yaml").read_text()
    assert "self_reward: implicit" in gt_config and "prefer_shorter_within: null" in gt_config
    assert arm["rounds"] and all("pairs/shorter_chosen" in record for record in arm["rounds"])
    rounds = sorted((tmp_path / "out" / "runs" / "self-label-current" / "rounds").glob("round-*"))
    assert rounds
    for directory in rounds:
        summary = json.loads((directory / "round.json").read_text())
        assert summary["judgments"]["judge"] == "self (length_regularized, alpha=0.01)"
    assert f"| (c') 10% DPO + self-labelled rounds (current policy){note} vs (d)" in (tmp_path / "out" / "results.md").read_text()


def test_across_seeds_gives_each_arm_and_comparison_a_student_t_interval_over_the_seeds():
    def summary(seed, reward, difference):
        arm = {"label": "(c')", "reward": {"mean": reward}, "kl": {"mean": 2.0 * reward}, "mean_length": 20.0}
        comparison = {"reward_difference": {"mean": difference}, "win_rate": 0.5 + difference}
        return {"settings": {"seed": seed}, "arms": {"self-label-current": arm}, "comparisons": {"c vs d": comparison}}

    aggregate = across_seeds([summary(0, 0.4, 0.1), summary(1, 0.5, 0.0), summary(2, 0.6, 0.2)])
    assert aggregate["seeds"] == [0, 1, 2]
    reward = aggregate["arms"]["self-label-current"]["reward"]
    # mean 0.5, sd 0.1 over 3 seeds: half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.303 * 0.0577
    assert reward["mean"] == pytest.approx(0.5) and reward["per_seed"] == [0.4, 0.5, 0.6]
    assert reward["ci_high"] - reward["mean"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-3)
    difference = aggregate["comparisons"]["c vs d"]["reward_difference"]
    assert difference["mean"] == pytest.approx(0.1) and difference["ci_low"] < 0 < difference["ci_high"]
    assert aggregate["comparisons"]["c vs d"]["seeds"] == 3


def _with_completions(rewards, lengths, per_prompt=2):
    return [{**s, "completion": "x" * n} for s, n in zip(_samples(rewards, per_prompt), lengths, strict=True)]


def test_compare_samples_length_controlled_win_rate_is_near_half_when_length_alone_decides():
    # Ours wins exactly where its sample is the longer one, and it is the longer one in 6 of 8 pairs.
    ours = _with_completions([0.9, 0.8, 0.7, 0.9, 0.6, 0.8, 0.1, 0.2], [65, 55, 45, 35, 25, 15, 5, 8])
    theirs = _with_completions([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.5, 0.6], [5, 5, 5, 5, 5, 5, 15, 28])
    result = compare_samples(ours, theirs)
    assert result["win_rate"] == pytest.approx(0.75)
    assert abs(result["lc_win_rate"] - 0.5) < 0.05 and result["length_effect"] > 1.0
    assert result["lc_ci_low"] <= result["lc_win_rate"] <= result["lc_ci_high"]


def test_compare_samples_length_controlled_win_rate_stays_with_the_raw_one_when_length_does_not_decide():
    # 6 wins and 2 losses, wins and losses alike on both sides of equal length.
    ours = _with_completions([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1], [10, 20, 30, 50, 60, 70, 25, 55])
    theirs = _with_completions([0.1] * 6 + [0.9, 0.9], [40, 50, 60, 20, 30, 40, 40, 40])
    result = compare_samples(ours, theirs)
    assert result["win_rate"] == pytest.approx(0.75) and result["lc_win_rate"] == pytest.approx(0.75, abs=0.02)
    assert abs(result["length_effect"]) < 0.1


def test_compare_samples_without_completions_has_no_length_control():
    assert "lc_win_rate" not in compare_samples(_samples([0.9, 0.1]), _samples([0.1, 0.9]))


def test_across_seeds_carries_the_length_controlled_win_rate_into_the_seeds_table():
    from dpokit.experiments.online import seeds_markdown

    def summary(seed, lc):
        arm = {"label": "(c')", "reward": {"mean": 0.3}, "kl": {"mean": 2.0}, "mean_length": 20.0}
        comparison = {"reward_difference": {"mean": 0.0}, "win_rate": 0.5, "lc_win_rate": lc, "length_effect": lc - 0.5}
        return {
            "settings": {"seed": seed},
            "arms": {"self-label-current": arm},
            "comparisons": {"self-label-current vs ten-percent": comparison},
        }

    aggregate = across_seeds([summary(0, 0.4), summary(1, 0.5), summary(2, 0.6)])
    lc = aggregate["comparisons"]["self-label-current vs ten-percent"]["lc_win_rate"]
    assert lc["mean"] == pytest.approx(0.5) and lc["per_seed"] == [0.4, 0.5, 0.6] and lc["ci_low"] < 0.4
    table = seeds_markdown(aggregate)
    assert "| LC win rate | per seed | length effect | per seed |" in table and "| 0.400, 0.500, 0.600 |" in table
    # A seed stored without it (an older results.json) leaves the column out rather than averaging fewer seeds.
    older = summary(3, 0.5)
    del older["comparisons"]["self-label-current vs ten-percent"]["lc_win_rate"]
    assert "lc_win_rate" not in across_seeds([summary(0, 0.4), older])["comparisons"]["self-label-current vs ten-percent"]


def test_online_arms_on_vllm_sample_their_rounds_on_the_server_and_are_stored_under_another_key(tmp_path):
    """--engine vllm reaches the arms' rounds (online.sampling on the server, its key variable named) and the
    stored arms' key; dpokit's engine leaves both as they were."""
    from dpokit.experiments.online import VADER_JUDGE, OnlineExperiment
    from dpokit.generation import EngineOptions

    vllm = EngineOptions("vllm", "http://127.0.0.1:9", api_key_env="MY_KEY")
    on_vllm = OnlineExperiment(MODES["smoke"], tmp_path, tmp_path, engine=vllm)
    here = OnlineExperiment(MODES["smoke"], tmp_path, tmp_path)
    assert on_vllm.key() != here.key() and on_vllm.store.key == on_vllm.key()
    configs = []
    for experiment in (on_vllm, here):
        experiment.sft_dir, experiment.prompts_path, experiment.heldout_path = tmp_path / "sft", tmp_path / "p.jsonl", None
        configs.append(experiment._online_config(tmp_path / "run", tmp_path / "sft", VADER_JUDGE, 2, tmp_path / "d.jsonl", 4))
    sampling = configs[0].online.sampling
    assert (sampling.engine, sampling.url, sampling.api_key_env) == ("vllm", "http://127.0.0.1:9", "MY_KEY")
    assert configs[1].online.sampling.engine == "dpokit" and configs[1].online.sampling.url is None
