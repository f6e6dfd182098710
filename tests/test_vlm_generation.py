"""Sampling from a vision-language model with image prompts (`dpokit generate`, the dpokit engine) on the tiny
VLMs built from config: prompts rows carry `images` as training rows do, paths relative to the prompts file;
the samples equal transformers' own greedy `generate` on the processor's inputs (all five families; at their
initial scale positions hardly matter -- tests/test_vlm_family_sampling.py checks Qwen2-VL, Qwen2.5-VL and
Gemma 3 on models that depend on them); a missing image is a located error; commands that do not sample
images yet refuse such rows instead of dropping the images."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit.data.prompts import read_prompt_rows
from dpokit.errors import ConfigError, DataError
from dpokit.experiments.shapes import ALL_FAMILIES, QUESTION, build_tiny_vlm, shapes_rows
from dpokit.generation import EngineOptions, GenerateJob, SamplingConfig, run_generate, stop_token_ids
from dpokit.models import LoadOptions

MAX_NEW = 5


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: build_tiny_vlm(root / family, family, seed=0) for family in ALL_FAMILIES}


def write_prompts(directory, n=3):
    """Prompts rows of the shapes task (the training rows without responses), one with a longer question so
    the batch is left-padded; image paths relative to the file."""
    rows = [{"images": row["images"], "prompt": row["prompt"]} for row in shapes_rows(directory, n, seed=5)]
    if n > 1:
        rows[1]["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{QUESTION} {QUESTION}"}]}]
    path = directory / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path, rows


def hf_greedy(model_dir, directory, rows):
    """transformers' own greedy decoding of each prompt alone, from the processor's inputs."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from dpokit.config import ModelConfig
    from dpokit.models import load_processor

    processor = load_processor(ModelConfig(name_or_path=str(model_dir)))  # Qwen's without its video processor
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    out = []
    for row in rows:
        text = processor.tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        image = Image.open(directory / row["images"][0]).convert("RGB")
        inputs = processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(
                **inputs,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=stop_token_ids(processor.tokenizer),  # EOS and the end-of-turn token, as dpokit stops
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        new = ids[0, inputs["input_ids"].shape[1] :].tolist()
        out.append(processor.tokenizer.decode(new, skip_special_tokens=True))
    return out


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generate_on_image_prompts_equals_transformers_greedy_generation_per_prompt(vlm_dirs, tmp_path, family):
    path, rows = write_prompts(tmp_path)
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0)
    job = GenerateJob(model=str(vlm_dirs[family]), prompts_file=str(path), sampling=sampling, load=LoadOptions("float32", "cpu"))
    samples = run_generate(job)
    assert any(s.num_tokens > 0 for s in samples)  # a random model may end a prompt's answer at once
    assert [s.images for s in samples] == [[str(tmp_path / row["images"][0])] for row in rows]
    assert [s.completion for s in samples] == hf_greedy(vlm_dirs[family], tmp_path, rows)


