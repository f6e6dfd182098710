"""`dpokit experiment shapes --mode quick`: a tiny LLaVA built on the spot, SFT on noisy answers, DPO and
Preferred-FT on correct-vs-wrong pairs, online DPO on the policy's own answers labelled by the ground truth,
every checkpoint evaluated on held-out images (greedy accuracy with
its interval, sampled accuracy and KL to the SFT model); the evaluation agrees with `dpokit generate` and the
ground-truth reward, and a second run reuses the stored points instead of training again."""

from __future__ import annotations

import json
import shutil

import pytest

from dpokit.commands.main import main
from dpokit.experiments.shapes import colour_reward


@pytest.mark.slow
def test_the_shapes_experiment_measures_every_checkpoint_and_its_sft_accuracy_equals_dpokit_generate(tmp_path, capsys):
    from dpokit.data.prompts import read_prompt_rows
    from dpokit.generation import GenerateJob, SamplingConfig, run_generate
    from dpokit.models import LoadOptions

    out = tmp_path / "shapes"
    assert main(["experiment", "shapes", "--mode", "quick", "--out", str(out)]) == 0
    assert "| SFT (reference) | 0 |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [(p["run"], p["step"]) for p in results["points"]] == [
        ("sft", 0),
        ("dpo-beta0.1", 2),
        ("dpo-beta0.1", 4),
        ("preferred-ft", 2),
        ("preferred-ft", 4),
        ("online-beta0.1", 2),
        ("online-beta0.1", 4),
    ]
    sft = results["points"][0]
    assert sft["kl_mean"] == 0.0 and sft["num_samples"] == 16  # 8 images x 2 samples, the SFT model against itself
    for point in results["points"]:
        greedy = results["greedy"][f"{point['run']}@{point['step']}"]
        assert greedy["n"] == 8 and greedy["ci_low"] <= greedy["accuracy"] <= greedy["ci_high"]
        assert 0 < greedy["answer_start"] <= 1 and 0 < greedy["colour_mass"] <= 1 and 0 < greedy["colour_choice"] <= 1
    assert set(results["training"]["dpo-beta0.1"]) == {
        f"logps/{k}@{w}" for k in ("chosen", "rejected") for w in ("first", "last")
    }
    assert (out / "frontier.png").is_file()
    assert_online_pairs_are_labelled_by_the_colour_in_their_images(out / "runs" / "online-beta0.1")

    eval_file = out / "data" / "eval.jsonl"
    job = GenerateJob(model=str(out / "runs" / "sft" / "final"), prompts_file=str(eval_file), load=LoadOptions("float32", "cpu"))
    job.sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    texts = [s.completion for s in run_generate(job)]
    images = [list(row.images) for row in read_prompt_rows(eval_file, images=True)]
    assert results["greedy"]["sft@0"]["accuracy"] == sum(colour_reward([""] * 8, texts, images)) / 8

    shutil.rmtree(out / "runs" / "dpo-beta0.1")
    assert main(["experiment", "shapes", "--mode", "quick", "--out", str(out)]) == 0
    assert not (out / "runs" / "dpo-beta0.1").exists()  # the stored points were used, nothing trained again
    assert json.loads((out / "results.json").read_text())["points"] == results["points"]


def assert_online_pairs_are_labelled_by_the_colour_in_their_images(run_dir):
    """Every pair the online arm trained on: its two answers scored by the ground truth read from the pixels of
    its own prompt's image (the chosen one right, the rejected one wrong: the reward is 1 or 0, ties dropped)."""
    from pathlib import Path

    pairs = 0
    for round_dir in sorted((run_dir / "rounds").iterdir()):
        prompts = [json.loads(line) for line in (round_dir / "prompts.jsonl").read_text().splitlines()]
        for line in (round_dir / "pairs.jsonl").read_text().splitlines():
            pair = json.loads(line)
            images = [Path(path).read_bytes() for path in prompts[pair["prompt_index"]]["images"]]
            assert pair["scores"] == colour_reward([""] * 2, pair["responses"], [images] * 2) == [1.0, 0.0]
            pairs += 1
    assert pairs > 0


def test_shapes_methods_picks_its_arms_and_an_unknown_arm_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["experiment", "shapes", "--mode", "quick", "--methods", "online,ppo", "--out", str(out)]) != 0
    assert "the shapes experiment's arms are dpo,dpo+nll,preferred-ft,online" in capsys.readouterr().err
    assert not out.exists()
