"""Malformed command-line inputs, run through the real ``dpokit`` entry point: each case ends in a
one-line located error (exit 2, no traceback) or a documented acceptance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.commands.main import main
from tests.helpers import write_tiny_model_dir

PAIRS = [
    ("the movie was", " very good and funny.", " very bad and long."),
    ("i think the plot", " is wonderful.", " is boring."),
    ("tell me about the actor", " he is great.", " he is awful."),
    ("the music", " was the best.", " was the worst."),
]
DEEP = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "a", "rejected": "b"}'
SURROGATE = '{"prompt": "x\\ud800y", "chosen": "a", "rejected": "b"}'


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_inputs")
    model = write_tiny_model_dir(root / "model")
    good = "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    paths = {"root": root, "model": model}
    for name, text in {
        "good.jsonl": good,
        "deep.jsonl": good + DEEP + "\n",
        "surrogate.jsonl": good + SURROGATE + "\n",
        "prompts.txt": "hello there\n",
        "deep_prompts.jsonl": '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        "surrogate_prompts.jsonl": '{"prompt": "a\\udc00"}\n',
    }.items():
        (root / name).write_text(text, encoding="utf-8")
        paths[name] = root / name
    (root / "latin1.txt").write_bytes(b"caf\xe9\n")
    paths["latin1.txt"] = root / "latin1.txt"
    blocked = root / "blocked_template"
    write_tiny_model_dir(blocked)
    config = json.loads((blocked / "tokenizer_config.json").read_text())
    template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    config["chat_template"] = template
    (blocked / "tokenizer_config.json").write_text(json.dumps(config))
    if (blocked / "chat_template.jinja").exists():
        (blocked / "chat_template.jinja").write_text(template)
    paths["blocked"] = blocked
    paths["pickled"] = _pickled_model_dir(root)
    (root / "empty.yaml").write_text("{}\n", encoding="utf-8")
    paths["empty.yaml"] = root / "empty.yaml"
    (root / "a_file").write_text("not a directory\n", encoding="utf-8")
    paths["a_file"] = root / "a_file"
    return paths


class _RunsCode:
    """Unpickling this calls ``pathlib.Path.touch`` on a marker file: what a crafted weights file asks for."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_model_dir(root: Path) -> Path:
    """A tiny model whose weights are a pytorch_model.bin that asks to run code when unpickled."""
    import torch

    directory = write_tiny_model_dir(root / "pickled")
    (directory / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _RunsCode(root / "code_ran")}, directory / "pytorch_model.bin")
    return directory


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out
    return code, err


# (id, argv with {name} placeholders for the fixture's files, message fragment)
USAGE_CASES = [
    (
        "eval_batch_size_0",
        ["eval", "--model", "{model}", "--data", "{good.jsonl}", "--batch-size", "0"],
        "argument --batch-size: must be at least 1, got 0",
    ),
    (
        "score_batch_size_0",
        ["score", "--model", "{model}", "--input", "{good.jsonl}", "--batch-size", "0"],
        "argument --batch-size: must be at least 1, got 0",
    ),
    (
        "eval_limit_0",
        ["eval", "--model", "{model}", "--data", "{good.jsonl}", "--limit", "0"],
        "argument --limit: must be at least 1, got 0",
    ),
    (
        "eval_max_length_text",
        ["eval", "--model", "{model}", "--max-length", "ten"],
        "argument --max-length: expected a whole number, got 'ten'",
    ),
    (
        "generate_top_k_negative",
        ["generate", "--model", "{model}", "--prompt", "hi", "--top-k", "-1"],
        "argument --top-k: must be at least 0, got -1",
    ),
    (
        "generate_num_samples_0",
        ["generate", "--model", "{model}", "--prompt", "hi", "--num-samples", "0"],
        "argument --num-samples: must be at least 1, got 0",
    ),
    (
        "generate_max_new_tokens_0",
        ["generate", "--model", "{model}", "--prompt", "hi", "--max-new-tokens", "0"],
        "argument --max-new-tokens: must be at least 1",
    ),
]

