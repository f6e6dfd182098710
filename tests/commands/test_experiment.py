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


def test_online_seeds_run_once_per_seed_in_their_own_directories_and_write_the_across_seed_tables(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from dpokit.experiments import online

    runs = []

    def fake_run(settings, out_dir, cache_dir, **kwargs):
        runs.append((settings.seed, str(out_dir), settings.prefer_shorter_within))
        arm = {"label": "(d)", "reward": {"mean": 0.1 * settings.seed}, "kl": {"mean": 1.0}, "mean_length": 10.0}
        comparison = {"reward_difference": {"mean": 0.01 * settings.seed}, "win_rate": 0.5}
        summary = {
            "settings": {"seed": settings.seed},
            "arms": {"ten-percent": arm},
            "comparisons": {"x vs ten-percent": comparison},
        }
        return SimpleNamespace(summary=lambda: summary)

    monkeypatch.setattr(online, "run_online_experiment", fake_run)
    out = tmp_path / "out"
    args = ["experiment", "online", "--mode", "quick", "--seeds", "0,1,2", "--prefer-shorter-within", "0.5", "--out", str(out)]
    assert main(args) == 0
    assert runs == [(seed, str(out / f"seed-{seed}"), 0.5) for seed in (0, 1, 2)]
    assert (out / "seeds.json").exists() and "Over training seeds 0, 1, 2" in (out / "seeds.md").read_text()
    assert "| (d) | 0.100 [" in capsys.readouterr().out


def test_online_seeds_refuse_a_repeated_or_malformed_seed_list_in_one_line(tmp_path, capsys):
    for seeds in ("0,0", "a,b", ","):
        assert main(["experiment", "online", "--seeds", seeds, "--out", str(tmp_path / "out")]) == 2
        assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
