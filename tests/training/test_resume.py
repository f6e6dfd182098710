"""The run directory and resuming: one run per directory, no silent reuse, no silently changed run.

Each test drives the real trainer on a tiny Llama (see ``tests/training/test_trainer.py``'s fixture)
and asserts the exact outcome: a located refusal, a documented acceptance, or an exact resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpokit.commands.train import exit_code, print_run_result
from dpokit.errors import ConfigError, TrainingError
from dpokit.rundir import LOCK_FILENAME
from dpokit.training import run
from dpokit.training.checkpoint import list_checkpoints
from dpokit.training.parallel import ParallelContext
from dpokit.training.resume import RunDirectory, _lock
from dpokit.training.tracking import read_metrics
from dpokit.training.trainer import RunResult
from tests.helpers import write_preference_jsonl, write_tiny_model_dir
from tests.training.test_trainer import make_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_assets")
    write_tiny_model_dir(root / "model")
    write_preference_jsonl(root / "train.jsonl", n=32, seed=0)
    return root


def stopped_at(assets: Path, run_dir: Path, step: int, *overrides: str):
    return run(make_config(assets, run_dir, "optim.max_steps=6", *overrides), on_step=lambda s, m: s == step)


def test_a_fresh_run_refuses_a_used_run_dir_and_overwrite_starts_it_afresh(assets, tmp_path):
    run_dir = tmp_path / "run"
    run(make_config(assets, run_dir, "optim.max_steps=2"))  # no checkpoint, but metrics.jsonl
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match=r"already holds an earlier run \(.*metrics.jsonl.*--overwrite"):
        run(make_config(assets, run_dir, "optim.max_steps=3"))
    result = run(make_config(assets, run_dir, "optim.max_steps=3"), overwrite=True)
    assert [r["step"] for r in read_metrics(run_dir, split="train")] == [1, 2, 3]  # one record per step
    assert result.global_step == 3 and (run_dir / "notes.txt").read_text() == "mine"  # only run records removed
    with pytest.raises(ConfigError, match="give one of them"):
        run(make_config(assets, run_dir, "optim.max_steps=3"), overwrite=True, resume="latest")


def test_a_run_dir_in_use_is_refused_naming_the_holder(assets, tmp_path):
    run_dir = tmp_path / "run"
    held = _lock(run_dir)
    try:
        with pytest.raises(TrainingError, match=r"in use by pid \d+ \(dpokit train"):
            run(make_config(assets, run_dir, "optim.max_steps=1"))
    finally:
        held.close()
    assert run(make_config(assets, run_dir, "optim.max_steps=1")).global_step == 1  # free again
    assert not (run_dir / LOCK_FILENAME).exists()  # the lock file lives only while a run holds it


def test_a_run_dir_that_is_a_file_and_outputs_inside_the_model_are_refused(assets, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run(make_config(assets, tmp_path / "file", "optim.max_steps=1"))
    with pytest.raises(ConfigError, match="output_dir .* is inside the starting model's directory"):
        run(make_config(assets, tmp_path / "run", "optim.max_steps=1", f"output_dir={assets / 'model'}"))
    with pytest.raises(ConfigError, match="logging.run_dir .* is inside the starting model's directory"):
        run(make_config(assets, assets / "model" / "runs", "optim.max_steps=1"))


def test_a_refused_resume_leaves_the_run_config_untouched(assets, tmp_path):
    """optim.lr cannot change on resume (the optimizer and schedule state belong to the old one); the
    refusal names it, and config.yaml still records the run as it started."""
    run_dir = tmp_path / "run"
    stopped_at(assets, run_dir, 2, "checkpoint.every_steps=2")
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(TrainingError, match=r"optim.lr: 0.001 -> 0.002"):
        run(make_config(assets, run_dir, "optim.max_steps=6", "optim.lr=2e-3"), resume="latest")
    assert (run_dir / "config.yaml").read_text() == before
    assert not list(run_dir.glob("config.resume-*.yaml"))


def test_an_accepted_resume_applies_and_reports_changed_settings_and_keeps_its_config_beside(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    stopped_at(assets, run_dir, 2)
    before = (run_dir / "config.yaml").read_text()
    result = run(make_config(assets, run_dir, "optim.max_steps=4", "logging.progress_bar=true"), resume="latest")
    assert result.global_step == 4  # max_steps 6 -> 4 applied
    err = capsys.readouterr().err
    assert "changed settings applied from now on" in err and "optim.max_steps: 6 -> 4" in err
    assert (run_dir / "config.yaml").read_text() == before
    assert "max_steps: 4" in (run_dir / "config.resume-2.yaml").read_text()


def test_resume_refuses_swapped_data_and_replaced_weights_at_the_same_paths(assets, tmp_path):
    """The checkpoint records fingerprints of the training data (contents, tokenization) and of the
    starting weights: the same paths with other contents are not the same run."""
    data = tmp_path / "train.jsonl"
    shutil.copy(assets / "train.jsonl", data)
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    overrides = (f"data.train_path={data}", f"model.name_or_path={model}")
    stopped_at(assets, tmp_path / "run", 2, *overrides)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    with pytest.raises(TrainingError, match="training data fingerprint"):
        run(make_config(assets, tmp_path / "run", "optim.max_steps=6", *overrides), resume="latest")
    shutil.copy(assets / "train.jsonl", data)
    write_tiny_model_dir(model, seed=7)  # other weights, same architecture, same path
    with pytest.raises(TrainingError, match="starting weights fingerprint"):
        run(make_config(assets, tmp_path / "run", "optim.max_steps=6", *overrides), resume="latest")


def test_resuming_an_older_checkpoint_abandons_the_later_branch(assets, tmp_path):
    """Resume from checkpoint-2 of a run that reached checkpoint-4: checkpoint-4 is moved aside (so
    --resume latest continues the new branch) and metrics.jsonl has one record per step."""
    run_dir = tmp_path / "run"
    run(make_config(assets, run_dir, "optim.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5"))
    resumed = run(
        make_config(assets, run_dir, "optim.max_steps=3", "checkpoint.every_steps=2", "checkpoint.keep_last=5"),
        resume=str(run_dir / "checkpoint-2"),
    )
    assert resumed.global_step == 3
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert [p.name.split(".")[0] for p in (run_dir / "abandoned").iterdir()] == ["checkpoint-4"]
    assert [r["step"] for r in read_metrics(run_dir, split="train")] == [1, 2, 3]


def test_an_interrupted_run_exits_non_zero_and_says_where_its_checkpoint_is(tmp_path, capsys):
    result = RunResult(
        run_dir=tmp_path,
        output_dir=None,
        global_step=8,
        interrupted=True,
        stop_reason="SIGTERM",
        last_checkpoint=tmp_path / "checkpoint-8",
    )
    assert exit_code(result) == 143
    assert exit_code(RunResult(run_dir=tmp_path, output_dir=None, global_step=1, interrupted=True, stop_reason="SIGINT")) == 130
    assert exit_code(RunResult(run_dir=tmp_path, output_dir=None, global_step=1, interrupted=True, stop_reason="on_step")) == 3
    assert exit_code(RunResult(run_dir=tmp_path, output_dir=tmp_path / "final", global_step=9)) == 0
    print_run_result(result)
    out = capsys.readouterr().out
    assert "interrupted by SIGTERM after 8 optimizer steps" in out and "checkpoint-8" in out and "--resume latest" in out


def test_the_run_directory_lock_is_released_when_the_run_ends(tmp_path):
    from dpokit.config import TrainConfig

    cfg = TrainConfig()
    cfg.logging.run_dir = str(tmp_path / "run")
    first = RunDirectory.open(cfg, ParallelContext(), resume=None)
    with pytest.raises(TrainingError, match="in use by"):
        RunDirectory.open(cfg, ParallelContext(), resume=None)
    first.close()
    RunDirectory.open(cfg, ParallelContext(), resume=None).close()


def test_a_run_that_cannot_start_releases_its_run_directory(assets, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError):
        run(make_config(assets, run_dir, "optim.max_steps=1", "reference.strategy=none"))  # refused in set-up
    assert run(make_config(assets, run_dir, "optim.max_steps=1")).global_step == 1


def _train_command(assets: Path, run_dir: Path, *overrides: str, config: Path) -> int:
    """``dpokit train`` (the real command line, in this process) on the test config, written to
    ``config``; its exit code."""
    from dpokit.commands.main import main
    from dpokit.config import save_config

    save_config(make_config(assets, run_dir, "optim.max_steps=1"), config)
    try:
        return main(["train", str(config), *overrides])
    except SystemExit as exit_:
        return int(exit_.code or 0)


def test_a_run_that_fails_at_data_loading_leaves_no_run_directory_and_no_lock_file(assets, tmp_path, capsys):
    """The run directory (and the ``runs/`` parent the run made for it) is created when the run starts;
    bad data found during set-up removes both again, so there is no empty directory to clean up."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', encoding="utf-8")
    run_dir = tmp_path / "runs" / "exp"
    assert _train_command(assets, run_dir, f"data.train_path={bad}", config=tmp_path / "config.yaml") == 2
    assert "bad.jsonl:line 2" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # A bad model name fails before the data is read; nothing is left either.
    missing_model = f"model.name_or_path={tmp_path / 'no-such-model'}"
    assert _train_command(assets, run_dir, missing_model, config=tmp_path / "config.yaml") == 2
    assert not (tmp_path / "runs").exists()
    # The same directory is then usable at once (no "already holds an earlier run").
    assert _train_command(assets, run_dir, config=tmp_path / "config.yaml") == 0
    assert list_checkpoints(run_dir) == [] and (run_dir / "final" / "config.json").is_file()
    assert not (run_dir / LOCK_FILENAME).exists()


