"""`dpokit eval`, `dpokit score` and `dpokit winrate` on Qwen2-VL, Qwen2.5-VL and Gemma 3 with image rows. The
models are the sharpened ones of tests/test_vlm_family_sampling.py, saved to disk (the commands load them from
a directory), so their log-probs depend strongly on the images and on the rotary positions: eval's per-example
losses and rewards and score's rewards equal the training log-prob path's (padded layout, 1e-4), and winrate's
stored greedy samples equal `dpokit generate`'s."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dpokit.data import PaddedCollator, PrepareOptions, prepare_dataset
from dpokit.experiments.shapes import MROPE_FAMILIES, QUESTION, build_tiny_vlm, colour_reward, shapes_rows
from dpokit.logprobs import compute_logps
from dpokit.models import LoadOptions
from tests.test_vlm_families import processor_of
from tests.test_vlm_family_sampling import sampled_model

FAMILIES = (*MROPE_FAMILIES, "gemma3")
LOAD = LoadOptions("float32", "cpu")
COLOUR_JUDGE = "reward:dpokit.experiments.shapes:colour_reward"
MAX_NEW = 6


def sharpened_dir(root, family, seed):
    """A tiny ``family`` model (``seed``) made position- and image-dependent, saved with its processor."""
    built = build_tiny_vlm(root / f"{family}-{seed}-initial", family, seed=seed)
    out = root / f"{family}-{seed}"
    shutil.copytree(built, out)
    sampled_model(built, family).save_pretrained(out)
    return out


def write_rows(directory, n, *, responses=True):
    """``n`` shapes rows (their images under ``directory``), the second with a longer question, so the padded
    batch has prompts of different lengths; ``responses=False``: prompts rows."""
    rows = shapes_rows(directory, n, seed=7)
    rows[1]["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{QUESTION} {QUESTION}"}]}]
    if not responses:
        rows = [{"images": row["images"], "prompt": row["prompt"]} for row in rows]
    path = directory / ("pairs.jsonl" if responses else "prompts.jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path, rows


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-commands")
    return {family: (sharpened_dir(root, family, 0), sharpened_dir(root, family, 1)) for family in FAMILIES}


@pytest.fixture(scope="module")
def pairs(family_models, tmp_path_factory):
    """Per family (computed once): a pairs file of 3 image rows and the training path's log-probs (B, 2) of the
    policy and the reference on it, with the rows' own images and with each row given the next row's image."""
    computed = {}

    def of(family):
        if family not in computed:
            directory = tmp_path_factory.mktemp(f"pairs-{family}")
            data, _ = write_rows(directory, 3)
            own = training_path_logps(*family_models[family], data)
            rotated = training_path_logps(*family_models[family], data, rotate_images=True)
            computed[family] = data, own, rotated
        return computed[family]

    return of


def training_path_logps(policy_dir, reference_dir, data, *, rotate_images=False):
    """Summed response log-probs (B, 2) of both models on the pairs file through the training path (data
    pipeline with the processor, padded layout); ``rotate_images``: each row given the next row's image."""
    from transformers import AutoModelForImageTextToText

    processor = processor_of(policy_dir)
    prepared = prepare_dataset(data, processor.tokenizer, PrepareOptions(max_length=None), processor=processor, use_cache=False)
    items = sorted(prepared.items, key=lambda item: item["example_id"])
    if rotate_images:
        items = [{**item, "images": items[(i + 1) % len(items)]["images"]} for i, item in enumerate(items)]
    batch = PaddedCollator(processor.tokenizer.pad_token_id, image_processor=processor.image_processor)(items)
    with torch.no_grad():
        policy, reference = (
            compute_logps(AutoModelForImageTextToText.from_pretrained(directory).eval(), batch).logps
            for directory in (policy_dir, reference_dir)
        )
    return policy, reference


