"""Images in preference data: read and check them, find their placeholders, store them, batch them.

One image flows: a row's ``images`` entry (a path relative to the data file, bytes, a ``datasets``
Image value ``{"bytes", "path"}`` or a PIL image) -> the encoded file bytes on the
:class:`~dpokit.data.schema.PreferenceExample` (:func:`read_images`; a missing or unreadable image is
an error naming the file, line and path) -> the prompt's image tokens, as the model's processor
expands each placeholder (:class:`ImageTokens`) -> the bytes kept beside the token ids in the
prepared cache (:class:`ImageTable`) -> the image processor's tensors (``pixel_values`` and whatever
else the model takes, e.g. ``pixel_attention_mask`` or ``image_grid_thw``) in the
:class:`~dpokit.data.batch.Batch` (:func:`image_inputs`), one set per prompt the layout writes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpokit.data.schema import type_name
from dpokit.errors import ConfigError, DataError


def message_text(content: Any) -> str:
    """The text of a message's content: the string itself, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def count_image_parts(messages: Any) -> int:
    """How many ``{"type": "image"}`` parts a message list holds."""
    if not isinstance(messages, list):
        return 0
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image"
    )


def insert_image_parts(messages: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """A copy of ``messages`` with ``count`` image parts at the start of the first user message (the
    rule TRL's ``prepare_multimodal_messages`` applies to rows whose messages hold plain strings)."""
    out = [dict(message) for message in messages]
    for message in out:
        if message["role"] == "user":
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            message["content"] = [{"type": "image"} for _ in range(count)] + parts
            return out
    raise DataError("a prompt with images needs a user message to put them in")


def _encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_bytes(value: Any, base_dir: Path | None) -> tuple[bytes | None, str, str | None]:
    """(bytes, name, problem) of one ``images`` entry; bytes None when ``problem`` says why not."""
    if isinstance(value, dict):  # a datasets Image value
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path") is not None:
            value = value["path"]
        else:
            return None, "?", "an image object needs 'bytes' or 'path'"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), "<bytes>", None
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return path.read_bytes(), str(path), None
        except FileNotFoundError:
            relative = f" (relative paths are read from {base_dir})" if base_dir is not None else ""
            return None, str(path), f"{path}: no such image file{relative}"
        except OSError as error:
            return None, str(path), f"{path}: cannot read the image ({error.strerror or error})"
    if type(value).__module__.startswith("PIL."):
        return _encode_png(value), "<PIL image>", None
    return None, "?", f"expected a path, bytes or an image, got {type_name(value)}"


def read_images(
    values: Sequence[Any], *, field: str, base_dir: Path | None, error: Callable[[str | None, str, str], Exception]
) -> tuple[list[bytes], list[str]]:
    """The encoded bytes and names of a row's images, each checked to be an image PIL can open.

    ``error(field, reason, problem)`` makes the located error (file, line, field) raised for a missing,
    unreadable or invalid image."""
    from PIL import Image

    images: list[bytes] = []
    names: list[str] = []
    for i, value in enumerate(values):
        data, name, problem = _image_bytes(value, base_dir)
        if data is None:
            raise error(f"{field}[{i}]", "bad_image", problem or "unreadable image")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception as exc:  # PIL raises several types for bad files
            raise error(f"{field}[{i}]", "bad_image", f"{name}: not an image file PIL can read ({exc})") from None
        images.append(data)
        names.append(name)
    return images, names


