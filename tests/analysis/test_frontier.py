"""The reward/KL estimator against cases with known answers, and the frontier outputs."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from dpokit.analysis.frontier import (
    FrontierPoint,
    best_of_n_kl,
    dominance_summary,
    estimate_reward_kl,
    find_checkpoints,
    read_frontier_prompts,
    write_results,
)
from dpokit.errors import ConfigError, DataError
from dpokit.generation import DpokitEngine, completion_logps, sample_completions, sample_with_kl
from dpokit.scoring import load_reward
from tests.helpers import tiny_gpt2, tiny_tokenizer


class FixedLogits(torch.nn.Module):
    """A hand-built "language model": the same next-token logits at every position, whatever the context."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("fixed", torch.tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        n, t = input_ids.shape
        return SimpleNamespace(logits=self.fixed.expand(n, t, -1).clone())


def bernoulli_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def logits_for(p_token1: float) -> list[float]:
    return [math.log(1 - p_token1), math.log(p_token1)]


def test_kl_over_fixed_length_two_token_sequences_matches_the_analytic_value():
    """Two tokens, no EOS, L = 6 steps, i.i.d. tokens: pi(1) = 0.7, pi_ref(1) = 0.4.

    KL per token = 0.7 ln(0.7/0.4) + 0.3 ln(0.3/0.6) = 0.3917 - 0.2079 = 0.1838 nats, so the
    sequence KL is 6 * 0.1838 = 1.103 nats. The per-sample log-ratio has variance 6 * Var_token
    (~6 * 0.21) so 4000 samples give a standard error of ~0.018; we allow 4 s.e.
    """
    policy, reference = FixedLogits(logits_for(0.7)), FixedLogits(logits_for(0.4))
    prompts = [[0, 1]] * 4000
    _, kls = sample_with_kl(
        policy, reference, prompts, max_new_tokens=6, stop_token_ids=[], pad_token_id=0, seed=0, batch_size=1000
    )
    expected = 6 * bernoulli_kl(0.7, 0.4)
    assert expected == pytest.approx(1.1025, abs=1e-3)
    standard_error = kls.std().item() / math.sqrt(len(kls))
    assert abs(kls.mean().item() - expected) < 4 * standard_error


def test_kl_with_eos_counts_each_step_only_while_the_sequence_is_alive():
    """Token 1 is EOS. pi stops with probability a = 0.3 per step, pi_ref with b = 0.1, at most L = 5 steps.

    Step t is taken with probability (1 - a)^t, and contributes KL(Bern(a) || Bern(b)) then:
    KL = sum_{t=0..4} 0.7^t * [0.3 ln 3 + 0.7 ln(0.7/0.9)] = 2.7731 * 0.15366 = 0.4261 nats.
    Tokens after EOS must not count -- counting them would give 5 * 0.15366 = 0.768.
    """
    a, b, steps = 0.3, 0.1, 5
    policy, reference = FixedLogits(logits_for(a)), FixedLogits(logits_for(b))
    completions, kls = sample_with_kl(
        policy, reference, [[0]] * 6000, max_new_tokens=steps, stop_token_ids=[1], pad_token_id=0, seed=1, batch_size=2000
    )
    completions = [c.token_ids for c in completions]
    expected = sum((1 - a) ** t for t in range(steps)) * bernoulli_kl(a, b)
    assert expected == pytest.approx(0.4261, abs=1e-3)
    standard_error = kls.std().item() / math.sqrt(len(kls))
    assert abs(kls.mean().item() - expected) < 4 * standard_error
    # Completions stop right after their EOS; their mean length is sum_t 0.7^t = 2.773.
    assert all(c.count(1) <= 1 and (1 not in c or c[-1] == 1) for c in completions)
    assert sum(map(len, completions)) / len(completions) == pytest.approx(2.773, abs=0.06)


def test_policy_equal_to_reference_gives_exactly_zero_kl():
    tokenizer = tiny_tokenizer()
    policy = tiny_gpt2(vocab_size=len(tokenizer))
    reference = copy.deepcopy(policy)  # equal weights, a different object: every term must still be 0
    result = estimate_reward_kl(
        policy,
        reference,
        tokenizer,
        ["the movie was", "i", "a great story and"],
        lambda prompts, completions: [1.0] * len(prompts),
        num_samples=3,
        max_new_tokens=8,
        seed=0,
    )
    assert result["kl_mean"] == 0.0 and result["kl_sem"] == 0.0
    assert result["reward_mean"] == 1.0 and result["num_samples"] == 9