def test_a_failed_run_keeps_a_directory_that_existed_before_and_removes_only_its_lock(assets, tmp_path, capsys):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    assert _train_command(assets, run_dir, f"data.train_path={bad}", config=tmp_path / "config.yaml") == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    capsys.readouterr()


def test_a_failed_run_keeps_a_directory_it_created_once_it_holds_results(assets, tmp_path):
    """A run that fails after it wrote checkpoints keeps its directory: only the lock goes."""
    run_dir = tmp_path / "runs" / "exp"

    def fail_at_step_two(step: int, metrics: dict[str, float]) -> bool:
        if step == 2:
            raise TrainingError("stopped by the test at step 2")
        return False

    with pytest.raises(TrainingError, match="stopped by the test"):
        run(make_config(assets, run_dir, "optim.max_steps=4", "checkpoint.every_steps=1"), on_step=fail_at_step_two)
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-1", "checkpoint-2"]
    assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / LOCK_FILENAME).exists()


def _flip_a_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_latest_skips_a_damaged_checkpoint_naming_it_and_continues_from_the_newest_intact(assets, tmp_path, caplog):
    """Flipped bytes in the newest checkpoint's weights load without error, so only the manifest's
    checksums can catch them: the resume warns, names the file, and continues from checkpoint-2."""
    run_dir = tmp_path / "run"
    common = ("checkpoint.every_steps=2", "checkpoint.keep_last=5")
    straight = run(make_config(assets, tmp_path / "straight", "optim.max_steps=6"))
    run(make_config(assets, run_dir, "optim.max_steps=6", *common), on_step=lambda s, m: s == 4)
    _flip_a_byte(run_dir / "checkpoint-4" / "model" / "model.safetensors")
    with caplog.at_level("WARNING"):
        resumed = run(make_config(assets, run_dir, "optim.max_steps=6", *common), resume="latest")
    assert "checkpoint-4 is damaged (model/model.safetensors has changed since it was written" in caplog.text
    assert resumed.global_step == 6
    expected = [loss for _, loss in read_losses(straight.run_dir)]
    assert [loss for _, loss in read_losses(run_dir)] == pytest.approx(expected, rel=1e-5)
    damaged = next((run_dir / "abandoned").iterdir())  # set aside as the abandoned branch, still damaged
    with pytest.raises(TrainingError, match=r"is damaged \(model/model.safetensors has changed"):
        run(make_config(assets, tmp_path / "other", "optim.max_steps=6"), resume=str(damaged))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.safetensors", "model/model.safetensors"])
