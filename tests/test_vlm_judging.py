"""Judging image prompts: the shapes task's ground-truth reward reads the colour from the pixels; a `reward:`
function with an `images` parameter gets each prompt's images, text-only judges refuse them; judgments and
stored samples are keyed by the images' content; `dpokit winrate` and `dpokit judge-check` on image rows
(tiny LLaVA built from config)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpokit.errors import ConfigError, DataError
from dpokit.experiments.shapes import COLOURS, build_tiny_vlm, colour_reward, shapes_rows, write_shapes_data
from dpokit.judges import CachedJudge, JudgmentCache, load_judge

COLOUR_JUDGE = "reward:dpokit.experiments.shapes:colour_reward"


def image_bytes(directory, rows):
    return [[(directory / row["images"][0]).read_bytes()] for row in rows]


def test_colour_reward_reads_the_shapes_colour_from_its_pixels(tmp_path):
    rows = shapes_rows(tmp_path, 24, seed=9)
    images = image_bytes(tmp_path, rows)
    right = [f"It is {row['colour']}." for row in rows]
    wrong = [f"It is {next(c for c in COLOURS if c != row['colour'])}." for row in rows]
    both = [f"It is {row['colour']} or {next(c for c in COLOURS if c != row['colour'])}." for row in rows]
    assert colour_reward([""] * 24, right, images) == [1.0] * 24
    assert colour_reward([""] * 24, wrong, images) == [0.0] * 24
    assert colour_reward([""] * 24, both, images) == [0.0] * 24  # naming two colours is not an answer
    with pytest.raises(ConfigError, match="needs its image"):
        colour_reward([""], right[:1])


def test_a_reward_function_with_an_images_parameter_judges_image_prompts_and_text_only_judges_refuse_them(tmp_path):
    rows = shapes_rows(tmp_path, 4, seed=9)
    images = image_bytes(tmp_path, rows)
    prompts = [row["prompt"] for row in rows]
    right = [f"It is {row['colour']}." for row in rows]
    wrong = [f"It is {next(c for c in COLOURS if c != row['colour'])}." for row in rows]
    judge = load_judge(COLOUR_JUDGE)
    assert judge.sees_images
    judgments = judge.judge_pairs(prompts, right, wrong, images)
    assert [j.prob_a for j in judgments] == pytest.approx([1 / (1 + math.exp(-1))] * 4)  # Bradley-Terry on 1 vs 0
    text_only = load_judge("reward:dpokit.experiments.reward:vader_reward")  # takes **kwargs: not an images parameter
    with pytest.raises(ConfigError, match="reads text only and the prompts have images"):
        text_only.judge_pairs(prompts, right, wrong, images)
    with pytest.raises(ConfigError, match="reads text only"):
        CachedJudge(text_only, JudgmentCache(tmp_path / "cache.jsonl")).score(prompts, right, images)


def test_one_question_on_two_images_is_two_cached_judgments(tmp_path):
    """The same prompt text and answers on a red and a blue shape: opposite verdicts, each cached under its image."""
    from PIL import Image

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (8, 8), COLOURS["red"]).save(red)
    Image.new("RGB", (8, 8), COLOURS["blue"]).save(blue)
    prompt = shapes_rows(tmp_path, 1)[0]["prompt"]
    images = [[red.read_bytes()], [blue.read_bytes()]]
    cached = CachedJudge(load_judge(COLOUR_JUDGE), JudgmentCache(tmp_path / "judgments.jsonl"))
    first = cached.judge_pairs([prompt, prompt], ["It is red.", "It is red."], ["It is blue.", "It is blue."], images)
    assert [j.verdict for j in first] == ["A", "B"] and cached.misses == 2
    again = CachedJudge(load_judge(COLOUR_JUDGE), JudgmentCache(tmp_path / "judgments.jsonl"))
    assert again.judge_pairs([prompt, prompt], ["It is red."] * 2, ["It is blue."] * 2, images) == first
    assert again.hits == 2 and again.misses == 0
    assert again.score([prompt, prompt], ["It is red."] * 2, images) == [1.0, 0.0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return build_tiny_vlm(root / "policy", "llava", seed=0), build_tiny_vlm(root / "baseline", "llava", seed=1)


def write_prompts(directory, n=3):
    rows = [{"images": row["images"], "prompt": row["prompt"]} for row in shapes_rows(directory, n, seed=6)]
    path = directory / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path, rows


def test_winrate_on_image_prompts_samples_and_judges_each_prompt_with_its_image(models, tmp_path):
    """`dpokit winrate` with a prompts file of image rows: each model's greedy samples equal `dpokit generate`'s
    on the same rows, and every verdict is the image-dependent reward of those samples with their own image."""
    from dpokit.analysis.winrate import WinrateJob, run_winrate
    from dpokit.generation import GenerateJob, SamplingConfig, run_generate
    from dpokit.models import LoadOptions
    from tests.judges.fakes import pixel_length_reward

    policy, baseline = models
    path, rows = write_prompts(tmp_path)
    job = WinrateJob(
        models=[("policy", str(policy))],
        baseline=str(baseline),
        prompts=str(path),
        judge="reward:tests.judges.fakes:pixel_length_reward",
        temperatures=[0.0],
        max_new_tokens=4,
        out=str(tmp_path / "winrate"),
        progress=False,
        load=LoadOptions("float32", "cpu"),
    )
    [result] = run_winrate(job)["results"]
    images = image_bytes(tmp_path, rows)
    sampled = {}
    for name, model in (("policy", policy), ("baseline", baseline)):
        generate = GenerateJob(model=str(model), prompts_file=str(path), sampling=SamplingConfig(4, 0.0), load=job.load)
        sampled[name] = [s.completion for s in run_generate(generate)]
        stored = json.loads(next((tmp_path / "winrate" / "samples" / name).glob("t0-*.json")).read_text())
        assert stored["completions"] == [[text] for text in sampled[name]]
    mine, theirs = (pixel_length_reward(None, sampled[n], images) for n in ("policy", "baseline"))
    assert mine != theirs and result["ties"] < len(rows)  # the models answer differently: not a table of ties
    assert (result["wins"], result["ties"], result["losses"]) == (
        sum(a > b for a, b in zip(mine, theirs, strict=True)),
        sum(a == b for a, b in zip(mine, theirs, strict=True)),
        sum(a < b for a, b in zip(mine, theirs, strict=True)),
    )
    judged = [json.loads(line) for line in (tmp_path / "winrate" / "judgments.jsonl").read_text().splitlines()]
    expected = {f"reward A={a!r} B={b!r}" for a, b in zip(mine, theirs, strict=True)}
    assert expected <= {row["value"]["raw"] for row in judged}


def test_winrate_refuses_image_prompts_with_a_text_judge_or_text_references(models, tmp_path):
    from dpokit.analysis.winrate import WinrateJob, run_winrate

    policy, baseline = models
    path, _ = write_prompts(tmp_path, n=1)
    job = WinrateJob(
        models=[("policy", str(policy))],
        baseline=str(baseline),
        prompts=str(path),
        temperatures=[0.0],
        judge="reward:dpokit.experiments.reward:vader_reward",
        max_new_tokens=2,
        out=str(tmp_path / "w"),
        progress=False,
    )
    with pytest.raises(ConfigError, match="reads text only"):
        run_winrate(job)
    references = tmp_path / "references.jsonl"
    references.write_text(json.dumps({"prompt": "x", "reference": "It is red."}) + "\n", encoding="utf-8")
    job.baseline, job.references, job.judge = None, str(references), COLOUR_JUDGE
    with pytest.raises(DataError, match=r"line 1: field 'images': --references are matched to prompts by their text"):
        run_winrate(job)


def test_judge_check_on_image_pairs_with_the_ground_truth_judge_agrees_with_every_label(tmp_path):
    from dpokit.analysis.winrate import JudgeCheckJob, run_judge_check

    data = write_shapes_data(tmp_path, 12, seed=4)
    job = JudgeCheckJob(judge=COLOUR_JUDGE, data=str(data), cache=str(tmp_path / "cache.jsonl"), progress=False)
    [row] = run_judge_check(job)["results"]
    assert row["agreement"] == 1.0 and row["wins"] == 12 and row["position_consistency"] == 1.0
    job.judge = "reward:dpokit.experiments.reward:vader_reward"
    with pytest.raises(ConfigError, match="reads text only"):
        run_judge_check(job)


def test_the_implicit_judge_of_a_vlm_reads_the_images_as_dpokit_score_does(models, tmp_path):
    from dpokit.analysis.score import ScoreJob, read_score_rows, run_score
    from dpokit.models import LoadOptions

    policy, baseline = models
    data = write_shapes_data(tmp_path, 3, seed=4)
    rows = read_score_rows(data)
    report = run_score(ScoreJob(model=str(policy), reference=str(baseline), beta=0.5, load=LoadOptions("float32", "cpu")), rows)
    judge = load_judge(f"implicit:{policy},reference={baseline},beta=0.5", load=LoadOptions("float32", "cpu"))
    assert judge.sees_images
    judgments = judge.judge_pairs(
        [r.prompt for r in rows], [r.responses[0] for r in rows], [r.responses[1] for r in rows], [r.images for r in rows]
    )
    raws = [f"reward A={row.rewards[0]!r} B={row.rewards[1]!r}" for row in report.rows]
    assert [j.raw for j in judgments] == raws
    assert len({row.rewards[0] for row in report.rows}) == 3  # three images, three rewards for the same answer text


def online_overrides(policy, prompts_path, directory, judge="reward:tests.judges.fakes:pixel_length_reward"):
    """One online round of one step on the tiny LLaVA: 4 image prompts, 3 samples each, a batch that holds the round."""
    return [
        f"model.name_or_path={policy}",
        f"logging.run_dir={directory / 'run'}",
        f"data.cache_dir={directory / 'cache'}",
        "data.max_length=64",
        "data.max_prompt_length=48",
        "optim.optimizer=adamw",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "optim.batch_size=8",
        "optim.grad_accumulation=1",
        "reference.strategy=copy",
        "eval.every_steps=0",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "checkpoint.every_steps=0",
        f"online.prompts_path={prompts_path}",
        "online.rounds=1",
        "online.prompts_per_round=4",
        "online.samples_per_prompt=3",
        "online.steps_per_round=1",
        f"online.judge={judge}",
        "online.sampling.max_new_tokens=4",
        "online.sampling.temperature=1.0",
    ]


def read_round(round_dir, *stages):
    return [[json.loads(line) for line in (round_dir / f"{stage}.jsonl").read_text().splitlines()] for stage in stages]


def training_path_logps(model_dir, items):
    """Per-response log-probs (examples, responses) of ``items`` (prompt ids with their images' tokens, response ids,
    images) through the trainer's padded log-prob path, with the images."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dpokit.data import make_collator
    from dpokit.logprobs import compute_logps

    processor = AutoProcessor.from_pretrained(model_dir)
    batch = make_collator("padded", processor.tokenizer.pad_token_id, image_processor=processor.image_processor)(items)
    with torch.no_grad():
        return compute_logps(AutoModelForImageTextToText.from_pretrained(model_dir).eval(), batch).logps


