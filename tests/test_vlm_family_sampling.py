"""Sampling Qwen2-VL, Qwen2.5-VL and Gemma 3 with image prompts (the dpokit engine): a left-padded batch of
prompts with images of different sizes and counts is decoded as transformers' own greedy `generate` decodes
each prompt alone (the same tokens, the same per-step log-probs), and the teacher-forced log-probs of the
samples equal the training log-prob path (padded layout). The models are the sharpened ones of
tests/test_vlm_families.py, whose log-probs depend strongly on positions and attention."""

from __future__ import annotations

import io

import pytest
import torch

from dpokit.data.collate import PaddedCollator
from dpokit.experiments.shapes import MROPE_FAMILIES, QUESTION, build_tiny_vlm
from dpokit.generation import SamplingConfig, completion_logps, encode_prompts, generate
from dpokit.generation.sampler import image_token_ids
from dpokit.logprobs import compute_logps
from tests.test_vlm_families import image_of, model_of, processor_of

FAMILIES = (*MROPE_FAMILIES, "gemma3")
MAX_NEW = 6


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-sampling")
    return {family: build_tiny_vlm(root / family, family, seed=0) for family in FAMILIES}


def sampled_model(directory, family):
    """The sharpened test model; Gemma 3's output layer scaled down (x 0.2), as sharpened it puts nearly all
    its mass on one token whatever the prompt."""
    model = model_of(directory, sharpen=True)
    if family == "gemma3":
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(0.2)
    return model


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prompts_with_images():
    """Three chat prompts of different lengths: one image, a wider image with a longer question, two images
    (tall, then square) between text -- 4, 6 and 10 image tokens on Qwen, 4, 4 and 8 on Gemma 3."""
    question = {"type": "text", "text": QUESTION}
    longer = {"type": "text", "text": f"{QUESTION} Say it in one word, please."}
    rows = [
        ([image_of(32, 32)], [{"type": "image"}, question]),
        ([image_of(48, 32, "blue")], [{"type": "image"}, longer]),
        (
            [image_of(32, 48, "green"), image_of(32, 32)],
            [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, question],
        ),
    ]
    return [[png(image) for image in images] for images, _ in rows], [
        [{"role": "user", "content": content}] for _, content in rows
    ]