def test_a_truncated_file_in_a_checkpoint_without_manifest_is_a_located_error(assets, tmp_path, name):
    run_dir = tmp_path / "run"
    run(make_config(assets, run_dir, "optim.max_steps=4", "checkpoint.every_steps=2"), on_step=lambda s, m: s == 2)
    checkpoint = run_dir / "checkpoint-2"
    (checkpoint / "manifest.json").unlink()  # as written before manifests existed: nothing to verify against
    target = checkpoint / name
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(TrainingError, match=r"checkpoint-2'.*cannot be read .*damaged"):
        run(make_config(assets, run_dir, "optim.max_steps=4", "checkpoint.every_steps=2"), resume="latest")


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir, split="train")]


def test_a_full_disk_during_a_checkpoint_is_a_located_error_and_the_last_checkpoint_stays_intact(assets, tmp_path, monkeypatch):
    import errno

    from dpokit.training import checkpoint as checkpoint_module

    run_dir = tmp_path / "run"
    real = checkpoint_module._write_training_state
    calls = []

    def fills_the_disk(directory, scheduler, state):
        calls.append(state["global_step"])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "scheduler.pt"))
        real(directory, scheduler, state)

    monkeypatch.setattr(checkpoint_module, "_write_training_state", fills_the_disk)
    cfg = ("optim.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    with pytest.raises(
        TrainingError,
        match=r"could not write the checkpoint of step 4 .*No space left on device.*"
        r"checkpoint-2, is intact\. free some space",
    ):
        run(make_config(assets, run_dir, *cfg))
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]  # no .tmp- left
    monkeypatch.setattr(checkpoint_module, "_write_training_state", real)
    assert run(make_config(assets, run_dir, *cfg), resume="latest").global_step == 6


def test_a_refused_write_of_the_config_or_the_final_model_is_a_located_error(assets, tmp_path, monkeypatch):
    import errno

    import dpokit.models
    from dpokit.training import resume as resume_module

    def denied(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied", "somewhere")

    monkeypatch.setattr(resume_module, "save_config", denied)
    with pytest.raises(TrainingError, match=r"could not write the run's config.yaml .*Permission denied.*make it writable"):
        run(make_config(assets, tmp_path / "a", "optim.max_steps=1"))
    monkeypatch.undo()
    monkeypatch.setattr(dpokit.models, "save_final_model", denied)
    with pytest.raises(TrainingError, match=r"could not write the final model into .*final'.*Permission denied"):
        run(make_config(assets, tmp_path / "b", "optim.max_steps=1"))


def test_a_run_without_a_configured_run_dir_writes_its_data_report_into_the_time_stamped_one(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_config(assets, tmp_path / "unused", "optim.max_steps=1")
    cfg.logging.run_dir = None
    result = run(cfg)
    assert result.run_dir.parent == Path("runs") and (tmp_path / result.run_dir / "data_report.json").is_file()
