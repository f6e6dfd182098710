"""Damaged files of finished runs, through the real ``dpokit`` entry point: every file of an online round
and of a win-rate output directory is damaged in turn (cut mid-line, last line deleted, garbage bytes),
and the rerun either rebuilds it -- with the same training rows, losses and win rates as before -- or
stops with one located ``error:`` line (exit 2, no traceback). Never a traceback, never a different result.

One finished run of each kind is made per module and copied for each case."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dpokit.commands.main import main
from dpokit.training.tracking import read_metrics
from tests.helpers import preference_rows, write_preference_jsonl, write_tiny_model_dir

COUNTING_JUDGE = "reward:tests.online.judges:counting_length_reward"
LENGTH = "reward:tests.judges.fakes:length_reward"
DAMAGES = ("cut_mid_line", "last_line_deleted", "garbage_bytes")


def damage(path: Path, how: str) -> None:
    """Damage ``path`` in place: ``how`` is one of :data:`DAMAGES`."""
    data = path.read_bytes()
    if how == "cut_mid_line":  # the last line of two characters or more, cut in its middle
        lines = data.rstrip(b"\n").split(b"\n")
        last = max(i for i, line in enumerate(lines) if len(line) >= 2)
        path.write_bytes(b"".join(line + b"\n" for line in lines[:last]) + lines[last][: len(lines[last]) // 2])
    elif how == "last_line_deleted":
        lines = data.rstrip(b"\n").split(b"\n")
        path.write_bytes(b"".join(line + b"\n" for line in lines[:-1]))
    else:
        middle = len(data) // 2
        path.write_bytes(data[:middle] + b"\xff\xfe\x00garbage" + data[middle + 10 :])


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return code, captured.err


def digests(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob(pattern))}


# ------------------------------------------------------------------------------------- online rounds


@pytest.fixture(scope="module")
def online_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished two-round online run (with offline rows mixed in) and a checkpoint after every step; the
    command-line arguments that continue it (``logging.run_dir`` appended per case)."""
    root = tmp_path_factory.mktemp("corrupt_online")
    write_tiny_model_dir(root / "model")
    write_preference_jsonl(root / "heldout.jsonl", n=4, seed=1)
    write_preference_jsonl(root / "offline.jsonl", n=6, seed=2)
    rows = preference_rows(8, seed=3)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows), encoding="utf-8")
    (root / "empty.yaml").write_text("{}\n", encoding="utf-8")
    argv = ["online", str(root / "empty.yaml")]
    argv += [
        f"model.name_or_path={root / 'model'}",
        f"data.eval_path={root / 'heldout.jsonl'}",
        f"data.train_path={root / 'offline.jsonl'}",
        "online.offline_fraction=0.25",
        f"data.cache_dir={root / 'cache'}",
        "optim.optimizer=adamw",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "optim.batch_size=4",
        "eval.every_steps=0",
        "eval.max_examples=4",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=4",
        f"online.prompts_path={root / 'prompts.jsonl'}",
        "online.rounds=2",
        "online.prompts_per_round=4",
        "online.samples_per_prompt=3",
        "online.steps_per_round=2",
        f"online.judge={COUNTING_JUDGE}",
        "online.judge_retry_wait_s=0",
        "online.sampling.max_new_tokens=8",
    ]
    run_dir = root / "run"
    assert main([*argv, f"logging.run_dir={run_dir}"]) == 0
    return run_dir, argv


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, split="train")}


ROUND_FILES = ("prompts.jsonl", "completions.jsonl", "judgments.jsonl", "pairs.jsonl", "offline.jsonl", "round.json")


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ROUND_FILES)
def test_a_damaged_round_file_at_the_rounds_start_is_rebuilt_and_trains_the_same(online_run, tmp_path, name, how, capsys, caplog):
    """Resuming at the start of round 1 (checkpoint-2) with one of its files damaged: the file is set aside
    and made again -- identical, since the weights that made it are the checkpoint's -- and steps 3-4 train
    on the same rows with the same losses as the uninterrupted run."""
    source, argv = online_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    original_files, original_losses = digests(run_dir / "rounds", "*.jsonl"), train_losses(run_dir)
    damage(run_dir / "rounds" / "round-0001" / name, how)
    code, err = run_cli([*argv, f"logging.run_dir={run_dir}", "--resume", str(run_dir / "checkpoint-2")], capsys)
    assert code == 0, err
    assert f"{run_dir / 'rounds' / 'round-0001' / name}" in caplog.text  # the warning names the damaged file
    assert digests(run_dir / "rounds", "*.jsonl") == original_files
    assert train_losses(run_dir) == pytest.approx(original_losses, rel=1e-6)
    assert (run_dir / "rounds" / "round-0001" / "damaged").is_dir()