ERROR_CASES = [
    (
        "generate_latin1_prompts",
        ["generate", "--model", "{model}", "--prompts-file", "{latin1.txt}"],
        "latin1.txt:line 1: not valid UTF-8 (byte 4 of the file)",
    ),
    (
        "generate_deep_prompts",
        ["generate", "--model", "{model}", "--prompts-file", "{deep_prompts.jsonl}"],
        "deep_prompts.jsonl:line 1: malformed JSON (nested too deeply",
    ),
    (
        "generate_surrogate_prompt",
        ["generate", "--model", "{model}", "--prompts-file", "{surrogate_prompts.jsonl}"],
        "surrogate_prompts.jsonl:line 1: field 'prompt' holds a lone surrogate",
    ),
    (
        "generate_sandboxed_template",
        ["generate", "--model", "{blocked}", "--prompt", "hi", "--chat-template", "always", "--device", "cpu"],
        "the tokenizer's chat template failed on the prompt 'user: hi': SecurityError: access to attribute '__class__'",
    ),
    (
        "eval_deep_row",
        ["eval", "--model", "{model}", "--data", "{deep.jsonl}", "--reference-free", "--device", "cpu"],
        "deep.jsonl:line 5: malformed JSON (nested too deeply",
    ),
    (
        "eval_surrogate_row",
        ["eval", "--model", "{model}", "--data", "{surrogate.jsonl}", "--reference-free", "--device", "cpu"],
        "surrogate.jsonl:line 5: field 'prompt': character 2 is a lone surrogate",
    ),
    (
        "score_deep_row",
        ["score", "--model", "{model}", "--input", "{deep.jsonl}", "--reference-free", "--device", "cpu"],
        "deep.jsonl:line 5: malformed JSON (nested too deeply",
    ),
    (
        "score_surrogate_row",
        ["score", "--model", "{model}", "--input", "{surrogate.jsonl}", "--reference-free", "--device", "cpu"],
        "surrogate.jsonl:line 5: field 'prompt' holds a lone surrogate",
    ),
    (
        "eval_pickled_weights",
        ["eval", "--model", "{pickled}", "--data", "{good.jsonl}", "--reference-free", "--device", "cpu"],
        "pytorch_model.bin is not loaded because it asks to run code when unpickled",
    ),
    (
        "train_negative_seed",
        ["train", "{empty.yaml}", "model.name_or_path=m", "data.train_path=d.jsonl", "optim.seed=-1"],
        "optim.seed must be a whole number in [0, 2**32) (numpy and torch take no other), got -1",
    ),
    (
        "train_seed_2_to_the_70",
        ["train", "{empty.yaml}", "model.name_or_path=m", "data.train_path=d.jsonl", f"optim.seed={2**70}"],
        f"optim.seed must be a whole number in [0, 2**32) (numpy and torch take no other), got {2**70}",
    ),
    (
        "winrate_out_inside_a_file",
        [
            "winrate",
            "--model",
            "{model}",
            "--baseline",
            "{model}",
            "--prompts",
            "{prompts.txt}",
            "--judge",
            "reward:tests.judges.fakes:length_reward",
            "--out",
            "{a_file}/out",
            "--no-progress",
        ],
        "a_file/out: Not a directory (NotADirectoryError at ",
    ),  # fmt: skip
    (
        "eval_missing_model_dir",
        ["eval", "--model", "runs/x/checkpoint-200", "--data", "{good.jsonl}"],
        "runs/x/checkpoint-200: no such file or directory",
    ),
    (
        "eval_missing_reference_dir",
        ["eval", "--model", "{model}", "--reference", "runs/sft/final", "--data", "{good.jsonl}", "--device", "cpu"],
        "runs/sft/final: no such file or directory",
    ),
    (
        "eval_missing_relative_data",
        ["eval", "--model", "{model}", "--data", "data/missing.jsonl", "--reference-free", "--device", "cpu"],
        "data/missing.jsonl: no such file or directory",
    ),
]


def _fill(argv: list[str], files: dict[str, Path]) -> list[str]:
    """Each ``{name}`` (or ``{name}/rest``) argument with the fixture's path of that name."""
    filled = []
    for arg in argv:
        if arg.startswith("{") and "}" in arg:
            name, rest = arg[1:].split("}", 1)
            arg = str(files[name]) + rest
        filled.append(arg)
    return filled


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES])
def test_bad_argument_values_are_usage_errors(files, argv, message, capsys):
    code, err = _run(_fill(argv, files), capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_inputs_are_one_line_located_errors(files, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(files["root"])
    code, err = _run(_fill(argv, files), capsys)
    assert code == 2 and err.startswith("error: ") and message in err
    assert not (files["root"] / "code_ran").exists()  # a crafted weights file was refused, not run


def test_an_unforeseen_exception_is_one_line_naming_where_it_was_raised_and_dpokit_debug_shows_it(files, capsys, monkeypatch):
    argv = ["generate", "--model", "{model}", "--prompt", "hi", "--max-new-tokens", "2", "--output", "{a_file}/x.jsonl"]
    argv = _fill(argv, files)
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith(f"error: {files['a_file']}: ") and err.count("\n") == 1
    assert "dpokit/commands/generate.py:" in err and "DPOKIT_DEBUG=1" in err
    monkeypatch.setenv("DPOKIT_DEBUG", "1")
    with pytest.raises(OSError):
        main(argv)


def test_eval_skips_deep_and_surrogate_rows_with_skip_invalid_and_counts_them(files, capsys, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("data: {skip_invalid: true}\n")
    for name in ("deep.jsonl", "surrogate.jsonl"):
        argv = ["eval", "--model", str(files["model"]), "--data", str(files[name]), "--reference-free", "--config", str(config)]
        try:
            code = main([*argv, "--device", "cpu", "--json"])
        finally:
            captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "Traceback" not in captured.err
        assert json.loads(captured.out)["num_examples"] == len(PAIRS)  # every valid row kept
        assert "skipped 1 invalid rows" in captured.err
        assert ("malformed_json" if name == "deep.jsonl" else "not_utf8") in captured.err