def test_the_image_changes_what_is_sampled(vlm_dirs, tmp_path):
    """The images reach the model: the same question on different images gives different teacher-forced
    log-probs of the same completion (a text-only path would give equal ones)."""
    from dpokit.generation import completion_logps, encode_prompts
    from dpokit.models import LoadOptions, load_policy

    _, rows = write_prompts(tmp_path, n=2)
    loaded = load_policy(vlm_dirs["llava"], LoadOptions(device="cpu", dtype="float32"))
    prompts = [rows[0]["prompt"], rows[0]["prompt"]]
    images = [[(tmp_path / rows[i]["images"][0]).read_bytes()] for i in range(2)]
    _, ids = encode_prompts(loaded.tokenizer, prompts, images=images, processor=loaded.processor)
    completion = loaded.tokenizer("It is red.", add_special_tokens=False)["input_ids"]
    logps = completion_logps(
        loaded.model,
        ids,
        [completion, completion],
        pad_token_id=0,
        images=images,
        image_processor=loaded.processor.image_processor,
    )
    assert ids[0] == ids[1] and len(ids[0]) > 16  # the image's 16 tokens are in the prompt
    assert abs(float(logps[0] - logps[1])) > 1e-6


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_vlm_never_samples_its_image_token_so_its_samples_can_be_scored(vlm_dirs, tmp_path, temperature):
    """A model pushed to emit its image token (+50 on that logit) still samples text only, greedy or not, and the
    samples are teacher-forced with their images (a sampled image token would make the model look for an image
    that is not there)."""
    from PIL import Image

    from dpokit.generation import encode_prompts, generate
    from dpokit.models import LoadOptions, load_policy

    _, rows = write_prompts(tmp_path, n=2)
    loaded = load_policy(vlm_dirs["llava"], LoadOptions(device="cpu", dtype="float32"))
    image_id = loaded.model.config.image_token_id
    image_processor = loaded.processor.image_processor
    images = [[(tmp_path / row["images"][0]).read_bytes()] for row in rows]
    _, ids = encode_prompts(loaded.tokenizer, [row["prompt"] for row in rows], images=images, processor=loaded.processor)
    pixels = image_processor([[Image.open(tmp_path / rows[0]["images"][0])]], return_tensors="pt")
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=temperature, num_samples=2, seed=3)
    push = torch.zeros(loaded.model.config.text_config.vocab_size)
    push[image_id] = 50.0
    with loaded.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + push):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids[0]]), **pixels).logits
        assert int(logits[0, -1].argmax()) == image_id  # unmasked, the image token would be chosen
        completions = generate(
            loaded.model,
            ids,
            sampling,
            stop_token_ids=[loaded.tokenizer.eos_token_id],
            pad_token_id=0,
            reference=loaded.model,
            images=images,
            image_processor=image_processor,
        )
    assert len(completions) == 4 and all(len(c.token_ids) == MAX_NEW for c in completions)
    assert all(image_id not in c.token_ids for c in completions)
    assert all(c.policy_logp is not None and c.policy_logp == c.reference_logp for c in completions)


def test_a_missing_image_in_a_prompts_file_names_the_file_line_field_and_path(tmp_path):
    path, rows = write_prompts(tmp_path)
    (tmp_path / rows[2]["images"][0]).unlink()
    with pytest.raises(DataError) as error:
        read_prompt_rows(path, images=True)
    message = str(error.value)
    assert f"{path}:line 3" in message and "field 'images[0]'" in message and rows[2]["images"][0] in message
    assert "no such image file" in message


def test_an_image_count_that_does_not_match_the_placeholders_is_a_located_error(tmp_path):
    path, rows = write_prompts(tmp_path, n=1)
    rows[0]["images"] = rows[0]["images"] * 2
    path.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: field 'images': the row has 2 image\(s\) but its prompt has 1"):
        read_prompt_rows(path, images=True)


def test_commands_that_do_not_sample_images_refuse_image_rows_and_vllm_refuses_them(tmp_path):
    path, _ = write_prompts(tmp_path, n=1)
    with pytest.raises(DataError, match=r"line 1: field 'images': this command does not sample prompts with images"):
        read_prompt_rows(path)
    job = GenerateJob(model="unused", prompts_file=str(path), engine=EngineOptions(engine="vllm", url="http://127.0.0.1:9"))
    with pytest.raises(ConfigError, match="dpokit engine only"):
        run_generate(job)


