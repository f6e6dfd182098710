"""``dpokit experiment``: the online experiment's command-line checks (the runs themselves are tested in
tests/experiments)."""

from __future__ import annotations

from dpokit.commands.main import main


def test_online_experiment_refuses_a_method_subset_in_one_line(tmp_path, capsys):
    code = main(["experiment", "online", "--mode", "quick", "--methods", "dpo", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and "--methods applies to the sentiment experiment" in captured.err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_online_experiment_refuses_a_length_regularized_reward_without_its_penalty_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["experiment", "online", "--mode", "quick", "--self-reward", "length_regularized", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("error: ") and "that form needs it > 0" in captured.err
    assert "Traceback" not in captured.err and not out.exists()  # refused before anything ran


def test_the_sentiment_experiment_refuses_the_online_length_options(tmp_path, capsys):
    code = main(["experiment", "sentiment", "--mode", "quick", "--prefer-shorter-within", "1", "--out", str(tmp_path / "o")])
    assert code == 2 and "apply to the online experiment" in capsys.readouterr().err


def test_the_online_length_options_select_the_settings_and_name_the_output_directory():
    import argparse

    from dpokit.commands.experiment import add_experiment_arguments, online_length_control
    from dpokit.experiments.online import MODES

    parser = argparse.ArgumentParser()
    add_experiment_arguments(parser)
    args = parser.parse_args(
        ["online", "--mode", "quick", "--self-reward", "length_regularized", "--length-penalty", "0.02",
         "--prefer-shorter-within", "0.5"]
    )  # fmt: skip
    settings, suffix = online_length_control(args)
    assert (settings.self_reward, settings.length_penalty, settings.prefer_shorter_within) == ("length_regularized", 0.02, 0.5)
    assert settings.self_judges == ("current",) and settings.total_steps == MODES["quick"].total_steps
    assert suffix == "-length_regularized0.02-shorter0.5"
    plain, suffix = online_length_control(parser.parse_args(["online", "--mode", "quick"]))
    assert plain == MODES["quick"] and suffix == ""