def decode_image(data: bytes) -> Any:
    """A PIL image (RGB) from encoded bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


# ----------------------------------------------------------------------------------------------
# The prompt's image tokens, as the model's processor writes them.


class ImageTokens:
    """How a processor turns each image placeholder of a prompt into image tokens.

    The processor's ``image_token`` (``<image>``, ``<|image_pad|>``, ...) is one token in the rendered
    prompt; the processor replaces it by an expansion that depends on the image (its size, for models
    that tile or resize: Idefics3, Qwen2-VL). :meth:`expansion` asks the processor once per image
    size; :meth:`expand` splices the expansions in. ``protected`` collects every id an expansion
    holds: truncation never cuts those (:func:`dpokit.data.tokenize.truncate`). The splice is checked
    against the processor's own output on the first prompt (:meth:`check`).
    """

    def __init__(self, processor: Any) -> None:
        token = getattr(processor, "image_token", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if token is None or tokenizer is None:
            raise ConfigError(
                f"the processor {type(processor).__name__} has no image_token or tokenizer; dpokit needs a transformers "
                "image-text-to-text processor (AutoProcessor of an AutoModelForImageTextToText model)"
            )
        self.processor = processor
        self.placeholder = str(token)
        self.placeholder_id = int(tokenizer.convert_tokens_to_ids(self.placeholder))
        self.protected: set[int] = {self.placeholder_id}
        self._by_size: dict[tuple[int, int], list[int]] = {}
        self.checked = False

    def expansion(self, image: Any) -> list[int]:
        """The token ids one placeholder becomes for ``image`` (a PIL image)."""
        size = tuple(image.size)
        ids = self._by_size.get(size)
        if ids is None:
            out = self.processor(text=[self.placeholder], images=[[image]], add_special_tokens=False)
            ids = [int(t) for t in out["input_ids"][0]]
            self._by_size[size] = ids
            self.protected.update(ids)
        return ids

    def expand(self, prompt_ids: Sequence[int], images: Sequence[Any]) -> list[int] | None:
        """``prompt_ids`` with its i-th placeholder replaced by image i's expansion; None when the
        number of placeholders differs from the number of images."""
        positions = [j for j, token in enumerate(prompt_ids) if token == self.placeholder_id]
        if len(positions) != len(images):
            return None
        out: list[int] = []
        start = 0
        for position, image in zip(positions, images, strict=True):
            out.extend(prompt_ids[start:position])
            out.extend(self.expansion(image))
            start = position + 1
        out.extend(prompt_ids[start:])
        return out

    def placeholders(self, prompt_ids: Sequence[int]) -> int:
        return sum(1 for token in prompt_ids if token == self.placeholder_id)

    def check(self, prompt_text: str, images: Sequence[Any], expanded: Sequence[int]) -> None:
        """Once: the processor's own ids for ``prompt_text`` must end the spliced ``expanded`` (which may
        start with a BOS the processor call leaves out), else its expansion depends on the text around
        the placeholder and dpokit cannot place image tokens exactly."""
        if self.checked:
            return
        ids = [
            int(t) for t in self.processor(text=[prompt_text], images=[list(images)], add_special_tokens=False)["input_ids"][0]
        ]
        if len(expanded) - len(ids) not in (0, 1) or list(expanded[len(expanded) - len(ids) :]) != ids:
            raise ConfigError(
                f"the processor {type(self.processor).__name__} expands image placeholders depending on the text around "
                "them; dpokit cannot place its image tokens exactly (please report the model type)"
            )
        self.checked = True

    def fingerprint(self) -> str:
        """What decides the image tokens and pixel values: the processor's class and image settings."""
        image_processor = getattr(self.processor, "image_processor", None)
        settings = image_processor.to_json_string() if image_processor is not None else ""
        return f"{type(self.processor).__name__}|{self.placeholder}|{settings}"


# ----------------------------------------------------------------------------------------------
# Storage beside the token ids.


@dataclass
class ImageTable:
    """Every example's images as encoded bytes in flat arrays (cheap to cache and to memory-map).

    ``blob`` (total,) uint8: the images' bytes back to back; ``offsets`` (I+1,) int64: image ``i`` is
    ``blob[offsets[i]:offsets[i+1]]``; ``example_images`` (E+1,) int64: example ``e`` owns images
    ``example_images[e]`` to ``example_images[e+1]`` (exclusive), in placeholder order.
    """

    blob: np.ndarray
    offsets: np.ndarray
    example_images: np.ndarray

    ARRAYS = ("blob", "offsets", "example_images")

    def __len__(self) -> int:
        return len(self.example_images) - 1

    def example(self, e: int) -> list[bytes]:
        first, end = int(self.example_images[e]), int(self.example_images[e + 1])
        return [self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes() for i in range(first, end)]

    @classmethod
    def from_lists(cls, examples: Sequence[Sequence[bytes]]) -> ImageTable:
        flat = [image for images in examples for image in images]
        offsets = np.zeros(len(flat) + 1, dtype=np.int64)
        np.cumsum([len(image) for image in flat], out=offsets[1:])
        example_images = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum([len(images) for images in examples], out=example_images[1:])
        blob = np.frombuffer(b"".join(flat), dtype=np.uint8).copy() if flat else np.zeros(0, dtype=np.uint8)
        return cls(blob, offsets, example_images)

    def check(self, num_examples: int) -> None:
        """Raise ValueError unless the arrays describe ``num_examples`` examples consistently."""
        o, e = self.offsets, self.example_images
        ok = (
            len(o) >= 1
            and o[0] == 0
            and o[-1] == len(self.blob)
            and bool(np.all(np.diff(o) >= 0))
            and len(e) == num_examples + 1
            and e[0] == 0
            and e[-1] == len(o) - 1
            and bool(np.all(np.diff(e) >= 0))
        )
        if not ok:
            raise ValueError("the image arrays do not fit together")


# ----------------------------------------------------------------------------------------------
# Batching.


def image_inputs(image_processor: Any, prompts: Sequence[Sequence[bytes]]) -> dict[str, Any]:
    """The image processor's tensors for the images of each prompt a layout writes, in the order the
    prompts appear in the batch's rows (row-major). Models place image features in the order the image
    tokens appear, so that order is what makes each prompt see its own images. Empty when no prompt has
    an image."""
    import torch

    if not any(prompts):
        return {}
    if image_processor is None:
        raise ConfigError(
            "the batch has images but no image processor was given to the collator; load the model's processor "
            "(an image-text-to-text model) and pass image_processor="
        )
    decoded = [[decode_image(data) for data in images] for images in prompts]
    out = image_processor(images=decoded, return_tensors="pt")
    return {name: value for name, value in out.items() if isinstance(value, torch.Tensor)}
