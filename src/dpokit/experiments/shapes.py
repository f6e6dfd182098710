"""A visual preference task in miniature, and tiny vision-language models to train on it.

The task: an image of one coloured shape and the question "What colour is the shape?"; the preferred
answer names the shape's colour, the dispreferred one another colour -- a ground-truth reward a
judge needs no model for. :func:`write_shapes_data` writes the images (PNG) and a JSON Lines file of
chat rows whose ``images`` are paths relative to it, the format ``dpokit train`` reads.

:func:`build_tiny_vlm` saves a randomly initialised image-text-to-text model and its processor with
``save_pretrained`` (a byte-level BPE tokenizer trained on the task's words on the spot, an image
processor configured locally): ``llava`` (CLIP vision tower, MLP projector, Llama), ``idefics3``
(SigLIP-style tower, pixel-shuffle connector, Llama; the SmolVLM family), ``qwen2_vl`` and ``qwen2_5_vl``
(Qwen's ViT and 2x2 merger, a Qwen2 language model with 3-D rotary positions; their processor without a
video processor). All load with ``AutoModelForImageTextToText`` from the directory, and their processors
with ``AutoProcessor`` (the Qwen ones through :func:`dpokit.models.load_processor` where transformers
cannot load a video processor), as a hub model would.

:func:`colour_reward` is the task's ground truth as a reward function (``reward:`` judges, ``dpokit
winrate``): it reads the shape's colour from the image's pixels. :func:`run_shapes_experiment` is
``dpokit experiment shapes``, the proof of learning in miniature: a tiny LLaVA SFT-ed on noisy answers,
then DPO (and its relatives) on correct-vs-wrong pairs, with the ground-truth accuracy before and after
on held-out images and the reward-KL frontier (:mod:`dpokit.experiments.shapes_experiment`).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")
QUESTION = "What colour is the shape?"
# Families every VLM feature is tested on (training, generation, judging).
FAMILIES = ("llava", "idefics3")
# Families with 3-D (multimodal) rotary positions: training is tested on them, generation is not.
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# Gemma 3: bidirectional attention among each image's tokens; training (padded layout) is tested.
ALL_FAMILIES = FAMILIES + MROPE_FAMILIES + ("gemma3",)


def chat_template(image: str = "<image>") -> str:
    """A ChatML-shaped template that writes each {"type": "image"} part as ``image``."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image}{{% else %}}{{{{ part['text'] }}}}{{% endif %}}{{% endfor %}}{{% endif %}}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# The template of LLaVA and Idefics3: the processor's image token where each image goes.
VLM_CHAT_TEMPLATE = chat_template()
# Qwen2-VL's: the image token between its vision markers.
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_QWEN_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
_SPECIALS = {
    "llava": ["<image>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"],
    "qwen2_vl": _QWEN_SPECIALS,
    "qwen2_5_vl": _QWEN_SPECIALS,
    "gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
}
# Special tokens a family's processor reads from the tokenizer by name.
_NAMED = {"gemma3": {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}}
# Where each {"type": "image"} part goes in a family's chat template (the processor's image token).
_TEMPLATE_IMAGE = {"qwen2_vl": _QWEN_IMAGE, "qwen2_5_vl": _QWEN_IMAGE, "gemma3": "<start_of_image>"}


def draw_shape(colour: str, shape: str, *, size: int = 32, rng: random.Random | None = None) -> Any:
    """A PIL image: one ``shape`` filled with ``colour`` on a white background, at a random offset."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 2, size - 4)
    x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x, y, x + extent - 1, y + extent - 1)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x + extent // 2, y), (x, y + extent - 1), (x + extent - 1, y + extent - 1)], fill=fill)
    return image


def shape_colour(image: Any) -> str:
    """The colour (a key of :data:`COLOURS`) nearest to the mean of ``image``'s non-white pixels: the ground
    truth of the task, read from the picture alone."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    painted = pixels[pixels.min(axis=1) < 250]
    mean = (painted if len(painted) else pixels).mean(axis=0)
    return min(COLOURS, key=lambda name: float(((mean - np.asarray(COLOURS[name])) ** 2).sum()))


def named_colours(text: str) -> list[str]:
    """The colour words of :data:`COLOURS` that ``text`` names (as whole words, any case), in order."""
    import re

    return [word for word in re.findall(r"[a-z]+", text.lower()) if word in COLOURS]