def test_a_policy_different_from_the_reference_has_positive_kl_and_reward_is_the_given_function():
    tokenizer = tiny_tokenizer()
    # A large init scale makes the two random models' next-token distributions far apart.
    policy = tiny_gpt2(vocab_size=len(tokenizer), seed=1, initializer_range=0.5)
    reference = tiny_gpt2(vocab_size=len(tokenizer), seed=2, initializer_range=0.5)
    result = estimate_reward_kl(
        policy,
        reference,
        tokenizer,
        ["the movie was", "i liked"] * 8,
        lambda prompts, completions: [float(len(c)) for c in completions],
        num_samples=2,
        max_new_tokens=6,
        seed=0,
        keep_samples=3,
    )
    assert result["kl_mean"] > 5 * result["kl_sem"]
    assert [s["reward"] for s in result["samples"]] == [float(len(s["completion"])) for s in result["samples"]]


def test_sampling_log_probs_agree_with_teacher_forcing_across_left_padded_prompts():
    """The cached incremental sampler and the padded one-shot forward must see the same positions/mask."""
    tokenizer = tiny_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer))
    prompt_ids = [tokenizer(p)["input_ids"] for p in ["a", "the movie was very good and", "i liked it"]]
    samples = sample_completions(
        model, prompt_ids, max_new_tokens=7, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, seed=3
    )
    completions, sampled = [c.token_ids for c in samples], [c.sampling_logp for c in samples]
    forced = completion_logps(model, prompt_ids, completions, pad_token_id=tokenizer.pad_token_id)
    assert torch.allclose(forced, torch.tensor(sampled, dtype=torch.float64), atol=1e-4)
    # Each row equals the unpadded forward of that prompt alone.
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completions, strict=True)):
        alone = completion_logps(model, [prompt], [completion], pad_token_id=tokenizer.pad_token_id)
        assert alone.item() == pytest.approx(forced[i].item(), abs=1e-4)


def test_same_seed_gives_the_same_estimate():
    tokenizer = tiny_tokenizer()
    policy, reference = tiny_gpt2(vocab_size=len(tokenizer), seed=1), tiny_gpt2(vocab_size=len(tokenizer), seed=2)
    reward = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    first = estimate_reward_kl(policy, reference, tokenizer, ["the", "a good"], reward, 2, 5, seed=7)
    second = estimate_reward_kl(policy, reference, tokenizer, ["the", "a good"], reward, 2, 5, seed=7)
    assert first == second


def test_an_engine_sampling_the_policy_gives_the_in_process_estimate_scored_on_its_sampled_ids():
    """The engine route (--engine) samples through engine.sample and teacher-forces both models on the sampled
    ids; with dpokit's engine on the policy it draws the same samples, so the estimate is the in-process one."""
    tokenizer = tiny_tokenizer()
    policy = tiny_gpt2(vocab_size=len(tokenizer), seed=1, initializer_range=0.5)
    reference = tiny_gpt2(vocab_size=len(tokenizer), seed=2, initializer_range=0.5)
    reward = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    args = (policy, reference, tokenizer, ["the movie was", "i liked", "a"] * 3, reward, 2, 6)
    direct = estimate_reward_kl(*args, seed=4, keep_samples=18)
    through = estimate_reward_kl(*args, seed=4, keep_samples=18, engine=DpokitEngine(policy, tokenizer))
    assert [s["completion"] for s in through["samples"]] == [s["completion"] for s in direct["samples"]]
    assert through["reward_mean"] == direct["reward_mean"] and through["mean_length"] == direct["mean_length"]
    assert through["kl_mean"] == pytest.approx(direct["kl_mean"], abs=1e-5) and direct["kl_mean"] > 0.5
    assert through["engine_logp_gap"] is None  # dpokit's engine reports no per-token log-probs to compare


def test_best_of_n_kl_is_zero_for_one_sample_and_grows_like_log_n():
    """KL(best-of-n || base) = log n - (n-1)/n: 0 for n = 1, ln 2 - 1/2 = 0.193 for n = 2."""
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)


def point(method: str, kl: float, reward: float, **fields) -> FrontierPoint:
    """A frontier point with no standard errors unless given."""
    defaults = dict(run=method, step=0, reward_sem=0.0, kl_sem=0.0, num_samples=1)
    return FrontierPoint(method=method, kl_mean=kl, reward_mean=reward, **{**defaults, **fields})


def test_dominance_counts_points_matched_at_no_more_kl():
    points = [
        point("DPO", 1.0, 0.5),
        point("DPO", 3.0, 0.9),
        point("PPO", 2.0, 0.4),  # DPO has 0.5 at KL 1 <= 2: dominated
        point("PPO", 4.0, 0.95),  # DPO reaches only 0.9 by KL 4: not dominated
        point("PPO", 0.5, 0.1),  # no DPO point at KL <= 0.5: not comparable
    ]
    summary = dominance_summary(points, "DPO")
    assert summary["PPO"]["points"] == 3
    assert summary["PPO"]["dominated"] == 1
    assert summary["PPO"]["best_reward_gap"] == pytest.approx(0.05)