def transformers_greedy(model, processor, prompts, images, banned):
    """transformers' greedy `generate` of each prompt alone from the processor's inputs (the image tokens
    suppressed, as dpokit's sampler never emits them): (new token ids, summed log-probs of the chosen tokens
    under the step's processed logits)."""
    from PIL import Image

    out = []
    for prompt, encoded in zip(prompts, images, strict=True):
        text = processor.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in encoded]
        inputs = processor(text=[text], images=[pictures], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            result = model.generate(
                **inputs,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                suppress_tokens=banned,
                eos_token_id=processor.tokenizer.eos_token_id,
                pad_token_id=processor.tokenizer.pad_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new = result.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logp = sum(float(score[0].float().log_softmax(-1)[token]) for score, token in zip(result.scores, new, strict=True))
        out.append((new, logp, inputs["input_ids"][0].tolist()))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_samples_of_a_left_padded_image_batch_equal_transformers_generate_and_the_training_log_probs(family_dirs, family):
    """One left-padded batch of three prompts (1 or 2 images of different sizes): dpokit's greedy completions
    equal transformers' `generate` on each prompt alone, token for token, with the per-step log-probs summed
    within 1e-4; the completions' teacher-forced log-probs (`completion_logps`) equal `compute_logps` on the
    padded training layout within 1e-4 (measured: at most 5e-6). With the 1-D positions and no token types
    the sampler gave these models before, this fails: Qwen2-VL and Qwen2.5-VL left transformers' tokens in
    every row (from the first to the fourth token) and their teacher-forced log-probs were 3.2-25 nats from the
    training path's; Gemma 3 chose the same tokens but with per-step log-probs up to 2.5e-3 off and
    teacher-forced ones 1.5e-4-2.5e-3 off."""
    processor = processor_of(family_dirs[family])
    model = sampled_model(family_dirs[family], family)
    tokenizer, pad = processor.tokenizer, processor.tokenizer.pad_token_id
    images, prompts = prompts_with_images()
    _, ids = encode_prompts(tokenizer, prompts, images=images, processor=processor)
    assert len({len(row) for row in ids}) == 3  # the batch is left-padded
    banned = image_token_ids(model)
    expected = transformers_greedy(model, processor, prompts, images, banned)
    assert ids == [prompt_ids for _, _, prompt_ids in expected]  # the processor's own prompt tokens

    completions = generate(
        model,
        ids,
        SamplingConfig(max_new_tokens=MAX_NEW, temperature=0),
        stop_token_ids=[tokenizer.eos_token_id],
        pad_token_id=pad,
        images=images,
        image_processor=processor.image_processor,
    )
    assert [c.token_ids for c in completions] == [new for new, _, _ in expected]
    torch.testing.assert_close(
        torch.tensor([c.sampling_logp for c in completions]), torch.tensor([logp for _, logp, _ in expected]), atol=1e-4, rtol=0
    )

    outputs = [c.token_ids for c in completions]
    forced = completion_logps(model, ids, outputs, pad_token_id=pad, images=images, image_processor=processor.image_processor)
    items = [
        {"example_id": i, "prompt_ids": prompt, "response_ids": [output], "images": pictures}
        for i, (prompt, output, pictures) in enumerate(zip(ids, outputs, images, strict=True))
    ]
    with torch.no_grad():
        training = compute_logps(model, PaddedCollator(pad, image_processor=processor.image_processor)(items)).logps[:, 0]
    torch.testing.assert_close(forced, training.double(), atol=1e-4, rtol=0)
    assert forced.abs().min() > 1.0  # no completion is near-certain, so the comparison has something to compare


class WithoutCache(torch.nn.Module):
    """``model`` returning no KV cache, so the sampler gives it the whole prefix at every step."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @property
    def base_model(self):
        return self.model.base_model

    def forward(self, **inputs):
        inputs = {name: value for name, value in inputs.items() if name not in ("cache", "past_key_values")}
        out = self.model(**{**inputs, "use_cache": False})
        assert getattr(out, "cache", None) is None and getattr(out, "past_key_values", None) is None
        return out


@pytest.mark.parametrize("family", ("qwen2_vl", "gemma3"))
def test_a_model_without_a_kv_cache_samples_what_the_cached_one_does(family_dirs, family):
    """Without a cache every step reads the whole prefix again, positions and token types included: the sampled
    tokens (temperature 1, 2 samples a prompt) and their log-probs are the cached path's."""
    processor = processor_of(family_dirs[family])
    model = sampled_model(family_dirs[family], family)
    images, prompts = prompts_with_images()
    _, ids = encode_prompts(processor.tokenizer, prompts, images=images, processor=processor)
    common = {"stop_token_ids": [processor.tokenizer.eos_token_id], "pad_token_id": processor.tokenizer.pad_token_id}
    common.update(images=images, image_processor=processor.image_processor)
    sampling = SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=2, seed=1)
    cached = generate(model, ids, sampling, **common)
    uncached = generate(WithoutCache(model), ids, sampling, **common)
    assert [c.token_ids for c in uncached] == [c.token_ids for c in cached]
    torch.testing.assert_close(
        torch.tensor([c.sampling_logp for c in uncached]), torch.tensor([c.sampling_logp for c in cached]), atol=1e-4, rtol=0
    )


def test_a_model_with_3d_positions_but_no_rope_index_is_refused_with_its_model_type(family_dirs):
    """Sampling images on a model that takes mm_token_type_ids but cannot compute its 3-D positions is a
    ConfigError naming the model type, not samples with 1-D positions."""
    from dpokit.errors import ConfigError
    from dpokit.logprobs import multimodal_body

    processor = processor_of(family_dirs["qwen2_vl"])
    model = model_of(family_dirs["qwen2_vl"])
    multimodal_body(model).get_rope_index = None
    images, prompts = prompts_with_images()
    _, ids = encode_prompts(processor.tokenizer, prompts, images=images, processor=processor)
    with pytest.raises(ConfigError, match=r"the 'qwen2_vl' model takes 3-D rotary positions .* no get_rope_index"):
        generate(
            model,
            ids,
            SamplingConfig(max_new_tokens=2, temperature=0),
            stop_token_ids=[processor.tokenizer.eos_token_id],
            pad_token_id=processor.tokenizer.pad_token_id,
            images=images,
            image_processor=processor.image_processor,
        )


def test_an_online_round_on_a_qwen2_vl_model_scores_its_samples_as_training_does(family_dirs, tmp_path):
    """`dpokit online` (one round, one step) on image prompts with the sharpened Qwen2-VL: every stored sample
    log-prob (sampled and teacher-forced by the dpokit engine) equals the training path's (padded layout) on the
    same prompt, images and completion within 1e-4 (with the sampler's former 1-D positions: up to 10.7 nats off)."""
    import json

    from dpokit.config import load_config
    from dpokit.experiments.shapes import shapes_rows
    from dpokit.online import run_online

    directory = tmp_path / "model"
    model_of(family_dirs["qwen2_vl"], sharpen=True).save_pretrained(directory)
    processor = processor_of(family_dirs["qwen2_vl"])
    processor.save_pretrained(directory)
    rows = [{"images": row["images"], "prompt": row["prompt"]} for row in shapes_rows(tmp_path, 3, seed=6)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    overrides = [f"model.name_or_path={directory}", f"logging.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}"]
    overrides += ["optim.optimizer=adamw", "optim.batch_size=3", "optim.grad_accumulation=1", "reference.strategy=copy"]
    overrides += ["eval.every_steps=0", "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false"]
    overrides += ["checkpoint.every_steps=0", f"online.prompts_path={path}", "online.rounds=1", "online.prompts_per_round=3"]
    overrides += ["online.samples_per_prompt=3", "online.steps_per_round=1", "online.sampling.max_new_tokens=6"]
    overrides += ["online.judge=reward:tests.judges.fakes:pixel_length_reward", "online.sampling.temperature=1.0"]
    result = run_online(load_config(None, overrides))
    stages = [result.round_dir(0) / f"{stage}.jsonl" for stage in ("prompts", "completions")]
    prompts, completions = ([json.loads(line) for line in stage.read_text().splitlines()] for stage in stages)
    images = [[(tmp_path / rows[p["source_index"]]["images"][0]).read_bytes()] for p in prompts]
    _, ids = encode_prompts(processor.tokenizer, [p["prompt"] for p in prompts], images=images, processor=processor)
    items = [
        {
            "example_id": i,
            "prompt_ids": ids[c["prompt_index"]],
            "response_ids": [c["token_ids"]],
            "images": images[c["prompt_index"]],
        }
        for i, c in enumerate(completions)
    ]
    model = model_of(directory)
    with torch.no_grad():
        training = compute_logps(model, PaddedCollator(0, image_processor=processor.image_processor)(items)).logps[:, 0]
    assert len(completions) == 9 and all(c["token_ids"] for c in completions)
    torch.testing.assert_close(torch.tensor([c["policy_logp"] for c in completions]), training, atol=1e-4, rtol=0)