def colour_reward(
    prompts: Sequence[Any], completions: Sequence[Any], images: Sequence[Sequence[bytes]] | None = None
) -> list[float]:
    """The task's ground-truth reward: 1 when a completion names exactly one colour and it is the colour of
    its prompt's (first) image, else 0. ``images``: per prompt, its encoded image files (a ``reward:``
    judge hands them over; see :mod:`dpokit.judges.reward`). Usable as
    ``--judge reward:dpokit.experiments.shapes:colour_reward``."""
    from dpokit.data.images import decode_image
    from dpokit.errors import ConfigError

    if images is None or len(images) != len(completions) or any(not group for group in images):
        raise ConfigError("colour_reward judges the shapes task by its images: every prompt needs its image (images=)")
    truth: dict[bytes, str] = {}
    rewards = []
    for completion, group in zip(completions, images, strict=True):
        colour = truth.get(group[0])
        if colour is None:
            colour = truth[group[0]] = shape_colour(decode_image(group[0]))
        named = set(named_colours(completion if isinstance(completion, str) else str(completion)))
        rewards.append(1.0 if named == {colour} else 0.0)
    return rewards


def shapes_rows(directory: str | Path, n: int, *, seed: int = 0, size: int = 32) -> list[dict[str, Any]]:
    """``n`` preference rows of the task, their images written to ``directory/images`` (paths in the
    rows are relative to ``directory``)."""
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        wrong = rng.choice([c for c in COLOURS if c != colour])
        name = f"images/{seed}_{i:05d}.png"
        draw_shape(colour, shape, size=size, rng=rng).save(root / name)
        rows.append(
            {
                "images": [name],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                "chosen": [{"role": "assistant", "content": f"It is {colour}."}],
                "rejected": [{"role": "assistant", "content": f"It is {wrong}."}],
                "colour": colour,
            }
        )
    return rows


def write_shapes_data(directory: str | Path, n: int = 64, *, seed: int = 0, name: str = "train.jsonl", size: int = 32) -> Path:
    """Write ``n`` rows of the task to ``directory/name`` (JSON Lines) with their images; return the file."""
    path = Path(directory) / name
    rows = shapes_rows(directory, n, seed=seed, size=size)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _corpus() -> list[str]:
    words = [f"It is {c}." for c in COLOURS] + [QUESTION, "a " + " ".join(SHAPES), "user assistant system"]
    return words * 20


def train_vlm_tokenizer(family: str, vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer trained on the task's words, with ChatML markers and the family's
    image tokens as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", *_SPECIALS[family]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    # PreTrainedTokenizerFast.__init__ is unannotated in transformers 5.24.
    named = {"extra_special_tokens": _NAMED[family]} if family in _NAMED else {}
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>", **named
    )
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIALS[family]})
    tokenizer.chat_template = chat_template(_TEMPLATE_IMAGE.get(family, "<image>"))
    return tokenizer


def _text_config(tokenizer: Any, hidden_size: int, layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _vision_sizes(hidden_size: int, layers: int, image_size: int, patch_size: int) -> dict[str, Any]:
    """The vision tower's sizes, the same for every family: the text model's width and depth."""
    return dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def _llava(tokenizer: Any, hidden_size: int, layers: int, image_size: int, patch_size: int) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    vision = CLIPVisionConfig(**_vision_sizes(hidden_size, layers, image_size, patch_size), projection_dim=hidden_size)
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, hidden_size, layers),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(  # type: ignore[no-untyped-call]  # unannotated in transformers 5.24
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=VLM_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    return LlavaForConditionalGeneration(config), processor


def _idefics3(tokenizer: Any, hidden_size: int, layers: int, image_size: int, patch_size: int) -> tuple[Any, Any]:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    scale_factor = 2
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}
    )
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=VLM_CHAT_TEMPLATE
    )
    vision = Idefics3VisionConfig(**_vision_sizes(hidden_size, layers, image_size, patch_size))
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=_text_config(tokenizer, hidden_size, layers).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _qwen_vl(tokenizer: Any, hidden_size: int, layers: int, image_size: int, patch_size: int, *, version: str) -> tuple[Any, Any]:
    """Qwen2-VL (``version`` "2") or Qwen2.5-VL ("2.5"): a ViT over patch_size patches (2 frames each), a 2x2
    merger, a Qwen2 language model with 3-D rotary positions. The PIL image processor and no video
    processor (:func:`dpokit.models.image_only_processor`): no torchvision needed."""
    import transformers

    from dpokit.models import image_only_processor

    merge = 2
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in zip(("start", "image", "end", "video"), _QWEN_SPECIALS, strict=True)
    }
    text = _text_config(tokenizer, hidden_size, layers).to_dict()
    head_dim = hidden_size // text["num_attention_heads"]
    # The rotary half-dimension split over (time, height, width), as Qwen2-VL's [16, 24, 24] of 64.
    quarter = head_dim // 8
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
    }
    vision: dict[str, Any] = dict(
        depth=layers, hidden_size=hidden_size, num_heads=4, patch_size=patch_size, spatial_merge_size=merge
    )
    if version == "2":
        vision.update(embed_dim=hidden_size, mlp_ratio=2)
        names = ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")
    else:
        # Window attention in every block but the last, windows of one merged patch group.
        vision.update(intermediate_size=2 * hidden_size, out_hidden_size=hidden_size, window_size=merge * patch_size)
        vision.update(fullatt_block_indexes=[layers - 1])
        names = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")
    config_class, model_class, processor_class = (getattr(transformers, name) for name in names)
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
    )
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=merge, min_pixels=(merge * patch_size) ** 2, max_pixels=(2 * image_size) ** 2
    )
    processor = image_only_processor(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template(_QWEN_IMAGE)
    )
    return model_class(config), processor