def test_write_results_produces_png_json_and_markdown(tmp_path):
    points = [
        point("reference", 0.0, 0.1, run="reference", reward_sem=0.02),
        point("DPO", 2.0, 0.6, run="dpo-b0.1", beta=0.1, step=10, kl_sem=0.1, reward_sem=0.03),
        point("DPO", 3.0, 0.7, run="dpo-b0.1", beta=0.1, step=20, kl_sem=0.1, reward_sem=0.03, checkpoint="run/checkpoint-20"),
    ]
    paths = write_results(points, tmp_path, extra={"settings": {"mode": "test"}})
    assert paths["png"].stat().st_size > 1000
    data = json.loads(paths["json"].read_text())
    assert data["settings"] == {"mode": "test"} and len(data["points"]) == 3
    assert data["points"][2]["checkpoint"] == "run/checkpoint-20" and "checkpoint" not in data["points"][1]
    table = paths["md"].read_text().splitlines()
    assert table[0].startswith("| method |") and len(table) == 2 + 3
    assert "| DPO | dpo-b0.1 | 0.10 | 20 | 0.700 ± 0.030 | 3.00 ± 0.10 |" in table


def test_load_reward_accepts_module_function_and_rejects_bad_specs(tmp_path):
    reward = load_reward("dpokit.experiments.reward:vader_reward")
    good, bad = reward(prompts=["the movie was", "the movie was"], completions=[" great.", " awful."])
    assert good > 0.3 and bad < -0.3
    with pytest.raises(ConfigError, match="neither a directory nor"):
        load_reward("no_colon_here")
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("not_a_module_xyz:f")
    with pytest.raises(ConfigError, match="no callable"):
        load_reward("dpokit.experiments.reward:missing")


def test_load_reward_from_a_sequence_classification_directory(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scores = load_reward(str(tmp_path))(prompts=["the movie", "a"], completions=[" was good", " bad plot"])
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)  # p(positive)


def test_find_checkpoints_orders_by_step_with_the_final_export_last(tmp_path):
    for name in ["checkpoints/step-200", "checkpoint-50/model", "final"]:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "logs").mkdir()
    found = find_checkpoints(tmp_path)
    assert [(step, path.relative_to(tmp_path).as_posix()) for step, path in found] == [
        (50, "checkpoint-50/model"),
        (200, "checkpoints/step-200"),
        (None, "final"),
    ]
    with pytest.raises(ConfigError, match="no model directory"):
        find_checkpoints(tmp_path / "logs")


def test_read_prompts_from_text_and_jsonl_with_located_errors(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert [row.prompt for row in read_frontier_prompts(tmp_path / "p.txt")] == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"p.jsonl:line 2: field 'prompt'"):
        read_frontier_prompts(tmp_path / "p.jsonl")


def test_frontier_command_evaluates_saved_runs_end_to_end(tmp_path):
    """Two "runs" (the reference itself and another model) through `dpokit frontier`."""
    from dpokit.commands.main import main

    tokenizer = tiny_tokenizer()
    reference = tiny_gpt2(vocab_size=len(tokenizer), seed=0, initializer_range=0.5)
    other = tiny_gpt2(vocab_size=len(tokenizer), seed=5, initializer_range=0.5)
    for name, model in [("ref", reference), ("runs/other/checkpoints/step-3", other), ("runs/same", reference)]:
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "prompts.txt").write_text("the movie was\ni liked\n")
    exit_code = main(
        [
            "frontier",
            str(tmp_path / "runs/other"),
            f"same={tmp_path / 'runs/same'}",
            "--reference",
            str(tmp_path / "ref"),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--reward",
            "dpokit.experiments.reward:vader_reward",
            "--out",
            str(tmp_path / "out"),
            "--max-new-tokens",
            "5",
            "--num-samples",
            "4",
            "--beta",
            "same=0.1",
        ]
    )
    assert exit_code == 0
    points = json.loads((tmp_path / "out/results.json").read_text())["points"]
    by_run = {p["run"]: p for p in points}
    assert set(by_run) == {"reference", "other", "same"}
    assert by_run["same"]["kl_mean"] == 0.0 and by_run["same"]["beta"] == 0.1
    assert by_run["other"]["kl_mean"] > 0 and by_run["other"]["step"] == 3
    assert (tmp_path / "out/frontier.png").exists()