def test_an_online_round_on_image_prompts_samples_judges_and_trains_with_each_prompts_image(models, tmp_path):
    """`dpokit online` on a prompts file of image rows (tiny LLaVA, one round, one step): the samples are scored
    with their images (policy and copied reference give the same log-probs before training, equal to a
    teacher-forced pass with the images), the judge scores each completion with its own prompt's image, and
    the round trains on pairs whose batches carry the images (the weights move)."""
    from dpokit.config import load_config
    from dpokit.generation import completion_logps, encode_prompts
    from dpokit.models import LoadOptions, load_policy
    from dpokit.online import run_online
    from tests.judges.fakes import pixel_length_reward

    policy, _ = models
    path, rows = write_prompts(tmp_path, n=4)
    result = run_online(load_config(None, online_overrides(policy, path, tmp_path)))
    round_dir = result.round_dir(0)
    read = [
        [json.loads(line) for line in (round_dir / f"{stage}.jsonl").read_text().splitlines()]
        for stage in ("prompts", "completions", "judgments")
    ]
    prompts, completions, judgments = read
    assert [p["images"] for p in prompts] == [[str(tmp_path / rows[p["source_index"]]["images"][0])] for p in prompts]
    images = [[(tmp_path / rows[p["source_index"]]["images"][0]).read_bytes()] for p in prompts]
    per_completion = [images[c["prompt_index"]] for c in completions]
    texts = [c["completion"] for c in completions]
    assert [j["score"] for j in judgments] == pytest.approx(pixel_length_reward(None, texts, per_completion))
    initial = load_policy(policy, LoadOptions(dtype="float32", device="cpu"))
    _, ids = encode_prompts(initial.tokenizer, [p["prompt"] for p in prompts], images=images, processor=initial.processor)
    expected = completion_logps(
        initial.model,
        [ids[c["prompt_index"]] for c in completions],
        [c["token_ids"] for c in completions],
        pad_token_id=initial.tokenizer.pad_token_id,
        images=per_completion,
        image_processor=initial.processor.image_processor,
    )
    assert [c["policy_logp"] for c in completions] == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(c["policy_logp"] == c["reference_logp"] for c in completions)
    assert result.global_step == 1 and result.rounds[0]["pairs"] > 0
    trained = load_policy(result.run_dir / "final", LoadOptions(dtype="float32", device="cpu")).model
    assert any((a - b).abs().max() > 0 for a, b in zip(trained.parameters(), initial.model.parameters(), strict=True))


