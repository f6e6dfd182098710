"""The vLLM engine against a real vLLM server process (tests/vllm_server.py): what it returns, and the weight
sync -- the log-probs vLLM reports for its samples are the trainer's teacher-forced log-probs of the same
tokens under the same weights, before and after an update (full weights and a LoRA adapter).

Tolerance: 1e-4 nats per token (float32 on both sides; measured differences are about 1e-6). A stale
server is told apart: after the update the old weights' log-probs of the same tokens differ by more
than 1e-2 nats on some token."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit.generation import SamplingConfig, build_engine, encode_prompts, stop_token_ids
from dpokit.online import run_online
from dpokit.online.records import RoundFiles
from dpokit.online.sync import load_adapter, reload_weights
from dpokit.training.tracking import read_metrics
from tests.online.test_rounds import make_config_overrides
from tests.vllm_server import API_KEY

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
PROMPTS = ["tell me the movie was", "why the plot is", "i liked it because"]


@pytest.fixture
def server(vllm_server, monkeypatch):
    """The session's server with its key in VLLM_API_KEY; given its base weights back afterwards."""
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    yield vllm_server
    vllm_server.restore()


def token_logps(model, prompt: list[int], completion: list[int]) -> list[float]:
    """Teacher-forced log pi(y_t | x, y_<t) of every completion token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)].log_softmax(-1)
    return steps.gather(1, torch.tensor(completion)[:, None]).squeeze(1).tolist()


def largest_gap(model, prompt_ids, completions) -> float:
    return max(
        abs(a - b)
        for c in completions
        for a, b in zip(token_logps(model, prompt_ids[c.prompt_index], c.token_ids), c.token_logprobs, strict=True)
    )


def sample(server, tokenizer, adapter: str | None = None):
    engine = build_engine("vllm", tokenizer=tokenizer, url=server.url)
    engine.adapter = adapter
    _, ids = encode_prompts(tokenizer, PROMPTS)
    return ids, engine.sample(ids, SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=3))


def test_the_vllm_engine_returns_sampled_ids_text_finish_reasons_and_the_models_logprobs(server):
    tokenizer = AutoTokenizer.from_pretrained(server.base_dir)
    model = AutoModelForCausalLM.from_pretrained(server.base_dir, dtype=torch.float32).eval()
    ids, completions = sample(server, tokenizer)
    assert [(c.prompt_index, c.sample_index) for c in completions] == [(p, k) for p in range(3) for k in range(3)]
    stops = set(stop_token_ids(tokenizer))
    for c in completions:
        assert 1 <= len(c.token_ids) <= 12 and len(c.token_logprobs) == len(c.token_ids)
        assert c.stopped == (c.token_ids[-1] in stops)  # a stop token is kept as the last sampled id
        assert c.finish_reason == ("stop" if c.stopped else "length") and (c.stopped or len(c.token_ids) == 12)
        assert c.text == tokenizer.decode(c.content_ids, skip_special_tokens=True)
    assert largest_gap(model, ids, completions) <= TOLERANCE


def test_after_a_weight_update_vllm_samples_from_the_new_weights_full_and_lora(server, tmp_path: Path):
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(server.base_dir)
    old = AutoModelForCausalLM.from_pretrained(server.base_dir, dtype=torch.float32).eval()
    ids, before = sample(server, tokenizer)
    assert largest_gap(old, ids, before) <= TOLERANCE
    # An optimizer phase: a few SFT steps on the policy, saved, and the server's weights reloaded from the save.
    new = AutoModelForCausalLM.from_pretrained(server.base_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(new.parameters(), lr=1e-2)
    batch = torch.tensor([ids[0] + ids[1]])
    for _ in range(3):
        loss = new(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    new.eval().save_pretrained(tmp_path / "full")
    reload_weights(build_engine("vllm", tokenizer=tokenizer, url=server.url), tmp_path / "full")
    _, after = sample(server, tokenizer)
    assert largest_gap(new, ids, after) <= TOLERANCE
    assert largest_gap(old, ids, after) > 1e-2  # the check tells a stale server apart
    # LoRA: the adapter loaded at run time is what vLLM samples from when asked for by name.
    server.restore()
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(server.base_dir, dtype=torch.float32), LoraConfig(r=8))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    policy.eval().save_pretrained(tmp_path / "adapter")
    engine = build_engine("vllm", tokenizer=tokenizer, url=server.url)
    load_adapter(engine, "policy-test", tmp_path / "adapter")
    _, adapted = sample(server, tokenizer, adapter="policy-test")
    assert largest_gap(policy, ids, adapted) <= TOLERANCE
    assert largest_gap(old, ids, adapted) > 1e-2


@pytest.mark.parametrize("weights", ["full", "lora"])
def test_online_rounds_on_vllm_sample_from_the_current_policy_and_keep_the_records_shape(server, tmp_path: Path, weights):
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2), encoding="utf-8")
    from tests.helpers import write_preference_jsonl

    write_preference_jsonl(assets / "heldout.jsonl", n=4, seed=1)
    overrides = make_config_overrides(assets, tmp_path / "run")
    overrides[0] = f"model.name_or_path={server.base_dir}"
    lora = ["model.lora.enabled=true", "model.lora.r=8"] if weights == "lora" else []
    from dpokit.config import load_config

    cfg = load_config(None, [*overrides, "online.sampling.engine=vllm", f"online.sampling.url={server.url}", *lora])
    result = run_online(cfg)
    records = read_metrics(result.run_dir, split="round")
    assert [r["round"] for r in records] == [0, 1]
    for r, record in enumerate(records):
        assert record["engine/logp_gap_per_token"] <= TOLERANCE, record  # vLLM sampled from the trainer's weights
        summary = RoundFiles(result.run_dir, r).summary()
        assert summary["completions"]["engine"] == "vllm" and summary["completions"]["engine/sync_s"] >= 0
        policy = RoundFiles(result.run_dir, r).path / "engine_policy"
        assert (policy / ("adapter_config.json" if weights == "lora" else "config.json")).is_file()
    completions = RoundFiles(result.run_dir, 1).read("completions")
    assert set(completions[0]) == {
        "prompt_index",
        "sample_index",
        "rank",
        "completion",
        "num_tokens",
        "stopped",
        "policy_logp",
        "reference_logp",
        "token_ids",
    }
    if weights == "lora":
        assert "Loaded new LoRA adapter: name 'policy-step-2'" in server.log_text()


def test_engine_and_sync_failures_are_one_line_naming_the_server_and_what_it_needs(server, tmp_path: Path):
    from dpokit.errors import TrainingError
    from dpokit.generation import EngineError, VllmEngine

    tokenizer = AutoTokenizer.from_pretrained(server.base_dir)
    sampling = SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=2)
    with pytest.raises(EngineError, match=r"answered HTTP 404: The model `missing` does not exist"):
        VllmEngine(server.url, model="missing", tokenizer=tokenizer).sample([[5, 6, 7]], sampling)
    with pytest.raises(EngineError, match=r"cannot reach the vLLM server at http://127.0.0.1:9/v1 .*online.sampling.url"):
        VllmEngine("http://127.0.0.1:9", tokenizer=tokenizer).sample([[5, 6, 7]], sampling)
    engine = build_engine("vllm", tokenizer=tokenizer, url=server.url + "/v1")
    with pytest.raises(TrainingError, match=r"refused to load the policy: HTTP 4\d\d.*--enable-lora"):
        load_adapter(engine, "nothing-there", tmp_path / "no-adapter")
    with pytest.raises(TrainingError, match=r"cannot reach the vLLM server at http://127.0.0.1:9 to reload"):
        reload_weights(VllmEngine("http://127.0.0.1:9/v1", tokenizer=tokenizer), tmp_path)


# ------------------------------------------------------------------ dpokit generate / winrate --engine vllm


@pytest.fixture
def keyed_server(vllm_server, monkeypatch):
    """The session's server with its key in VLLM_API_KEY (these tests change no weights: nothing to restore)."""
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    return vllm_server


