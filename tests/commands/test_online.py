"""``dpokit online``: its help, and a 2-round job end to end through the command line on a tiny model."""

from __future__ import annotations

import json

import pytest

from dpokit.commands.main import main
from dpokit.training.tracking import read_metrics
from tests.helpers import preference_rows, write_preference_jsonl, write_tiny_model_dir


def test_online_help_names_the_config_resume_and_round_files(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["online", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "CONFIG.yaml" in text and "--resume" in text and "rounds/round-NNNN" in text


def test_a_two_round_job_runs_end_to_end_from_the_command_line(tmp_path, capsys):
    write_tiny_model_dir(tmp_path / "model")
    write_preference_jsonl(tmp_path / "heldout.jsonl", n=6, seed=1)
    prompts = "".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in preference_rows(6, seed=4))
    (tmp_path / "prompts.jsonl").write_text(prompts, encoding="utf-8")
    config = tmp_path / "online.yaml"
    config.write_text(
        "optim: {optimizer: adamw, lr: 1.0e-3, warmup_steps: 0, batch_size: 4, grad_accumulation: 1}\n"
        "logging: {progress_bar: false, tensorboard: false}\n"
        "online: {rounds: 2, prompts_per_round: 3, samples_per_prompt: 3, steps_per_round: 1, "
        "judge: 'reward:tests.online.judges:counting_length_reward', sampling: {max_new_tokens: 8}}\n",
        encoding="utf-8",
    )
    run_dir = tmp_path / "run"
    code = main(
        [
            "online",
            str(config),
            f"model.name_or_path={tmp_path / 'model'}",
            f"data.eval_path={tmp_path / 'heldout.jsonl'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"online.prompts_path={tmp_path / 'prompts.jsonl'}",
            f"logging.run_dir={run_dir}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "round 0: judge score" in out and "round 1: judge score" in out and "finished after 2 optimizer steps" in out
    assert [r["round"] for r in read_metrics(run_dir, split="round")] == [0, 1]
    assert (run_dir / "rounds.png").is_file() and (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "rounds" / "round-0001" / "pairs.jsonl").is_file()


def test_a_missing_prompts_path_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "online.yaml"
    config.write_text("online: {judge: self}\n", encoding="utf-8")
    assert main(["online", str(config), f"model.name_or_path={tmp_path}"]) == 2
    assert "online.prompts_path" in capsys.readouterr().err


@pytest.mark.slow
def test_the_shipped_online_example_runs_as_is_on_what_the_demo_leaves(tmp_path, monkeypatch, capsys):
    """`dpokit demo` then `dpokit online examples/online.yaml`, from one directory: the example named
    outputs/sft, data/heldout.jsonl and data/prompts.jsonl, which nothing created. The demo here is the
    smoke-sized one (same files, smaller model); the online command is exactly the documented one."""
    import dataclasses
    from pathlib import Path

    from dpokit.commands.experiment import demo_report
    from dpokit.experiments.sentiment import DEMO_RUN_DIR, MODES, online_example_command, run_sentiment_demo

    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    smoke = dataclasses.replace(MODES["smoke"], warmup_steps=0)
    demo = run_sentiment_demo(DEMO_RUN_DIR, "cache", settings=smoke, log=lines.append)
    lines += demo_report(demo)
    command = online_example_command(DEMO_RUN_DIR)
    assert command == "dpokit online examples/online.yaml" and any(command in line for line in lines)
    example = Path(__file__).resolve().parents[2] / "examples" / "online.yaml"
    capsys.readouterr()
    assert main(["online", str(example)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "round 3: judge score" in out and "finished after 32 optimizer steps" in out
    assert [r["round"] for r in read_metrics("runs/online", split="round")] == [0, 1, 2, 3]
    assert (tmp_path / "runs" / "online" / "final" / "config.json").is_file()


def test_the_demo_names_overrides_for_a_run_directory_of_its_own():
    from dpokit.experiments.sentiment import online_example_command

    command = online_example_command("/tmp/elsewhere")
    assert command.startswith("dpokit online examples/online.yaml model.name_or_path=/tmp/elsewhere/sft ")
    assert "online.prompts_path=/tmp/elsewhere/data/eval_prompts.txt" in command