def round_prompt_ids(policy, prompts, images):
    from dpokit.generation import encode_prompts
    from dpokit.models import LoadOptions, load_policy

    loaded = load_policy(policy, LoadOptions(dtype="float32", device="cpu"))
    return encode_prompts(loaded.tokenizer, [p["prompt"] for p in prompts], images=images, processor=loaded.processor)[1]


def test_self_labelling_on_image_prompts_scores_each_completion_with_its_implicit_reward_with_its_image(models, tmp_path):
    """`online.judge: self` on image prompts (the policy's own implicit reward against reference.name_or_path, another
    LLaVA): every score of the round is beta * (log pi - log pi_ref) of its completion with its prompt's image, as the
    trainer's log-prob path computes it (1e-4); with the next prompt's image the rewards are other numbers. A frozen
    `implicit:POLICY,reference=...` judge (which scores the completions' text as `dpokit score` does) is handed each
    completion with its own prompt's image."""
    from dpokit.config import load_config
    from dpokit.models import LoadOptions
    from dpokit.online import run_online

    policy, baseline = models
    path, rows = write_prompts(tmp_path, n=4)
    overrides = [*online_overrides(policy, path, tmp_path, judge="self"), f"reference.name_or_path={baseline}", "loss.beta=0.5"]
    result = run_online(load_config(None, overrides))
    prompts, completions, judgments = read_round(result.round_dir(0), "prompts", "completions", "judgments")
    images = [[(tmp_path / rows[p["source_index"]]["images"][0]).read_bytes()] for p in prompts]
    ids = round_prompt_ids(policy, prompts, images)

    def rewards(shift):
        items = [
            {
                "prompt_ids": ids[c["prompt_index"]],
                "response_ids": [c["token_ids"]],
                "images": images[(c["prompt_index"] + shift) % 4],
            }
            for c in completions
        ]
        return (0.5 * (training_path_logps(policy, items) - training_path_logps(baseline, items)))[:, 0]

    expected = rewards(0)
    assert [j["score"] for j in judgments] == pytest.approx(expected.tolist(), abs=1e-4)
    assert (rewards(1) - expected).abs().max() > 1e-3  # the images matter: a score without its own image would fail
    assert result.rounds[0]["pairs"] > 0 and result.global_step == 1
    spec = f"implicit:{policy},reference={baseline},beta=0.5"
    again = run_online(load_config(None, online_overrides(policy, path, tmp_path / "frozen", judge=spec)))
    samples, judged = read_round(again.round_dir(0), "completions", "judgments")
    judge = load_judge(spec, load=LoadOptions("float32", "cpu"))
    texts, asked = [c["completion"] for c in samples], [prompts[c["prompt_index"]]["prompt"] for c in samples]
    own = judge.score(asked, texts, [images[c["prompt_index"]] for c in samples])
    assert [j["score"] for j in judged] == pytest.approx(own, abs=1e-5)
    shifted = judge.score(asked, texts, [images[(c["prompt_index"] + 1) % 4] for c in samples])
    assert max(abs(a - b) for a, b in zip(own, shifted, strict=True)) > 1e-3  # the judge reads the images


