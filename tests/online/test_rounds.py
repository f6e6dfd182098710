"""The online loop end to end on a tiny Llama saved to disk: the files and pair counts a round's config
promises, resuming inside a round without sampling or judging again, self-labelling refused when the
labeller's policy is its reference, a judge that stays down, the per-step mode and the refreshed reference."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.config import load_config
from dpokit.errors import ConfigError, TrainingError
from dpokit.online import online_config, run_online
from dpokit.online.pairs import build_rows
from dpokit.online.records import RoundFiles
from dpokit.training.checkpoint import read_trainer_state
from dpokit.training.tracking import read_metrics
from tests.helpers import preference_rows, write_preference_jsonl, write_tiny_model_dir

COUNTING_JUDGE = "reward:tests.online.judges:counting_length_reward"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("online_assets")
    write_tiny_model_dir(root / "model")
    write_tiny_model_dir(root / "dpo_policy", seed=1)  # stands in for a policy trained away from model/
    write_preference_jsonl(root / "heldout.jsonl", n=8, seed=1)
    write_preference_jsonl(root / "offline.jsonl", n=12, seed=2)
    rows = preference_rows(10, seed=3)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows), encoding="utf-8")
    return root


def make_config(assets: Path, run_dir: Path, *overrides: str):
    return load_config(None, [*make_config_overrides(assets, run_dir), *overrides])


def make_config_overrides(assets: Path, run_dir: Path) -> list[str]:
    return [
        f"model.name_or_path={assets / 'model'}",
        f"data.eval_path={assets / 'heldout.jsonl'}",
        f"data.cache_dir={assets / 'cache'}",
        f"logging.run_dir={run_dir}",
        "optim.optimizer=adamw",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "optim.batch_size=4",
        "optim.grad_accumulation=1",
        "eval.every_steps=0",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "checkpoint.every_steps=0",
        f"online.prompts_path={assets / 'prompts.jsonl'}",
        "online.rounds=2",
        "online.prompts_per_round=4",
        "online.samples_per_prompt=3",
        "online.steps_per_round=2",
        f"online.judge={COUNTING_JUDGE}",
        "online.judge_retry_wait_s=0",
        "online.sampling.max_new_tokens=10",
    ]


@pytest.fixture
def judge_log(tmp_path, monkeypatch) -> Path:
    log = tmp_path / "judge_calls.txt"
    monkeypatch.setenv("DPOKIT_TEST_JUDGE_LOG", str(log))
    return log


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.is_file() else 0


def hashes(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run_dir / "rounds").rglob("*.jsonl"))
    }


@pytest.mark.parametrize("mode", ["best_vs_worst", "all_pairs", "ranking"])
def test_a_round_writes_exactly_the_files_and_pairs_its_config_says(assets, tmp_path, judge_log, mode):
    listwise = ["loss.terms=[{name: plackett_luce}]"] if mode == "ranking" else []
    result = run_online(make_config(assets, tmp_path / "run", f"online.pairs={mode}", "online.rounds=1", *listwise))
    files = RoundFiles(result.run_dir, 0)
    assert sorted(p.name for p in files.path.iterdir()) == [
        f"{s}.jsonl" for s in ("completions", "judgments", "pairs", "prompts")
    ] + ["round.json"]
    prompts, completions, judgments = files.read("prompts"), files.read("completions"), files.read("judgments")
    assert len(prompts) == 4 and len(completions) == len(judgments) == 4 * 3
    assert [(c["prompt_index"], c["sample_index"]) for c in completions] == [(p, s) for p in range(4) for s in range(3)]
    # The pairs are exactly what the pair mode makes of the judged completions.
    texts = [[c["completion"] for c in completions[3 * p : 3 * p + 3]] for p in range(4)]
    scores = [[j["score"] for j in judgments[3 * p : 3 * p + 3]] for p in range(4)]
    stopped = [[c["stopped"] for c in completions[3 * p : 3 * p + 3]] for p in range(4)]
    expected, report = build_rows([p["prompt"] for p in prompts], texts, scores, mode=mode, stopped=stopped)
    assert files.read("pairs") == expected
    # Each response carries whether its sample was cut off at max_new_tokens (10 tokens: most are).
    assert all(row["truncated"] == [not stopped[row["prompt_index"]][k] for k in row["sample_indices"]] for row in expected)
    assert any(any(row["truncated"]) for row in expected)
    ties = report.dropped["tie"]
    usable = [len({t for t in texts[p] if t.strip()}) for p in range(4)]  # distinct non-empty completions per prompt
    if mode == "all_pairs":  # K (K - 1) / 2 pairs per prompt, minus ties (and repeats, which are no pair)
        assert len(expected) + ties == sum(n * (n - 1) // 2 for n in usable)
    else:  # one pair / one ranking per prompt unless it tied
        assert len(expected) + ties == sum(1 for n in usable if n >= 2)
        assert all(len(r["responses"]) == (2 if mode == "best_vs_worst" else usable[r["prompt_index"]]) for r in expected)
    assert calls(judge_log) == 1  # one judge call per round, all completions at once
    summary = files.summary()
    assert summary["stages"] == ["prompts", "completions", "judgments", "pairs"]
    assert summary["pairs"]["pairs"] == len(expected)
    (record,) = read_metrics(result.run_dir, split="round")
    assert record["round"] == 0 and record["step"] == 2 and record["pairs"] == len(expected)
    for key in (
        "judge/score_mean",
        "kl",
        "completion/eos_rate",
        "distinct_2",
        "generation/tokens_per_s",
        "heldout/rewards/accuracies",
    ):
        assert key in record
    assert result.output_dir is not None and (result.output_dir / "config.json").is_file()


def test_resume_inside_a_round_neither_samples_nor_judges_again(assets, tmp_path, judge_log):
    run_dir = tmp_path / "run"
    cfg = make_config(assets, run_dir, "online.steps_per_round=3", "checkpoint.every_steps=1")
    stopped = run_online(cfg, on_step=lambda step, _: step == 4)  # round 1, after 1 of its 3 steps
    assert stopped.interrupted and stopped.global_step == 4
    state = read_trainer_state(stopped.last_checkpoint)
    assert state["online"] == {"round": 1, "round_start_step": 3, "steps_per_round": 3}
    before, judged = hashes(run_dir), calls(judge_log)
    assert judged == 2 and len(before) == 8

    resumed = run_online(cfg, resume="latest")
    assert not resumed.interrupted and resumed.global_step == 6
    assert hashes(run_dir) == before  # no round file rewritten
    assert calls(judge_log) == judged  # the judge was not asked again
    assert [r["round"] for r in read_metrics(run_dir, split="round")] == [0, 1]
    assert [r["step"] for r in read_metrics(run_dir, split="train")] == [1, 2, 3, 4, 5, 6]


def test_offline_pairs_are_mixed_in_at_the_configured_fraction(assets, tmp_path, judge_log):
    cfg = make_config(
        assets, tmp_path / "run", f"data.train_path={assets / 'offline.jsonl'}", "online.offline_fraction=0.5", "online.rounds=1"
    )
    result = run_online(cfg)
    files = RoundFiles(result.run_dir, 0)
    assert len(files.read("offline")) == len(files.read("pairs"))
    assert all(row["source"].startswith(str(assets / "offline.jsonl")) for row in files.read("offline"))


def test_rankings_with_a_pairwise_loss_are_refused_before_sampling(assets, tmp_path):
    with pytest.raises(ConfigError, match="plackett_luce"):
        online_config(make_config(assets, tmp_path / "run", "online.pairs=ranking"))


def test_self_labelling_with_the_reference_as_labeller_is_refused(assets, tmp_path):
    with pytest.raises(ConfigError, match="every implicit reward would be 0"):
        online_config(make_config(assets, tmp_path / "a", "online.judge=self", "online.reference=refresh"))
    with pytest.raises(ConfigError, match="round 0 every implicit reward"):
        online_config(make_config(assets, tmp_path / "b", "online.judge=self"))
    model = assets / "model"
    with pytest.raises(ConfigError, match="same model, so every implicit reward is 0"):
        online_config(make_config(assets, tmp_path / "c", f"online.judge=implicit:{model},reference={model}"))


def test_an_implicit_judge_whose_policy_is_its_reference_stops_the_run(assets, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(assets / "model", twin)  # the same weights at another path: only the rewards can tell
    cfg = make_config(assets, tmp_path / "run", f"online.judge=implicit:{twin},reference={assets / 'model'},beta=0.1")
    with pytest.raises(TrainingError, match="implicit reward of 0"):
        run_online(cfg)


def test_self_labelling_scores_are_the_policys_implicit_reward(assets, tmp_path):
    cfg = make_config(
        assets,
        tmp_path / "run",
        f"model.name_or_path={assets / 'dpo_policy'}",
        f"reference.name_or_path={assets / 'model'}",
        "online.judge=self",
        "online.rounds=1",
        "loss.beta=0.5",
    )
    result = run_online(cfg)
    files = RoundFiles(result.run_dir, 0)
    for completion, judgment in zip(files.read("completions"), files.read("judgments"), strict=True):
        assert judgment["score"] == pytest.approx(0.5 * (completion["policy_logp"] - completion["reference_logp"]))
    assert any(abs(j["score"]) > 1e-3 for j in files.read("judgments"))


def test_a_judge_that_stays_down_stops_with_a_checkpoint_and_the_resume_keeps_the_samples(assets, tmp_path, judge_log):
    run_dir = tmp_path / "run"
    down = "openai:judge@http://127.0.0.1:9/v1,max_retries=0,timeout=2"  # port 9 (discard): nothing listens
    cfg = make_config(assets, run_dir, f"online.judge={down}", "online.judge_retries=1")
    with pytest.raises(TrainingError) as failure:
        run_online(cfg)
    message = str(failure.value)
    assert "online round 0: judge openai:judge@http://127.0.0.1:9/v1" in message and "failed 2 time(s)" in message
    assert "checkpoint-0" in message and "--resume latest" in message
    files = RoundFiles(run_dir, 0)
    assert files.has("completions") and not files.has("judgments")
    sampled = hashes(run_dir)

    resumed = run_online(make_config(assets, run_dir), resume="latest")  # the judge is back (another spec)
    assert resumed.global_step == 4
    assert {k: v for k, v in hashes(run_dir).items() if k in sampled} == sampled
    assert calls(judge_log) == 2


def test_the_per_step_mode_is_one_generate_judge_update_cycle_per_step(assets, tmp_path, judge_log):
    result = run_online(
        make_config(assets, tmp_path / "run", "online.steps_per_round=1", "online.rounds=3", "online.prompts_per_round=2")
    )
    assert result.global_step == 3 and calls(judge_log) == 3
    assert [r["step"] for r in read_metrics(result.run_dir, split="round")] == [1, 2, 3]


def test_a_refreshed_reference_is_the_policy_at_the_round_start(assets, tmp_path, judge_log):
    result = run_online(make_config(assets, tmp_path / "run", "online.reference=refresh", "reference.strategy=copy"))
    first, second = (RoundFiles(result.run_dir, r).read("completions") for r in (0, 1))
    # Each round's reference is the policy that samples it, so every sample's log-ratio is 0.
    assert all(c["policy_logp"] == pytest.approx(c["reference_logp"], abs=1e-4) for c in first + second)
    assert (RoundFiles(result.run_dir, 1).path / "reference.safetensors").is_file()
    assert not (RoundFiles(result.run_dir, 0).path / "reference.safetensors").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_two_processes_sample_disjoint_prompt_shards_and_train_on_the_union(assets, tmp_path):
    from tests.training.test_parallel import check_ok, free_port

    run_dir = tmp_path / "run"
    overrides = make_config_overrides(assets, run_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    command += ["-m", "dpokit", "online", str(assets / "empty.yaml"), *overrides, "online.prompts_per_round=5"]
    (assets / "empty.yaml").write_text("{}\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    check_ok(subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=REPO))
    for r in range(2):
        completions = RoundFiles(run_dir, r).read("completions")
        by_rank = {rank: {c["prompt_index"] for c in completions if c["rank"] == rank} for rank in (0, 1)}
        assert by_rank == {0: {0, 1, 2}, 1: {3, 4}}  # contiguous shards, disjoint, together every prompt
        pairs = RoundFiles(run_dir, r).read("pairs")
        assert {p["prompt_index"] for p in pairs} & by_rank[0] and {p["prompt_index"] for p in pairs} & by_rank[1]
    assert [r["step"] for r in read_metrics(run_dir, split="train")] == [1, 2, 3, 4]
    assert [r["round"] for r in read_metrics(run_dir, split="round")] == [0, 1]


def test_resuming_from_an_earlier_round_sets_the_later_rounds_files_aside(assets, tmp_path, judge_log):
    run_dir = tmp_path / "run"
    cfg = make_config(
        assets, run_dir, "online.rounds=3", "online.steps_per_round=1", "checkpoint.every_steps=1", "checkpoint.keep_last=3"
    )
    run_online(cfg)
    first = hashes(run_dir)
    resumed = run_online(cfg, resume=str(run_dir / "checkpoint-1"))  # the end of round 0
    assert resumed.global_step == 3
    # Round 1 was sampled from exactly the checkpoint's weights: reused. Round 2 came from the abandoned branch.
    assert {k: v for k, v in hashes(run_dir).items() if "round-0001" in k} == {
        k: v for k, v in first.items() if "round-0001" in k
    }
    assert len(list((run_dir / "abandoned").glob("round-0002.*"))) == 1
    assert calls(judge_log) == 3 + 1
    assert [r["round"] for r in read_metrics(run_dir, split="round")] == [0, 1, 2]  # round 0 not logged twice