@pytest.mark.parametrize("name", ["completions.jsonl", "judgments.jsonl"])
def test_samples_or_scores_lost_inside_a_round_stop_the_resume_with_the_file_named(online_run, tmp_path, name, capsys):
    """Resuming inside round 1 (checkpoint-3, one of its two steps done) with a row of its completions or
    judgments lost: they cannot be made again from the weights that made them, so the run stops and says
    which file and what to do, instead of training on fewer rows."""
    source, argv = online_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    damage(run_dir / "rounds" / "round-0001" / name, "last_line_deleted")
    code, err = run_cli([*argv, f"logging.run_dir={run_dir}", "--resume", str(run_dir / "checkpoint-3")], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert f"{run_dir / 'rounds' / 'round-0001' / name}: 11 " in err
    assert "checkpoint-2" in err and "restore the file" in err


def test_a_pairs_row_lost_inside_a_round_is_rebuilt_from_completions_and_judgments(online_run, tmp_path, capsys, caplog):
    """The last line of round 1's pairs.jsonl deleted, resumed inside the round with --resume latest
    (checkpoint-3 once checkpoint-4 is gone): the pairs are made again from the round's completions and
    judgments, and step 4 trains on all of them."""
    source, argv = online_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    original_files, original_losses = digests(run_dir / "rounds", "*.jsonl"), train_losses(run_dir)
    shutil.rmtree(run_dir / "checkpoint-4")
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    pairs = run_dir / "rounds" / "round-0001" / "pairs.jsonl"
    recorded = json.loads((pairs.parent / "round.json").read_text())["pairs"]["rows"]
    damage(pairs, "last_line_deleted")
    code, err = run_cli([*argv, f"logging.run_dir={run_dir}", "--resume", "latest"], capsys)
    assert code == 0, err
    assert f"{pairs}: {recorded - 1} rows, but" in caplog.text and f"records {recorded}" in caplog.text
    assert digests(run_dir / "rounds", "*.jsonl") == original_files
    assert train_losses(run_dir) == pytest.approx(original_losses, rel=1e-6)


def test_an_interrupted_first_round_is_not_offered_a_resume_it_cannot_do(online_run, tmp_path, capsys):
    """A run stopped in round 0 before any checkpoint: the fresh-run message and --resume latest agree --
    there is nothing to continue, start afresh with --overwrite."""
    source, argv = online_run
    run_dir = tmp_path / "run"
    (run_dir / "rounds").mkdir(parents=True)
    shutil.copytree(source / "rounds" / "round-0000", run_dir / "rounds" / "round-0000")
    (run_dir / "rounds" / "round-0000" / "pairs.jsonl").unlink()
    code, fresh = run_cli([*argv, f"logging.run_dir={run_dir}"], capsys)
    assert code == 2 and "--overwrite" in fresh and "--resume latest" not in fresh
    code, resumed = run_cli([*argv, f"logging.run_dir={run_dir}", "--resume", "latest"], capsys)
    assert code == 2 and "no complete checkpoint" in resumed and "start the run afresh with --overwrite" in resumed
    assert run_cli([*argv, f"logging.run_dir={run_dir}", "--overwrite"], capsys)[0] == 0


# ---------------------------------------------------------------------------------- win-rate outputs


@pytest.fixture(scope="module")
def winrate_run(tmp_path_factory) -> tuple[Path, list[str], dict]:
    """A finished win-rate run (model vs baseline at one temperature), its arguments (``--out`` appended
    per case) and its results."""
    root = tmp_path_factory.mktemp("corrupt_winrate")
    write_tiny_model_dir(root / "a", seed=0)
    write_tiny_model_dir(root / "b", seed=1)
    (root / "prompts.txt").write_text("the movie\na plot\ni liked\n", encoding="utf-8")
    argv = ["winrate", "--model", f"a={root / 'a'}", "--baseline", str(root / "b"), "--prompts", str(root / "prompts.txt")]
    argv += ["--judge", LENGTH, "--temperatures", "0", "1", "--max-new-tokens", "5", "--ci", "wilson", "--no-progress"]
    out = root / "out"
    assert main([*argv, "--out", str(out)]) == 0
    return out, argv, json.loads((out / "results.json").read_text())["results"]


@pytest.mark.slow
def test_every_damaged_file_of_a_winrate_run_is_rebuilt_with_the_same_results(winrate_run, tmp_path, capsys, caplog):
    source, argv, results = winrate_run
    capsys.readouterr()
    names = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    assert {"judgments.jsonl", "results.json", "weight_digests.json"} <= set(names) and len(names) >= 8
    for name in names:
        for how in DAMAGES:
            out = tmp_path / f"{name.replace('/', '_')}-{how}"
            shutil.copytree(source, out)
            damage(out / name, how)
            caplog.clear()
            code, err = run_cli([*argv, "--out", str(out)], capsys)
            assert code == 0, (name, how, err)
            assert json.loads((out / "results.json").read_text())["results"] == results, (name, how)
            if name.startswith("samples/") or (name == "judgments.jsonl" and how != "last_line_deleted"):
                assert f"{out / name}" in caplog.text, (name, how, caplog.text)  # the warning names what is redone