def test_online_rounds_on_image_prompts_mix_in_offline_rows_with_their_images(models, tmp_path):
    """online.offline_fraction with image prompts: the offline rows (image rows and a text-only one, as the data
    gives them) are tokenized with the processor and trained on with their images beside the sampled pairs: the
    step's logged mean chosen log-prob equals the sampled pairs' chosen log-probs and the offline rows' through the
    training path with their images (1e-4; with the offline images swapped it is another number); the round's
    offline.jsonl names each offline row's image. The same file as online.heldout_path is evaluated with its
    images: the round's held-out mean chosen log-prob is the trained model's through the training path."""
    from dpokit.config import load_config
    from dpokit.data import PrepareOptions, prepare_dataset
    from dpokit.models import LoadOptions, load_policy
    from dpokit.online import run_online
    from dpokit.training.tracking import read_metrics

    policy, _ = models
    path, _ = write_prompts(tmp_path, n=4)
    data = write_shapes_data(tmp_path / "offline", 2, seed=2)
    text_only = {"prompt": "Name a colour.", "chosen": "It is red.", "rejected": "It is blue."}
    data.write_text(data.read_text() + json.dumps(text_only) + "\n", encoding="utf-8")
    overrides = [*online_overrides(policy, path, tmp_path), f"data.train_path={data}", "online.offline_fraction=0.5"]
    result = run_online(load_config(None, [*overrides, f"online.heldout_path={data}"]))
    completions, pairs, offline = read_round(result.round_dir(0), "completions", "pairs", "offline")
    pictured = [row for row in offline if "images" in row]
    assert len(offline) == len(pairs) == result.rounds[0]["offline"] and len(pictured) < len(offline)
    assert len({row["images"][0] for row in pictured}) == 2
    assert all(Path(row["images"][0]).parent == data.parent / "images" for row in pictured)
    sampled = {(c["prompt_index"], c["sample_index"]): c["policy_logp"] for c in completions}  # the initial policy's
    chosen = [sampled[(p["prompt_index"], p["sample_indices"][0])] for p in pairs]
    written = tmp_path / "offline-rows.jsonl"
    written.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "source"}) + "\n" for row in offline))
    processor = load_policy(policy, LoadOptions(dtype="float32", device="cpu")).processor
    options = PrepareOptions(max_length=None, max_prompt_length=None)
    items = list(prepare_dataset(written, processor.tokenizer, options, processor=processor, use_cache=False).items)
    assert len(items) == len(offline)

    def logged_mean(items):
        values = chosen + training_path_logps(policy, items)[:, 0].tolist()
        return sum(values) / len(values)

    [logged] = [m for m in read_metrics(result.run_dir, split="train") if m["step"] == 1]
    assert logged["logps/chosen"] == pytest.approx(logged_mean(items), abs=1e-4)
    reversed_images = [row["images"] for row in items if row.get("images")]  # popped from the end: reversed
    shuffled = [{**row, "images": reversed_images.pop()} if row.get("images") else row for row in items]
    assert abs(logged_mean(shuffled) - logged_mean(items)) > 1e-3
    heldout = list(prepare_dataset(data, processor.tokenizer, options, processor=processor, use_cache=False).items)
    trained = training_path_logps(result.run_dir / "final", heldout)[:, 0]
    assert result.rounds[0]["heldout/logps/chosen"] == pytest.approx(float(trained.mean()), abs=1e-4)