def test_generate_on_vllm_samples_the_served_model_named_by_its_name_or_directory_and_refuses_another(
    keyed_server, capsys, tmp_path: Path
):
    from dpokit.commands.main import main

    engine = ["--engine", "vllm", "--engine-url", keyed_server.url]
    sampling = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "5", "--num-samples", "2", "--json"]
    for model in ("noise", str(keyed_server.base_dir)):  # the served name, or the directory the server loaded it from
        assert main(["generate", *engine, "--model", model, *sampling]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert all(r["prompt_text"] == PROMPTS[r["prompt_index"]] and 0 <= r["num_tokens"] <= 5 for r in rows)
    other = tmp_path / "elsewhere"
    other.mkdir()
    for model in ("missing", str(other)):
        assert main(["generate", *engine, "--model", model, *sampling]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1
        assert f"the vLLM server at {keyed_server.url}/v1 does not serve the model {model!r} (it serves noise, judge)" in error
    assert main(["generate", "--engine", "vllm", "--model", "noise", *sampling]) == 2
    assert "--engine vllm needs --engine-url" in capsys.readouterr().err


def test_winrate_on_vllm_keys_its_samples_by_the_engine_and_the_served_model_and_reuses_them(
    keyed_server, monkeypatch, tmp_path: Path
):
    from dpokit.analysis.winrate import WinrateJob, model_fingerprint, run_winrate
    from dpokit.generation import EngineOptions, VllmEngine

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    vllm = EngineOptions(engine="vllm", url=keyed_server.url)
    job = WinrateJob(
        models=[("judge-adapter", "judge")],  # a LoRA adapter the server serves; its tokenizer is its base's
        baseline="noise",
        prompts=str(prompts),
        judge="reward:tests.judges.fakes:length_reward",
        temperatures=[1.0],
        max_new_tokens=6,
        out=str(tmp_path / "out"),
        bootstrap_samples=50,
        progress=False,
        engine=vllm,
    )
    results = run_winrate(job)
    assert [(r["model"], r["n"]) for r in results["results"]] == [("judge-adapter", 3)]
    stored = sorted((tmp_path / "out" / "samples").rglob("*.json"))
    assert [p.parent.name for p in stored] == ["baseline", "judge-adapter"]
    assert {json.loads(p.read_text())["engine"] for p in stored} == {"vllm"}
    # A rerun samples nothing: every sample is read back under the same key.
    monkeypatch.setattr(VllmEngine, "sample", lambda *a, **k: pytest.fail("sampled again"))
    assert run_winrate(job)["results"] == results["results"]
    # The key: the engine and the served model, whichever way it is named; not the dpokit engine's key of the same weights.
    memo: dict = {}
    by_name = model_fingerprint("noise", job, memo)[0]
    assert model_fingerprint(str(keyed_server.base_dir), job, memo)[0] == by_name
    assert model_fingerprint("judge", job, memo)[0] != by_name
    here = WinrateJob(models=job.models, judge=job.judge, baseline="noise", prompts=job.prompts, out=job.out)
    assert model_fingerprint(str(keyed_server.base_dir), here, memo)[0] != by_name


def test_an_online_run_on_vllm_interrupted_mid_round_resumes_without_sampling_again_and_keeps_the_records_shape(
    server, tmp_path: Path
):
    from dpokit.config import load_config
    from dpokit.training.checkpoint import read_trainer_state
    from tests.helpers import write_preference_jsonl
    from tests.online.test_rounds import hashes

    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2), encoding="utf-8")
    write_preference_jsonl(assets / "heldout.jsonl", n=4, seed=1)
    engine = ["online.sampling.engine=vllm", f"online.sampling.url={server.url}", "online.steps_per_round=3"]

    def config(run_dir: Path):
        overrides = make_config_overrides(assets, run_dir)
        overrides[0] = f"model.name_or_path={server.base_dir}"
        return load_config(None, [*overrides, *engine])

    whole = run_online(config(tmp_path / "whole"))
    server.restore()  # the start model again, as a fresh server would have
    run_dir = tmp_path / "run"
    stopped = run_online(config(run_dir), on_step=lambda step, _: step == 4)  # round 1, after 1 of its 3 steps
    assert stopped.interrupted and read_trainer_state(stopped.last_checkpoint)["online"]["round"] == 1
    before = hashes(run_dir)
    resumed = run_online(config(run_dir), resume="latest")
    assert not resumed.interrupted and resumed.global_step == whole.global_step == 6
    assert hashes(run_dir) == before  # the round's samples were reused, not drawn again from the server
    records, reference = read_metrics(run_dir, split="round"), read_metrics(whole.run_dir, split="round")
    assert [r["round"] for r in records] == [r["round"] for r in reference] == [0, 1]
    assert [sorted(r) for r in records] == [sorted(r) for r in reference]  # the same fields as an uninterrupted run
    assert all(r["engine/logp_gap_per_token"] <= TOLERANCE for r in records)
    assert [r["step"] for r in read_metrics(run_dir, split="train")] == [1, 2, 3, 4, 5, 6]
    for r in (0, 1):
        ours, theirs = RoundFiles(run_dir, r), RoundFiles(whole.run_dir, r)
        assert [sorted(c) for c in ours.read("completions")] == [sorted(c) for c in theirs.read("completions")]
        assert sorted(ours.summary()) == sorted(theirs.summary())


