"""The dpokit command line: help for every command, error reporting, `python -m dpokit`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.commands.main import SUBCOMMANDS, build_parser, main

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


HELP_CASES = list(COMMANDS)


@pytest.mark.parametrize("name", HELP_CASES)
def test_every_command_help_describes_each_argument_and_shows_examples(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"dpokit {name}" in text
    assert "examples:" in text
    parser = build_parser(only=name)
    subparser = parser._subparsers._group_actions[0].choices[name]
    for action in subparser._actions:
        assert action.help, f"`dpokit {name}` argument {action.dest} has no help text"


def test_top_level_help_does_not_import_torch():
    code = (
        "import sys; from dpokit.commands.main import main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "assert 'torch' not in sys.modules"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr


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


EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


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


# ------------------------------------------------------------------ end to end through the trainer


PAIRS = [
    ("the movie was", " very good and funny.", " very bad and long."),
    ("i think the plot", " is wonderful.", " is boring."),
    ("tell me about the actor", " he is great.", " he is awful."),
    ("the music", " was the best.", " was the worst."),
    ("so the story", " is funny and sad.", " is long."),
    ("what about the film", " i loved it.", " i hated it."),
]


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A tiny saved model, a preference file and a config naming them; the cwd is tmp_path."""
    import json

    from tests.helpers import tiny_llama, tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in PAIRS) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {{name_or_path: {tmp_path / 'base'}}}\n"
        f"data: {{train_path: {data}, eval_path: {data}, max_length: 64, max_prompt_length: 16}}\n"
        "optim: {optimizer: adamw, lr: 1.0e-3, warmup_steps: 0, batch_size: 2, grad_accumulation: 1, max_steps: 4}\n"
        "eval: {every_steps: 2, batch_size: 4}\n"
        "logging: {log_every: 1, progress_bar: false}\n"
        "checkpoint: {every_steps: 2, keep_last: 2}\n"
    )
    return tmp_path, config, data