def _gemma3(tokenizer: Any, hidden_size: int, layers: int, image_size: int, patch_size: int) -> tuple[Any, Any]:
    """Gemma 3: a SigLIP tower, average pooling to 4 tokens per image, a Gemma 3 language model whose image
    tokens attend to each other both ways (``token_type_ids``); each image is ``\\n\\n<start_of_image>``,
    its tokens and ``<end_of_image>\\n\\n``."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _NAMED["gemma3"].items()}
    text = _text_config(tokenizer, hidden_size, layers).to_dict()
    # A window wider than any test row: every layer sees the whole prompt, as the full-attention layers do.
    text.update(head_dim=hidden_size // text["num_attention_heads"], sliding_window=512)
    config = Gemma3Config(
        text_config={k: v for k, v in text.items() if k not in ("model_type", "architectures")},
        vision_config=_vision_sizes(hidden_size, layers, image_size, patch_size),
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template("<start_of_image>"), image_seq_length=4
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises the projector's weight to zeros (every image would embed to zero vectors and the
    # model could not see its images); a checkpoint's is trained: give it the initializer's normal draw.
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    torch.nn.init.normal_(projection, std=float(config.initializer_range or 0.02))
    return model, processor


_BUILDERS: dict[str, Callable[[Any, int, int, int, int], tuple[Any, Any]]] = {
    "llava": _llava,
    "idefics3": _idefics3,
    "qwen2_vl": functools.partial(_qwen_vl, version="2"),
    "qwen2_5_vl": functools.partial(_qwen_vl, version="2.5"),
    "gemma3": _gemma3,
}


def build_tiny_vlm(
    directory: str | Path,
    family: str = "llava",
    *,
    seed: int = 0,
    hidden_size: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
) -> Path:
    """Save a randomly initialised ``family`` VLM (see the module docstring) and its processor in
    ``directory``; return it. ``image_size`` / ``patch_size`` set the image tokens: 16 per image for
    LLaVA at 32/8, 4 (+ 3 markers) for Idefics3 and Gemma 3, 4 (+ 2 markers) for Qwen2-VL / Qwen2.5-VL."""
    import torch

    from dpokit.models import quiet_progress_bars

    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r}; choose from {', '.join(ALL_FAMILIES)}")
    tokenizer = train_vlm_tokenizer(family)
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](tokenizer, hidden_size, layers, image_size, patch_size)
    out = Path(directory)
    with quiet_progress_bars():
        model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_fixture(directory: str | Path, *, family: str = "llava", train: int = 64, evaluation: int = 16) -> Path:
    """A tiny ``family`` VLM in ``directory/model`` and the shapes task in ``directory/train.jsonl`` and
    ``directory/eval.jsonl`` (images in ``directory/images``): what ``examples/vlm.yaml`` trains on."""
    root = Path(directory)
    build_tiny_vlm(root / "model", family)
    write_shapes_data(root, train, seed=0, name="train.jsonl")
    write_shapes_data(root, evaluation, seed=1, name="eval.jsonl")
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m dpokit.experiments.shapes [DIRECTORY [FAMILY]]`` (default ``vlm-fixture llava``):
    :func:`write_fixture`."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    directory = args[0] if args else "vlm-fixture"
    family = args[1] if len(args) > 1 else "llava"
    if family not in ALL_FAMILIES or len(args) > 2 or directory.startswith("-"):
        print(f"usage: python -m dpokit.experiments.shapes [DIRECTORY [{'|'.join(ALL_FAMILIES)}]]", file=sys.stderr)
        return 2
    root = write_fixture(directory, family=family)
    print(f"wrote a tiny {family} model to {root / 'model'} and the shapes task to {root}/train.jsonl, eval.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