def test_frontier_and_experiment_evaluation_on_vllm_load_each_checkpoint_into_the_server_and_give_the_reference_back(
    server, tmp_path: Path
):
    """dpokit frontier --engine vllm (and the experiments' evaluation, FrontierEvaluation and Best-of-N): the
    server samples each checkpoint after loading it (its log-probs equal the checkpoint's here), the KL is
    teacher-forced here on the sampled ids, and the server serves the reference's weights again at the end."""
    from dpokit.analysis.frontier import CheckpointServer, FrontierJob, run_frontier
    from dpokit.experiments.baselines import best_of_n_points
    from dpokit.experiments.results import FrontierEvaluation
    from dpokit.generation import EngineOptions
    from tests.helpers import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(server.base_dir)
    base = AutoModelForCausalLM.from_pretrained(server.base_dir, dtype=torch.float32).eval()
    checkpoint = tmp_path / "run" / "checkpoint-2" / "model"
    tiny_llama(vocab_size=base.config.vocab_size, hidden_size=128, seed=3, initializer_range=0.5).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    reward = "dpokit.experiments.reward:vader_reward"
    options = EngineOptions("vllm", server.url)
    job = FrontierJob([("other", str(tmp_path / "run"))], str(server.base_dir), str(tmp_path / "prompts.txt"), reward)
    job.out, job.num_samples, job.max_new_tokens, job.engine = str(tmp_path / "out"), 3, 8, options
    reference, other = run_frontier(job)[0]
    assert reference.engine_logp_gap <= TOLERANCE and other.engine_logp_gap <= TOLERANCE
    assert abs(reference.kl_mean) <= 1e-4 and other.kl_mean > 1.0 and other.step == 2
    assert json.loads((tmp_path / "out" / "results.json").read_text())["engine"] == "vllm"
    ids, completions = sample(server, tokenizer)
    assert largest_gap(base, ids, completions) <= TOLERANCE  # the reference's weights are back

    evaluation = FrontierEvaluation(base, tokenizer, PROMPTS, lambda prompts, completions: [1.0] * len(completions), 2, 8, 0)
    evaluation = dataclasses.replace(evaluation, server=CheckpointServer(str(server.base_dir), options))
    points, _ = evaluation.checkpoints(tmp_path / "run", method="DPO", run="other")
    assert [p.step for p in points] == [2] and points[0].kl_mean > 1.0
    evaluation.server.restore()
    by_length = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    one, two = best_of_n_points(
        base, tokenizer, PROMPTS, by_length, [1, 2], max_new_tokens=8, seed=0, engine=evaluation.server.engine
    )
    assert (one.n, two.n, one.num_samples) == (1, 2, len(PROMPTS)) and two.reward_mean >= one.reward_mean