@pytest.mark.slow
def test_train_then_eval_score_generate_on_its_outputs(project, capsys):
    """`dpokit train` with overrides; then eval/score/generate find the run's reference (the start model) by themselves."""
    import json

    root, config, data = project
    assert main(["train", str(config), f"logging.run_dir={root / 'run'}", "loss.beta=0.5"]) == 0
    out = capsys.readouterr().out
    assert "finished after 4 optimizer steps" in out and str(root / "run" / "final") in out
    run_dir = root / "run"
    assert {p.name for p in run_dir.iterdir()} >= {
        "metrics.jsonl",
        "tensorboard",
        "curves.png",
        "config.yaml",
        "final",
        "checkpoint-4",
    }

    # A checkpoint directory: eval with the run's beta and loss, reference = the start model.
    assert main(["eval", "--model", str(run_dir / "checkpoint-4"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["beta"] == 0.5 and result["reference"] == f"reference model {root / 'base'}"
    final_eval = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"][-1]
    # The same model, data, objective and log-prob code as the trainer's final evaluation.
    assert result["metrics"]["loss"] == pytest.approx(final_eval["loss"], abs=1e-5)
    assert result["metrics"]["rewards/margins"] == pytest.approx(final_eval["rewards/margins"], abs=1e-5)

    # --config supplies data, beta and loss terms from a training config (here: eval_path, beta default 0.1).
    assert (
        main(["eval", "--model", str(run_dir / "final"), "--reference", str(root / "base"), "--config", str(config), "--json"])
        == 0
    )
    from_config = json.loads(capsys.readouterr().out)
    assert from_config["data"] == str(data) and from_config["beta"] == 0.1 and from_config["num_examples"] == len(PAIRS)

    # The exported model scores pairs against the start model, which differs from it after training.
    assert (
        main(
            [
                "score",
                "--model",
                str(run_dir / "final"),
                "--prompt",
                "the movie was",
                "--response",
                " very good and funny.",
                "--response",
                " very bad and long.",
                "--json",
            ]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out)
    assert abs(row["rewards"][0]) > 1e-4 and 0 < row["preference_prob"] < 1

    assert (
        main(
            ["generate", "--model", str(run_dir / "checkpoint-4"), "--prompt", "the movie was", "--max-new-tokens", "4", "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["prompt"] == "the movie was"


@pytest.mark.slow
def test_sft_then_resume_continues_the_same_run(project, capsys):
    import json

    root, config, _ = project
    run_dir = root / "sft-run"
    assert main(["sft", str(config), f"logging.run_dir={run_dir}", "optim.max_steps=2"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "loss/sft" in records[0] and "rewards/accuracies" in records[0]
    assert main(["sft", str(config), f"logging.run_dir={run_dir}", "optim.max_steps=4", "--resume", "latest"]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert steps == [1, 2, 3, 4]
    # A second fresh run into the same directory is refused with a pointer to --resume.
    assert main(["sft", str(config), f"logging.run_dir={run_dir}"]) == 2
    assert "--resume latest" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_adapter_output_is_evaluated_against_its_base_with_the_adapter_disabled(project, capsys):
    import json

    root, config, data = project
    run_dir = root / "lora-run"
    assert (
        main(
            [
                "train",
                str(config),
                f"logging.run_dir={run_dir}",
                "model.lora.enabled=true",
                "model.lora.r=4",
                "model.lora.export=adapter",
                "optim.lr=1e-2",
                "checkpoint.every_steps=0",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (run_dir / "final" / "adapter_config.json").is_file()
    assert main(["eval", "--model", str(run_dir / "final"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == "base model with the adapter disabled"
    final_eval = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"][-1]
    assert result["metrics"]["rewards/margins"] == pytest.approx(final_eval["rewards/margins"], abs=1e-5)
    assert result["metrics"]["rewards/margins"] != 0


# ------------------------------------------------------------------ one source for every default


def _parse(argv: list[str]):
    return build_parser(only=argv[0]).parse_args(argv)


def test_command_defaults_are_the_library_dataclass_defaults():
    """Each command only translates arguments: its defaults are read from the typed jobs, not re-typed."""
    import dataclasses

    from dpokit.analysis.evaluate import EvalJob
    from dpokit.analysis.frontier import FrontierJob
    from dpokit.analysis.score import ScoreJob
    from dpokit.generation import GenerateJob, SamplingConfig
    from dpokit.models import LoadOptions

    generate = _parse(["generate", "--model", "m", "--prompt", "p"])
    for field in dataclasses.fields(SamplingConfig):
        assert getattr(generate, field.name) == getattr(SamplingConfig(), field.name), field.name
    assert generate.chat_template == GenerateJob(model="m").chat_template
    for name in ("dtype", "device", "trust_remote_code"):
        assert getattr(generate, name) == getattr(LoadOptions(), name)
    assert _parse(["eval", "--model", "m"]).batch_size == EvalJob(model="m").batch_size
    assert _parse(["score", "--model", "m"]).batch_size == ScoreJob(model="m").batch_size
    frontier = _parse(["frontier", "run", "--reference", "r", "--prompts", "p", "--reward", "x:y"])
    job = FrontierJob(runs=[], reference="r", prompts="p", reward="x:y")
    assert (frontier.out, frontier.num_samples, frontier.max_new_tokens, frontier.seed) == (
        job.out,
        job.num_samples,
        job.max_new_tokens,
        job.seed,
    )


def test_help_shows_the_fallbacks_of_the_training_config(capsys):
    from dpokit.config import DataConfig, LossConfig

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"the run's, else {DataConfig().max_length}" in text
    assert f"the run's loss.beta, else {LossConfig().beta}" in text


def test_frontier_betas_must_be_name_equals_number(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a\n")
    code = main(
        [
            "frontier",
            str(tmp_path),
            "--reference",
            str(tmp_path),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--reward",
            "dpokit.experiments.reward:vader_reward",
            "--beta",
            "dpo=high",
        ]
    )
    assert code == 2 and "expected NAME=NUMBER" in capsys.readouterr().err