def training_path_logps(directory, reference_dir, data):
    """Per-response log-probs (pairs, 2) of policy and reference through the shared-prompt training path on
    ``data`` (the path tested equal to TRL)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dpokit.data import PrepareOptions, make_collator, prepare_dataset
    from dpokit.logprobs import compute_logps

    processor = AutoProcessor.from_pretrained(directory)
    items = list(
        prepare_dataset(data, processor.tokenizer, PrepareOptions(max_length=None), processor=processor, use_cache=False).items
    )
    batch = make_collator("shared_prompt", processor.tokenizer.pad_token_id, image_processor=processor.image_processor)(items)
    with torch.no_grad():
        policy = compute_logps(AutoModelForImageTextToText.from_pretrained(directory).eval(), batch).logps
        reference = compute_logps(AutoModelForImageTextToText.from_pretrained(reference_dir).eval(), batch).logps
    return policy, reference


@pytest.fixture(scope="module")
def pairs(vlm_dirs, tmp_path_factory):
    """A reference LLaVA (another seed), 4 image pairs, and their training-path log-probs."""
    from dpokit.experiments.shapes import write_shapes_data

    root = tmp_path_factory.mktemp("pairs")
    reference_dir = build_tiny_vlm(root / "reference", "llava", seed=1)
    data = write_shapes_data(root, 4, seed=2)
    policy, reference = training_path_logps(vlm_dirs["llava"], reference_dir, data)
    return reference_dir, data, policy, reference


def test_dpokit_eval_on_image_pairs_gives_the_per_example_losses_of_the_training_log_prob_path(vlm_dirs, pairs, tmp_path):
    """`dpokit eval` (load_policy, a reference model directory, padded batches with the images) against the
    shared-prompt training path on the same models and rows: equal to 1e-4."""
    from dpokit.analysis.evaluate import EvalJob, run_eval

    reference_dir, data, policy, reference = pairs
    beta = 0.1
    job = EvalJob(model=str(vlm_dirs["llava"]), reference=str(reference_dir), data=str(data), beta=beta, loss="sigmoid")
    job.load, job.cache_dir, job.max_length = LoadOptions("float32", "cpu"), str(tmp_path / "cache"), None
    report = run_eval(job)
    losses = torch.tensor([record["loss"] for record in sorted(report.result.per_example, key=lambda r: r["example_id"])])
    expected = -torch.nn.functional.logsigmoid(beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])))
    assert report.summary["num_examples"] == 4
    torch.testing.assert_close(losses, expected, atol=1e-4, rtol=0)
    assert (expected - torch.log(torch.tensor(2.0))).abs().max() > 1e-3  # the two models differ: not a tie


def test_dpokit_score_on_image_pairs_gives_the_implicit_rewards_of_the_training_log_prob_path(vlm_dirs, pairs):
    """`dpokit score` on the pairs file (images read relative to it): r = beta * (log pi - log pi_ref) of each
    response equals the training path's to 1e-4, and each scored row names its image."""
    from dpokit.analysis.score import ScoreJob, read_score_rows, run_score

    reference_dir, data, policy, reference = pairs
    rows = read_score_rows(data)
    job = ScoreJob(model=str(vlm_dirs["llava"]), reference=str(reference_dir), beta=0.5, load=LoadOptions("float32", "cpu"))
    report = run_score(job, rows)
    rewards = torch.tensor([row.rewards for row in report.rows], dtype=torch.float32)
    torch.testing.assert_close(rewards, 0.5 * (policy - reference), atol=1e-4, rtol=0)
    assert all(len(row.to_dict()["images"]) == 1 and row.to_dict()["images"][0].endswith(".png") for row in report.rows)


def test_a_missing_image_in_a_score_file_is_a_located_error(tmp_path):
    from dpokit.analysis.score import read_score_rows

    path = tmp_path / "pairs.jsonl"
    rows = shapes_rows(tmp_path, 1, seed=4)
    path.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    (tmp_path / rows[0]["images"][0]).unlink()
    with pytest.raises(DataError, match=r"line 1: field 'images\[0\]': .*no such image file"):
        read_score_rows(path)


def test_a_vlm_run_writes_eval_samples_equal_to_dpokit_generate_on_its_exported_model(tmp_path, monkeypatch):
    """eval.sample_prompts on a LoRA VLM run: samples.jsonl holds the policy's and the reference's greedy
    continuations of the first eval prompts, with their images; at the last step the policy's equal
    `dpokit generate` on the exported model with the same prompts rows (their images read from the file)."""
    from pathlib import Path

    from dpokit.commands.main import main
    from dpokit.experiments.shapes import write_fixture

    example = Path(__file__).resolve().parents[1] / "examples" / "vlm.yaml"
    monkeypatch.chdir(tmp_path)
    write_fixture(tmp_path / "vlm-fixture", train=8, evaluation=2)
    overrides = ["optim.max_steps=2", "optim.batch_size=4", "eval.every_steps=2", "eval.sample_prompts=2"]
    overrides += [
        f"eval.max_new_tokens={MAX_NEW}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    ]
    assert main(["train", str(example), *overrides]) == 0
    samples = [json.loads(line) for line in (tmp_path / "runs" / "vlm" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2] and all(s["policy"] and "reference" in s for s in samples)
    assert all(s["prompt"].count("<image>") == 16 for s in samples)  # the image's tokens are in the prompt
    job = GenerateJob(
        model=str(tmp_path / "runs" / "vlm" / "final"),
        prompts_file=str(tmp_path / "vlm-fixture" / "eval.jsonl"),
        sampling=SamplingConfig(max_new_tokens=MAX_NEW, temperature=0),
        load=LoadOptions("float32", "cpu"),
    )
    assert [s.completion for s in run_generate(job)] == [s["policy"] for s in samples]