@pytest.mark.parametrize("family", FAMILIES)
def test_dpokit_eval_on_image_pairs_gives_the_training_paths_per_example_losses_and_rewards(
    family_models, pairs, tmp_path, family
):
    """`dpokit eval` (sigmoid loss, beta 0.1, a reference directory) on 3 image pairs: each pair's loss and
    chosen / rejected rewards equal the trainer's objective on the padded training path's log-probs (1e-4).
    The same path with each row given another row's image gives rewards more than 1e-2 away, so an eval that
    lost or swapped the images fails here (Gemma 3's tiny model with transformers' zero-initialised image
    projector saw no image at all: its rewards were the same with any image). The training path's own 3-D
    positions and token types are checked against TRL in tests/test_vlm_families.py; 1-D positions move these
    models' log-probs by several nats."""
    from dpokit.analysis.evaluate import EvalJob, run_eval
    from dpokit.losses import LossInputs, build_objective

    policy_dir, reference_dir = family_models[family]
    data, (policy, reference), (swapped_policy, swapped_reference) = pairs(family)
    beta = 0.1
    job = EvalJob(model=str(policy_dir), reference=str(reference_dir), data=str(data), beta=beta, loss="sigmoid")
    job.load, job.cache_dir, job.max_length = LOAD, str(tmp_path / "cache"), None
    report = run_eval(job)
    records = sorted(report.result.per_example, key=lambda record: record["example_id"])

    objective = build_objective([{"name": "sigmoid"}], beta=beta)
    lengths = torch.ones_like(policy, dtype=torch.long)  # unused by the sigmoid loss
    out = objective(LossInputs(policy, reference, lengths, torch.ones_like(policy, dtype=torch.bool)))
    rewards = beta * (policy - reference)
    assert report.summary["num_examples"] == 3
    torch.testing.assert_close(torch.tensor([r["loss"] for r in records]), out.per_example, atol=1e-4, rtol=0)
    got = torch.tensor([[r["rewards/chosen"], r["rewards/rejected"]] for r in records])
    torch.testing.assert_close(got, rewards, atol=1e-4, rtol=0)
    assert report.summary["metrics"]["loss"] == pytest.approx(out.loss.item(), abs=1e-4)
    assert (out.per_example - torch.log(torch.tensor(2.0))).abs().max() > 1e-3  # the two models differ: not a tie
    assert (beta * (swapped_policy - swapped_reference) - rewards).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_dpokit_score_on_image_pairs_gives_beta_times_the_training_paths_log_ratio(family_models, pairs, family):
    """`dpokit score` on the pairs file (images read relative to it): every response's reward equals
    0.5 * (log pi - log pi_ref) of the padded training path with the row's own image (1e-4), and its policy
    log-prob that path's; with the next row's image the log-probs move by more than 0.1 nats, so a score that
    lost or swapped the images fails here."""
    from dpokit.analysis.score import ScoreJob, read_score_rows, run_score

    policy_dir, reference_dir = family_models[family]
    data, (policy, reference), (swapped_policy, _) = pairs(family)
    report = run_score(ScoreJob(model=str(policy_dir), reference=str(reference_dir), beta=0.5, load=LOAD), read_score_rows(data))
    rewards = torch.tensor([row.rewards for row in report.rows])
    torch.testing.assert_close(rewards, 0.5 * (policy - reference), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor([row.policy_logps for row in report.rows]), policy, atol=1e-4, rtol=0)
    assert (swapped_policy - policy).abs().max() > 0.1
    assert all(row.to_dict()["images"][0].endswith(".png") for row in report.rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpokit_winrate_on_image_prompts_stores_dpokit_generates_greedy_samples_and_judges_them_by_colour(
    family_models, tmp_path, family
):
    """`dpokit winrate` (the policy against the reference model as baseline, the shapes colour reward as judge,
    temperature 0, 4 prompts with their images): each model's stored samples equal `dpokit generate`'s greedy
    samples of the same prompts (the sampler itself is checked against transformers' generate in
    tests/test_vlm_family_sampling.py), and the wins / ties / losses are the colour reward of those samples with
    their own images. Three prompts share their text and differ only in the image: one model at least answers
    them differently, so a winrate that dropped the images would not give generate's samples. (These random
    models never name a colour, so every verdict here is a tie: the judge is run on the images, its verdicts are
    not exercised.)"""
    from dpokit.analysis.winrate import WinrateJob, run_winrate
    from dpokit.generation import GenerateJob, SamplingConfig, run_generate

    policy_dir, reference_dir = family_models[family]
    path, rows = write_rows(tmp_path, 4, responses=False)
    out = tmp_path / "winrate"
    job = WinrateJob(
        models=[("policy", str(policy_dir))],
        baseline=str(reference_dir),
        prompts=str(path),
        judge=COLOUR_JUDGE,
        temperatures=[0.0],
        max_new_tokens=MAX_NEW,
        out=str(out),
        progress=False,
        load=LOAD,
    )
    [result] = run_winrate(job)["results"]
    images = [[(tmp_path / row["images"][0]).read_bytes()] for row in rows]
    sampled = {}
    for name, model in (("policy", policy_dir), ("baseline", reference_dir)):
        generate = GenerateJob(model=str(model), prompts_file=str(path), sampling=SamplingConfig(MAX_NEW, 0.0), load=LOAD)
        sampled[name] = [sample.completion for sample in run_generate(generate)]
        stored = json.loads(next((out / "samples" / name).glob("t0-*.json")).read_text())
        assert stored["completions"] == [[text] for text in sampled[name]]
    assert any(len({texts[i] for i in (0, 2, 3)}) > 1 for texts in sampled.values())  # same text, other image
    mine, theirs = (colour_reward(None, sampled[name], images) for name in ("policy", "baseline"))
    assert (result["wins"], result["ties"], result["losses"]) == (
        sum(a > b for a, b in zip(mine, theirs, strict=True)),
        sum(a == b for a, b in zip(mine, theirs, strict=True)),
        sum(a < b for a, b in zip(mine, theirs, strict=True)),
    )
