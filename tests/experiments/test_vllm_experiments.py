"""The experiments with ``--engine vllm``, against the test session's vLLM server (tests/vllm_server.py).

The server serves a tiny untied Llama, not the experiments' pretrained GPT-2, so each experiment here starts
from that Llama as its SFT model (``sft=``: the model, its tokenizer and the directory the server loaded it
from) at smoke size. What is pinned: every sample the evaluation takes comes from the server with the
weights of the model being evaluated (``engine_logp_gap`` within 1e-4 nats per token; the online rounds'
gap too), the win rates' samples are stored as the server's and keyed apart from the dpokit engine's, the
stored results are keyed by the engine, and the server serves the SFT model's weights again at the end.
The over-optimisation experiment runs the online experiment's ground-truth arm (OnlineExperiment, rounds on
the server), so the online experiment's other arms, which take no other route, are not run again here
(tests/experiments/test_online.py checks that its rounds are configured for the server).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit.analysis.frontier import CheckpointServer
from dpokit.generation import EngineOptions, VllmEngine
from tests.generation.test_vllm_engine import TOLERANCE, largest_gap, sample
from tests.vllm_server import API_KEY

pytestmark = pytest.mark.slow


@pytest.fixture
def server(vllm_server, monkeypatch):
    """The session's server with its key in VLLM_API_KEY; given its base weights back afterwards."""
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    yield vllm_server
    vllm_server.restore()


