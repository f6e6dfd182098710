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
