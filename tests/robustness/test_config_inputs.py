"""Malformed training configs and data through ``dpokit train``: a located one-line error before any
step, or a run that skips what it must and says so (printed with the progress bar off, and written to
``<run_dir>/data_report.json``)."""

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
SHARED = " the" * 30


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("config_inputs")
    write_tiny_model_dir(root / "model")
    good = "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    (root / "good.jsonl").write_text(good, encoding="utf-8")
    (root / "messy.jsonl").write_text(good + DEEP + "\n" + SURROGATE + "\n", encoding="utf-8")
    same = "".join(
        json.dumps({"prompt": f"question {i}", "chosen": SHARED + " good.", "rejected": SHARED + " bad."}) + "\n"
        for i in range(3)
    )
    (root / "same_after_cut.jsonl").write_text(same, encoding="utf-8")
    (root / "some_same_after_cut.jsonl").write_text(good + same, encoding="utf-8")
    (root / "config.yaml").write_text(
        f"model: {{name_or_path: {root / 'model'}, device: cpu}}\n"
        f"data: {{train_path: {root / 'good.jsonl'}, max_length: 16, max_prompt_length: 8, cache_dir: {root / 'cache'}}}\n"
        "optim: {optimizer: adamw, lr: 1.0e-3, warmup_steps: 0, batch_size: 2, grad_accumulation: 1, max_steps: 1}\n"
        "eval: {every_steps: 0}\n"
        "logging: {log_every: 1, progress_bar: false, tensorboard: false, plot: false}\n"
        "checkpoint: {every_steps: 0}\n"
    )
    return root


def _train(project: Path, overrides: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(project)
    try:
        code = main(["train", str(project / "config.yaml"), *overrides])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return code, captured.err


# (id, overrides, message fragment); {root} is the project directory
ERROR_CASES = [
    ("negative_weight", ["loss.terms=[{name: sigmoid, weight: -1.0}]"], "loss.terms[0].weight must be >= 0, got -1.0"),
    ("all_zero_weights", ["loss.terms=[{name: sigmoid, weight: 0}]"], "every loss term has weight 0"),
    ("missing_relative_data", ["data.train_path=data/train.jsonl"], "data/train.jsonl: no such file or directory"),
    (
        "missing_model_dir",
        ["model.name_or_path=runs/sft/checkpoint-9"],
        "model.name_or_path: runs/sft/checkpoint-9: no such file or directory",
    ),
    ("missing_reference_dir", ["reference.name_or_path=./ref"], "./ref: no such file or directory"),
    ("bad_row_without_skip", ["data.train_path={root}/messy.jsonl"], "messy.jsonl:line 5: malformed JSON (nested too deeply"),
    (
        "mapped_column_missing",
        ["data.columns={question: prompt}"],
        "the column 'question' that data.columns maps to 'prompt' is not in the row",
    ),
    ("all_identical_after_cut", ["data.train_path={root}/same_after_cut.jsonl"], "dropped 3: identical_after_truncation"),
]


@pytest.mark.parametrize(("overrides", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_train_refuses_with_a_located_error(project, overrides, message, capsys, monkeypatch, tmp_path):
    overrides = [o.replace("{root}", str(project)) for o in overrides] + [f"logging.run_dir={tmp_path / 'run'}"]
    code, err = _train(project, overrides, capsys, monkeypatch)
    assert code == 2 and "\nerror: " in "\n" + err and message in err, err


def test_train_skips_bad_rows_and_drops_identical_pairs_and_says_so(project, capsys, monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    for data, expect in (
        ("messy.jsonl", "skipped 2 invalid rows"),
        ("some_same_after_cut.jsonl", "dropped 3: identical_after_truncation"),
    ):
        overrides = [f"data.train_path={project / data}", "data.skip_invalid=true", f"logging.run_dir={run_dir}", "--overwrite"]
        code, err = _train(project, overrides, capsys, monkeypatch)
        assert code == 0, err
        assert expect in err  # printed with the progress bar off
        report = json.loads((run_dir / "data_report.json").read_text())
        assert report["train"]["path"] == str(project / data)
        if data == "messy.jsonl":
            assert report["train"]["read"]["skipped"] == {"malformed_json": 1, "not_utf8": 1}
            assert report["train"]["read"]["examples"] == len(PAIRS)  # no valid row dropped
        else:
            assert report["train"]["tokenize"]["dropped"] == {"identical_after_truncation": 3}
            assert report["train"]["tokenize"]["examples_out"] == len(PAIRS)
