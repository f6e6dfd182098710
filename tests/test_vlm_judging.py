"""Judging image prompts: the shapes task's ground-truth reward reads the colour from the pixels; a `reward:`
function with an `images` parameter gets each prompt's images, text-only judges refuse them; judgments and
stored samples are keyed by the images' content; `dpokit winrate` and `dpokit judge-check` on image rows
(tiny LLaVA built from config)."""

from __future__ import annotations

import json
import math

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
