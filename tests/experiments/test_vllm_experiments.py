"""The experiments with ``--engine vllm``, against the test session's vLLM server (tests/vllm_server.py).

The server serves a tiny untied Llama, not the experiments' pretrained GPT-2, so each experiment here starts
from that Llama as its SFT model (``sft=``: the model, its tokenizer and the directory the server loaded it
from) at smoke size. What is pinned: every sample the evaluation takes comes from the server with the
weights of the model being evaluated (``engine_logp_gap`` within 1e-4 nats per token, the online rounds'
gap too), the win rates' samples are stored as the server's and keyed apart from the dpokit engine's, the
stored results are keyed by the engine, and the server serves the SFT model's weights again at the end.
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