@pytest.fixture
def sft(server):
    """The server's model as the experiments' SFT model: (model, tokenizer, directory)."""
    model = AutoModelForCausalLM.from_pretrained(server.base_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(server.base_dir), Path(server.base_dir)


@pytest.fixture
def served(monkeypatch):
    """The directories loaded into the server (CheckpointServer.serve), in order."""
    paths: list[Path] = []
    serve = CheckpointServer.serve

    def recording(self, path, name):
        paths.append(Path(path))
        return serve(self, path, name)

    monkeypatch.setattr(CheckpointServer, "serve", recording)
    return paths


@pytest.fixture
def estimated(monkeypatch):
    """Every point FrontierEvaluation.estimate returns (references included), in order."""
    from dpokit.experiments.results import FrontierEvaluation

    points: list = []
    estimate = FrontierEvaluation.estimate

    def recording(self, *args, **kwargs):
        point, samples = estimate(self, *args, **kwargs)
        points.append(point)
        return point, samples

    monkeypatch.setattr(FrontierEvaluation, "estimate", recording)
    return points


def characters(prompts, completions, **_):
    """A judge for the online rounds that ties rarely (VADER scores the random model's text alike: rounds without pairs)."""
    return [float(len(c)) for c in completions]


def assert_sampled_by_the_server(points) -> None:
    """Every point but Best-of-N's (analytic KL, no log-probs) with the server's log-probs within TOLERANCE of its own."""
    gaps = [p.engine_logp_gap for p in points if p.method != "Best-of-N"]
    assert gaps and all(gap is not None and gap <= TOLERANCE for gap in gaps), [
        (p.run, p.step, p.engine_logp_gap) for p in points
    ]


def assert_reference_served_again(server, tokenizer, model) -> None:
    ids, completions = sample(server, tokenizer)
    assert largest_gap(model, ids, completions) <= TOLERANCE


def test_sentiment_experiment_on_vllm_samples_its_points_and_win_rates_on_the_server_keyed_apart(
    server, sft, served, tmp_path, monkeypatch
):
    from dpokit.analysis.winrate import WinrateJob, model_fingerprint
    from dpokit.experiments.sentiment import MODES, Experiment

    settings = dataclasses.replace(
        MODES["smoke"], methods=("dpo", "best-of-n"), warmup_steps=0, winrate_temperatures=(1.0,), judge_check_prompts=4
    )
    options = EngineOptions("vllm", server.url)
    experiment = Experiment(settings, tmp_path / "out", tmp_path / "cache", engine=options, sft=sft)
    result = experiment.run()
    assert_sampled_by_the_server(result.points)
    assert {p.method for p in result.points} == {"SFT (reference)", "DPO", "Best-of-N"}
    stored = json.loads((tmp_path / "out" / "points" / "dpo-beta0.1.json").read_text())
    assert stored["settings_key"] == experiment.store.key
    assert experiment.store.key != Experiment(settings, tmp_path / "out", tmp_path / "cache", sft=sft).store.key
    # The win rates: the final model was loaded into the server and sampled there, and so were the SFT
    # baseline and Best-of-N's pool; their stored samples are the server's, under keys the dpokit engine
    # would not find for the same weights.
    final = tmp_path / "out" / "runs" / "dpo-beta0.1" / "final"
    assert final in served
    assert result.winrate is not None
    assert {r["model"] for r in result.winrate.results} == {"DPO β=0.1", "Best-of-2"}
    samples = sorted((tmp_path / "out" / "winrate" / "samples").rglob("*.json"))
    assert {p.parent.name for p in samples} == {"DPO β=0.1", "Best-of-2", "baseline", "sft-pool"}
    assert {json.loads(p.read_text())["engine"] for p in samples} == {"vllm"}
    record = json.loads(next(p for p in samples if p.parent.name == "DPO β=0.1").read_text())
    here = WinrateJob(models=[], judge="reward:x:y", out=str(tmp_path / "out" / "winrate"))
    assert record["weights"] != model_fingerprint(str(final), here, {})[0]
    assert_reference_served_again(server, sft[1], sft[0])
    # Asked again, the stage reads every sample back.
    monkeypatch.setattr(VllmEngine, "sample", lambda *a, **k: pytest.fail("sampled again"))
    assert experiment.run_winrates() == result.winrate


def test_overoptimisation_experiment_on_vllm_samples_the_sweep_and_the_online_arm_on_the_server(
    server, sft, estimated, tmp_path, monkeypatch
):
    """The DPO sweep leaves a checkpoint in the server; the online arm (the online experiment's ground-truth arm,
    through OnlineExperiment) then samples its SFT point from the SFT model's weights again, its rounds on the
    server from the policy's, and its checkpoints there."""
    from dpokit.experiments import overoptimisation
    from dpokit.experiments.overoptimisation import MODES, OveroptimisationExperiment

    monkeypatch.setattr(overoptimisation, "VADER_JUDGE", f"reward:{__name__}:characters")
    options = EngineOptions("vllm", server.url)
    experiment = OveroptimisationExperiment(MODES["smoke"], tmp_path / "out", tmp_path / "cache", engine=options, sft=sft)
    result = experiment.run()
    assert_sampled_by_the_server(estimated)
    assert [p.run for p in estimated].count("sft") == 2 and estimated[-1].run == "online-gt"
    assert set(result.curves) == {"dpo-beta0.1", "online-gt"}
    rounds = result.curves["online-gt"]["rounds"]
    assert rounds and all(r["engine/logp_gap_per_token"] <= TOLERANCE for r in rounds)
    assert experiment.store.key != OveroptimisationExperiment(MODES["smoke"], tmp_path, tmp_path, sft=sft).store.key
    assert_reference_served_again(server, sft[1], sft[0])


def test_ood_experiment_on_vllm_samples_both_distributions_and_its_win_rates_on_the_server(
    server, sft, estimated, served, tmp_path
):
    from dpokit.experiments.ood import MODES, OodExperiment

    settings = dataclasses.replace(MODES["smoke"], rl_betas=())  # DPO only: RLOO adds no other sampling route
    options = EngineOptions("vllm", server.url)
    experiment = OodExperiment(settings, tmp_path / "out", tmp_path / "cache", engine=options, sft=sft)
    result = experiment.run()
    assert_sampled_by_the_server(estimated)
    shifted = set(experiment.frontiers["shifted"].prompts)
    assert {p.run for p in estimated} == {"sft", "dpo-beta0.1"} and len(estimated) == 2 + 2 * 2  # both distributions
    policy = result.policies[0]
    assert served.count(Path(policy.model_dir)) == 4  # the two frontiers, then the win rates on each distribution
    for distribution in ("in-distribution", "shifted"):
        samples = sorted((tmp_path / "out" / "winrate" / distribution / "vs-sft" / "samples").rglob("*.json"))
        assert {p.parent.name for p in samples} == {policy.label, "baseline"}
        assert {json.loads(p.read_text())["engine"] for p in samples} == {"vllm"}
    assert {r["distribution"] for r in result.winrates} == {"in-distribution", "shifted"} and shifted
    assert experiment.store.key != OodExperiment(settings, tmp_path, tmp_path, sft=sft).store.key
    assert_reference_served_again(server, sft[1], sft[0])
