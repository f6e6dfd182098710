"""The dpokit command line: help for every command, error reporting, `python -m dpokit`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.cli import SUBCOMMANDS, build_parser, main

COMMANDS = [command.name for command in SUBCOMMANDS]


def test_top_level_help_lists_every_command_and_a_quick_start(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("train", "sft", "eval", "score", "generate", "demo"):
        assert name in COMMANDS
        assert f"    {name}" in text
    assert "quick start" in text and "dpokit demo" in text


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_describes_each_argument_and_shows_examples(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"dpokit {name}" in text
    assert "examples:" in text
    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[name]
    for action in subparser._actions:
        assert action.help, f"`dpokit {name}` argument {action.dest} has no help text"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


def test_user_errors_print_one_line_without_traceback_and_exit_2(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "missing-model"), "--prompt", "hi"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ")
    assert "missing-model" in captured.err
    assert "Traceback" not in captured.err


def test_generate_without_prompts_says_how_to_give_them(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path)]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_python_dash_m_dpokit_runs_the_cli():
    completed = subprocess.run([sys.executable, "-m", "dpokit", "--version"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0
    assert completed.stdout.startswith("dpokit ")


EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


def test_examples_cover_full_lora_ipo_and_listwise_and_all_validate():
    from dpokit.config import load_config, validate_config
    from dpokit.losses import build_objective

    names = {path.stem for path in EXAMPLES_DIR.glob("*.yaml")}
    assert {"full", "lora", "ipo", "listwise"} <= names
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        config = load_config(path)
        validate_config(config)
        build_objective(config.loss.terms, beta=config.loss.beta, reference_free=config.loss.reference_free)
        assert path.read_text().count("#") >= 10, f"{path.name} should explain its keys in comments"
    assert load_config(EXAMPLES_DIR / "lora.yaml").model.lora.enabled
    assert load_config(EXAMPLES_DIR / "ipo.yaml").loss.terms[0]["name"] == "ipo"
    assert load_config(EXAMPLES_DIR / "listwise.yaml").loss.terms[0]["name"] == "plackett_luce"


def test_example_config_with_a_mistyped_override_is_a_clear_cli_error(capsys):
    assert main(["train", str(EXAMPLES_DIR / "full.yaml"), "loss.betta=0.2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "betta" in err and "Traceback" not in err