def test_frontier_command_on_vllm_without_a_server_url_is_refused_before_loading_anything(tmp_path, capsys):
    from dpokit.commands.main import main

    (tmp_path / "prompts.txt").write_text("the movie was\n")
    arguments = ["frontier", str(tmp_path / "run"), "--reference", str(tmp_path / "missing-reference")]
    arguments += ["--prompts", str(tmp_path / "prompts.txt"), "--reward", "dpokit.experiments.reward:vader_reward"]
    assert main([*arguments, "--engine", "vllm", "--out", str(tmp_path / "out")]) == 2
    assert "--engine vllm needs --engine-url" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def vlm_runs(tmp_path_factory):
    """A tiny LLaVA reference and a run with two checkpoints: the reference itself (step 1) and another
    LLaVA (step 2, another seed); 3 prompts rows of the shapes task with their images (paths relative to the file)."""
    import shutil

    from dpokit.experiments.shapes import build_tiny_vlm, shapes_rows

    root = tmp_path_factory.mktemp("vlm-frontier")
    reference = build_tiny_vlm(root / "reference", "llava", seed=0)
    shutil.copytree(reference, root / "run" / "checkpoint-1" / "model")
    build_tiny_vlm(root / "run" / "checkpoint-2" / "model", "llava", seed=1)
    rows = [{"images": row["images"], "prompt": row["prompt"]} for row in shapes_rows(root, 3, seed=6)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return root, reference, prompts, rows


def test_frontier_on_image_prompts_samples_scores_and_rewards_each_checkpoint_with_the_images(vlm_runs, tmp_path):
    """`dpokit frontier` with a prompts file of image rows (tiny LLaVA, two checkpoints): the reference's own
    checkpoint is at KL exactly 0; the other's KL is the mean of log pi - log pi_ref of its samples (the dpokit
    engine's with the images, same seed) through the training log-prob path with the images (1e-4; with another
    prompt's image it is another number), and its reward is the image-dependent reward of those samples with
    their own images."""
    from dpokit.commands.main import main
    from dpokit.generation import DpokitEngine, SamplingConfig, encode_prompts
    from dpokit.models import LoadOptions, load_policy
    from tests.judges.fakes import pixel_length_reward
    from tests.test_vlm_judging import training_path_logps

    root, reference, prompts, rows = vlm_runs
    reward = "tests.judges.fakes:pixel_length_reward"
    arguments = ["frontier", f"dpo={root / 'run'}", "--reference", str(reference), "--prompts", str(prompts)]
    arguments += ["--reward", reward, "--out", str(tmp_path / "out"), "--max-new-tokens", "4", "--num-samples", "2"]
    assert main([*arguments, "--dtype", "float32", "--device", "cpu"]) == 0
    points = {p["step"]: p for p in json.loads((tmp_path / "out/results.json").read_text())["points"] if p["run"] == "dpo"}
    assert points[1]["kl_mean"] == 0.0 and set(points) == {1, 2}

    policy_dir = root / "run" / "checkpoint-2" / "model"
    policy = load_policy(policy_dir, LoadOptions("float32", "cpu"))
    images = [[(root / row["images"][0]).read_bytes()] for row in rows]
    _, ids = encode_prompts(policy.tokenizer, [row["prompt"] for row in rows], images=images, processor=policy.processor)
    engine = DpokitEngine(policy.model, policy.tokenizer, processor=policy.processor)
    sampled = engine.sample(ids, SamplingConfig(4, 1.0, 1.0, 0, 2, seed=0), images)

    def kl(shift):
        items = [
            {"prompt_ids": ids[c.prompt_index], "response_ids": [c.token_ids], "images": images[(c.prompt_index + shift) % 3]}
            for c in sampled
        ]
        values = (training_path_logps(policy_dir, items) - training_path_logps(reference, items))[:, 0]
        return float(values.mean())

    assert points[2]["kl_mean"] == pytest.approx(kl(0), abs=1e-4)
    assert abs(kl(1) - kl(0)) > 1e-3
    expected = pixel_length_reward(None, [c.text for c in sampled], [images[c.prompt_index] for c in sampled])
    assert points[2]["reward_mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-9)
    assert points[2]["num_samples"] == 6


def test_frontier_on_image_prompts_refuses_vllm_and_a_text_only_reward_before_loading_models(vlm_runs, tmp_path, capsys):
    from dpokit.commands.main import main

    root, reference, prompts, _ = vlm_runs
    arguments = ["frontier", str(root / "run"), "--reference", str(reference), "--prompts", str(prompts)]
    arguments += ["--out", str(tmp_path / "out")]
    vllm = ["--engine", "vllm", "--engine-url", "http://127.0.0.1:9", "--reward", "tests.judges.fakes:pixel_length_reward"]
    assert main([*arguments, *vllm]) == 2
    assert "prompts with images are sampled with the dpokit engine only" in capsys.readouterr().err
    assert main([*arguments, "--reward", "dpokit.experiments.reward:vader_reward"]) == 2
    error = capsys.readouterr().err
    assert "prompts.jsonl:line 1: the prompt has images but reward" in error and "names no 'images' parameter" in error
    assert not (tmp_path / "out").exists()
