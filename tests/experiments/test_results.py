"""The experiments' shared results: typed frontier points, the store of finished runs, the evaluation of a
run directory's checkpoints, and best-of-n samples handed to the win-rate run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from dpokit.analysis.frontier import FrontierPoint
from dpokit.experiments.results import FrontierEvaluation, ResultStore, StoredRun, remove_checkpoints
from tests.helpers import write_tiny_model_dir

DOCS = Path(__file__).resolve().parents[2] / "docs"
POINT = FrontierPoint(
    method="DPO", run="dpo-beta0.1", step=4, beta=0.1, reward_mean=0.5, reward_sem=0.02, kl_mean=1.5, kl_sem=0.1, num_samples=12
)


@pytest.mark.parametrize("results", ["sentiment/results.json", "online/results.json"])
def test_the_published_results_points_read_as_frontier_points_and_write_back_the_same(results):
    points = json.loads((DOCS / results).read_text())["points"]
    for data in points:
        # Best-of-N's points were written without a beta; it comes back as None, everything else as it was.
        assert FrontierPoint.from_dict(data).to_dict() == {"beta": None, **data}


def test_a_best_of_n_point_keeps_its_n_and_has_no_mean_length():
    point = dataclasses.replace(POINT, method="Best-of-N", run="best-of-n", beta=None, n=4, step=4)
    assert point.to_dict()["n"] == 4 and "mean_length" not in point.to_dict()
    assert FrontierPoint.from_dict(point.to_dict()) == point


def test_a_stored_run_reads_back_under_the_same_settings_only(tmp_path):
    stored = StoredRun(
        points=[POINT], seconds=3.5, samples=[{"prompt": "a", "completion": "b"}], rounds=[{"round": 0}], measures=[{"step": 1}]
    )
    ResultStore(tmp_path, "key1").save("dpo", stored)
    assert ResultStore(tmp_path, "key1").load("dpo") == stored
    assert ResultStore(tmp_path, "key2").load("dpo") is None
    assert ResultStore(tmp_path, "key1").load("other") is None


def test_a_run_stored_by_the_sentiment_experiment_before_rounds_were_stored_still_reads(tmp_path):
    old = {"settings_key": "k", "points": [POINT.to_dict()], "seconds": 2.0, "samples": []}
    (tmp_path / "dpo.json").write_text(json.dumps(old))
    assert ResultStore(tmp_path, "k").load("dpo") == StoredRun(points=[POINT], seconds=2.0)


@pytest.mark.parametrize("text", ['{"settings_key": "k", "points": [', '{"settings_key": "k", "points": [{"run": "x"}]}', "[]"])
def test_a_damaged_stored_run_is_run_again_with_the_file_named(tmp_path, text):
    (tmp_path / "dpo.json").write_text(text)
    lines: list[str] = []
    assert ResultStore(tmp_path, "k", log=lines.append).load("dpo") is None
    assert len(lines) == 1 and str(tmp_path / "dpo.json") in lines[0] and "running dpo again" in lines[0]


def test_online_arms_stored_in_the_older_layout_are_run_again(tmp_path):
    """The online experiment kept its final samples under "final" before; those files carry the settings
    hash of that time, which the current key no longer matches."""
    from dpokit.experiments.online import MODES, OnlineExperiment

    settings = MODES["smoke"]
    old_key = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()).hexdigest()[:10]
    old = {"settings_key": old_key, "points": [POINT.to_dict()], "seconds": 1.0, "final": {"samples": []}, "rounds": []}
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / "offline.json").write_text(json.dumps(old))
    experiment = OnlineExperiment(settings, tmp_path, tmp_path / "cache", log=None)
    assert experiment.key() != old_key and experiment.store.load("offline") is None


def _length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def _evaluation(reference_dir: Path) -> FrontierEvaluation:
    from dpokit.models import LoadOptions, load_policy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = load_policy(reference_dir, LoadOptions(dtype="float32", device=device))
    prompts = ["the cat sat", "a good film", "it was"]
    return FrontierEvaluation(
        reference.model, reference.tokenizer, prompts, _length_reward, samples_per_prompt=2, max_new_tokens=5, seed=3
    )


def test_every_checkpoint_with_a_step_is_evaluated_in_order_with_the_last_ones_samples(tmp_path):
    run = tmp_path / "run"
    write_tiny_model_dir(run / "checkpoint-2" / "model", seed=0)
    write_tiny_model_dir(run / "checkpoint-4" / "model", seed=1)
    write_tiny_model_dir(run / "final", seed=1)  # no step: left out
    evaluation = _evaluation(run / "checkpoint-2" / "model")
    lines: list[str] = []
    points, samples = evaluation.checkpoints(
        run, method="DPO", run="dpo", beta=0.1, step_offset=10, keep_samples=4, log=lines.append
    )
    assert [(p.method, p.run, p.step, p.beta) for p in points] == [("DPO", "dpo", 12, 0.1), ("DPO", "dpo", 14, 0.1)]
    assert points[0].kl_mean == pytest.approx(0.0, abs=1e-4)  # the reference's own weights
    assert abs(points[1].kl_mean) > 1e-3 and all(p.num_samples == 6 for p in points)
    last, last_samples = evaluation.estimate(
        _load(run / "checkpoint-4" / "model", evaluation.device), method="DPO", run="dpo", step=14, beta=0.1, keep_samples=4
    )
    assert samples == last_samples and len(samples) == 4 and points[1] == last
    assert lines == [f"  dpo step {p.step}: reward {p.reward_mean:.3f}  KL {p.kl_mean:.2f}" for p in points]
    remove_checkpoints(run, keep_steps=(4,))
    assert not (run / "checkpoint-2").exists() and (run / "checkpoint-4").exists() and (run / "final").exists()


def _load(path: Path, device: str) -> torch.nn.Module:
    from dpokit.models import LoadOptions, load_policy

    return load_policy(path, LoadOptions(dtype="float32", device=device)).model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on a CPU every model is on the CPU")
def test_checkpoints_are_evaluated_on_the_reference_models_device(tmp_path):
    """A checkpoint loaded anywhere else than beside the reference could not be compared with it."""
    run = tmp_path / "run"
    write_tiny_model_dir(run / "checkpoint-1" / "model", seed=0)
    evaluation = _evaluation(run / "checkpoint-1" / "model")
    points, _ = evaluation.checkpoints(run, method="DPO", run="dpo")
    assert evaluation.device.startswith("cuda") and points[0].kl_mean == pytest.approx(0.0, abs=1e-4)


def test_best_of_n_samples_stored_for_the_win_rate_run_are_read_back_without_loading_a_model(tmp_path):
    """Best-of-N has no weights: its samples are stored under a path of its own and sample_model must find
    them there rather than try to load that path (it did, once win-rate samples were keyed by weights)."""
    from dpokit.analysis.winrate import WinrateJob, sample_model, store_samples

    job = WinrateJob(models=[], judge="reward:x:y", temperatures=[0.5, 1.0], samples_per_prompt=2, out=str(tmp_path / "out"))
    prompts = ["p1", "p2"]
    completions = {0.5: [["a", "b"], ["c", "d"]], 1.0: [["e", "f"], ["g", "h"]]}
    path = str(tmp_path / "sft#best-of-4")
    store_samples("Best-of-4", path, prompts, job, completions, seed=7)
    advanced: list[int] = []
    read = sample_model("Best-of-4", path, prompts, job, seed=7, advance=lambda: advanced.append(1))
    assert read == completions and len(advanced) == 2
