"""The over-optimisation experiment: its peak summary, held-out implicit-reward statistics, the command,
and a smoke run of the DPO sweep and the online ground-truth arm."""

from __future__ import annotations

import json
import math

import pytest

from dpokit.experiments.overoptimisation import (
    MODES,
    heldout_summary,
    normal_interval,
    run_overoptimisation_experiment,
    summarise_curve,
)
from dpokit.judges.stats import Z95


def _rows(rewards, sem=0.01):
    return [
        {
            "step": 10 * index,
            "reward": normal_interval(reward, sem),
            "kl": normal_interval(float(index), 0.1),
            "implicit_reward": normal_interval(0.1 * index, 0.01),
            "heldout": None,
        }
        for index, reward in enumerate(rewards)
    ]


def test_a_reward_that_falls_clearly_after_its_peak_is_reported_as_peaked_with_the_drop_and_its_interval():
    summary = summarise_curve(_rows([0.1, 0.5, 0.9, 0.7], sem=0.02))
    assert summary["peak_step"] == 20 and summary["last_step"] == 30 and summary["peaked"]
    change = summary["reward_change"]
    assert change["mean"] == pytest.approx(-0.2)
    assert change["ci_high"] - change["mean"] == pytest.approx(Z95 * math.sqrt(2) * 0.02)
    assert summary["kl"] == {"peak": 2.0, "last": 3.0}
    assert summary["margin"] == summary["agreement"] == {"peak": None, "last": None}  # no held-out pairs measured


def test_a_drop_within_the_intervals_or_a_peak_at_the_end_is_not_called_a_peak():
    within = summarise_curve(_rows([0.1, 0.9, 0.89], sem=0.05))
    assert within["peak_step"] == 10 and not within["peaked"] and within["reward_change"]["ci_high"] > 0
    rising = summarise_curve(_rows([0.1, 0.5, 0.9]))
    assert rising["peak_step"] == rising["last_step"] == 20 and not rising["peaked"]
    assert rising["reward_change"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_heldout_agreement_counts_positive_margins_and_ties_half_with_a_wilson_interval():
    summary = heldout_summary([{"rewards/margins": m} for m in (2.0, 1.0, 0.0, -1.0, None)])
    assert summary["pairs"] == 4
    assert summary["agreement"]["mean"] == pytest.approx(2.5 / 4)
    assert 0 < summary["agreement"]["ci_low"] < 0.625 < summary["agreement"]["ci_high"] < 1
    assert summary["margin"]["mean"] == pytest.approx(0.5)
    assert heldout_summary([]) == {"pairs": 0, "margin": None, "agreement": None}


def test_every_mode_trains_dpo_only_longer_than_the_sentiment_experiment_with_a_valid_online_arm():
    from dpokit.experiments.sentiment import MODES as SENTIMENT_MODES

    for name in ("full", "quick"):
        settings = MODES[name]
        assert settings.dpo.methods == ("dpo",) and len(settings.dpo.dpo_betas) >= 2
        assert settings.dpo.epochs > SENTIMENT_MODES[name].epochs
        assert settings.online is not None
        settings.online.validate()


@pytest.mark.slow
def test_smoke_run_measures_every_checkpoint_and_reuses_its_stored_curves(tmp_path):
    """The DPO sweep and the online ground-truth arm at toy size through the real trainer, online loop and
    evaluation; checks what is measured and written, not quality."""
    settings = MODES["smoke"]
    result = run_overoptimisation_experiment(settings, tmp_path / "out", tmp_path / "cache", log=None)
    assert set(result.curves) == {"dpo-beta0.1", "online-gt"}
    dpo = result.curves["dpo-beta0.1"]
    steps = [row["step"] for row in dpo["rows"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) == 1 + settings.dpo.checkpoints_per_run
    reference, *trained = dpo["rows"]
    assert reference["kl"]["mean"] == 0.0 and reference["implicit_reward"]["mean"] == 0.0 and reference["heldout"] is None
    for row in trained:  # the implicit reward of the policy's own samples is beta x their KL
        assert row["implicit_reward"]["mean"] == pytest.approx(0.1 * row["kl"]["mean"])
        assert row["heldout"]["pairs"] == result.heldout_pairs > 0
    assert dpo["summary"]["peak_reward"]["mean"] == max(row["reward"]["mean"] for row in dpo["rows"])
    online = result.curves["online-gt"]
    assert [row["step"] for row in online["rows"]][-1] == settings.online.total_steps
    assert len(online["rounds"]) == settings.online.total_steps // settings.online.steps_per_round
    out = tmp_path / "out"
    assert (out / "overoptimisation.png").stat().st_size > 10_000
    assert (out / "overoptimisation-online.png").stat().st_size > 10_000
    assert not list((out / "runs" / "dpo-beta0.1").glob("checkpoint-*"))  # removed once measured
    text = (out / "results.md").read_text()
    assert "| DPO β=0.1 |" in text and "| online DPO, VADER judge (β=0.1) |" in text
    assert f"| {'yes' if dpo['summary']['peaked'] else 'no'} |" in text
    written = json.loads((out / "results.json").read_text())
    assert json.dumps(written["curves"]["dpo-beta0.1"]["rows"]) == json.dumps(dpo["rows"])  # NaN bounds compare as text
    assert written["date"] in text and written["machine"] in text and "torch" in written["machine"]
    # A second run measures nothing again: the stored curves are reused.
    lines: list[str] = []
    again = run_overoptimisation_experiment(settings, out, tmp_path / "cache", log=lines.append)
    assert not [line for line in lines if "training" in line or "rounds of" in line]
    assert json.dumps(again.curves) == json.dumps(result.curves)


def test_the_command_runs_the_mode_and_refuses_the_other_experiments_options(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from dpokit.commands.main import main
    from dpokit.experiments import overoptimisation

    seen = []

    def fake_run(mode, out_dir, cache_dir, **kwargs):
        seen.append((mode, str(out_dir)))
        return SimpleNamespace(curves={})

    monkeypatch.setattr(overoptimisation, "run_overoptimisation_experiment", fake_run)
    assert main(["experiment", "overoptimisation", "--mode", "quick", "--out", str(tmp_path)]) == 0
    assert seen == [("quick", str(tmp_path))]
    capsys.readouterr()
    assert main(["experiment", "overoptimisation", "--methods", "dpo"]) != 0
    assert "--methods applies to the sentiment experiment" in capsys.readouterr().err
    assert main(["experiment", "overoptimisation", "--prefer-shorter-within", "0.5"]) != 0
    assert "apply to the online experiment" in capsys.readouterr().err
    assert len(seen) == 1


def test_the_worked_examples_in_the_docstrings_hold():
    import doctest

    from dpokit.experiments import overoptimisation

    result = doctest.testmod(overoptimisation)
    assert result.attempted >= 6 and result.failed == 0
