"""Rows with images: reading (paths, bytes, datasets Image values, PIL), located errors, image tokens from
the model's processor, truncation that never cuts them, the prepared cache, and every batch layout."""

from __future__ import annotations

import io
import json

import pytest
import torch

from dpokit.data import PrepareOptions, make_collator, prepare_dataset, read_preferences
from dpokit.errors import DataError
from dpokit.experiments.shapes import QUESTION, build_tiny_vlm, draw_shape, write_shapes_data
from dpokit.logprobs import compute_logps


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny LLaVA (16 image tokens per image) saved and loaded back by path, with its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    directory = build_tiny_vlm(tmp_path_factory.mktemp("llava") / "model", "llava")
    return AutoModelForImageTextToText.from_pretrained(directory).eval(), AutoProcessor.from_pretrained(directory)


def chat_row(images, *, parts=1, text=QUESTION):
    content = [{"type": "image"}] * parts + [{"type": "text", "text": text}]
    return {
        "images": images,
        "prompt": [{"role": "user", "content": content}],
        "chosen": [{"role": "assistant", "content": "It is red."}],
        "rejected": [{"role": "assistant", "content": "It is blue."}],
    }


def png_bytes(colour="red"):
    buffer = io.BytesIO()
    draw_shape(colour, "square").save(buffer, format="PNG")
    return buffer.getvalue()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_image_paths_are_read_relative_to_the_data_file_and_kept_as_bytes(tmp_path):
    data = write_shapes_data(tmp_path / "data", 3)
    examples, _ = read_preferences(data)
    assert [len(ex.images) for ex in examples] == [1, 1, 1]
    first = json.loads(data.read_text().splitlines()[0])["images"][0]
    assert examples[0].images[0] == (tmp_path / "data" / first).read_bytes()
    assert examples[0].image_names == [str((tmp_path / "data" / first).resolve())]


def test_bytes_datasets_image_values_and_pil_images_are_read_alike(tmp_path):
    from datasets import Dataset, Features, Image, Value

    raw = png_bytes()
    rows = [chat_row([raw]), chat_row([{"bytes": raw, "path": None}]), chat_row([draw_shape("red", "square")])]
    examples, _ = read_preferences(rows)
    assert examples[0].images == [raw] and examples[1].images == [raw]
    assert examples[2].images[0].startswith(b"\x89PNG")
    features = Features({"images": [Image()], "prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string")})
    dataset = Dataset.from_dict(
        {"images": [[raw]], "prompt": ["<image> Which colour?"], "chosen": ["red"], "rejected": ["blue"]}, features=features
    )
    (example,), _ = read_preferences(dataset)
    assert example.images == [raw]


def test_a_chat_prompt_without_image_parts_gets_them_before_its_first_user_text():
    row = chat_row([png_bytes()], parts=0)
    row["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    (example,), _ = read_preferences([row])
    assert example.prompt[1]["content"] == [{"type": "image"}, {"type": "text", "text": QUESTION}]


def test_a_missing_image_names_the_file_line_field_and_path(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", [chat_row(["images/a.png"])])
    with pytest.raises(DataError) as error:
        read_preferences(data)
    message = str(error.value)
    assert f"{data}:line 1: field 'images[0]'" in message
    assert f"{tmp_path / 'images' / 'a.png'}: no such image file" in message


def test_a_file_that_is_not_an_image_is_refused_with_its_path(tmp_path):
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    data = write_rows(tmp_path / "rows.jsonl", [chat_row(["notes.png"])])
    with pytest.raises(DataError, match=r"rows.jsonl:line 1: field 'images\[0\]': .*notes.png: not an image file PIL can read"):
        read_preferences(data)


def test_an_image_count_that_differs_from_the_placeholders_is_an_error_or_a_counted_skip(tmp_path):
    for colour in ("red", "blue"):
        (tmp_path / f"{colour}.png").write_bytes(png_bytes(colour))
    rows = [chat_row(["red.png", "blue.png"], parts=1), chat_row(["red.png"])]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=r"line 1: field 'images': the row has 2 image\(s\) but its prompt has 1 image"):
        read_preferences(data)
    examples, report = read_preferences(data, skip_invalid=True)
    assert len(examples) == 1 and report.skipped == {"image_count": 1}


def test_a_plain_text_prompt_without_the_placeholder_is_refused_when_tokenized(llava, tmp_path):
    _, processor = llava
    rows = [{"images": [png_bytes()], "prompt": "Which colour?", "chosen": "red", "rejected": "blue"}]
    with pytest.raises(DataError, match=r"row 1: field 'images': the row has 1 image\(s\) but write <image> where each image"):
        prepare_dataset(rows, processor.tokenizer, processor=processor, use_cache=False)
    rows[0]["prompt"] = "<image> Which colour?"
    prepared = prepare_dataset(rows, processor.tokenizer, processor=processor, use_cache=False)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert prepared.items[0]["prompt_ids"].count(image_id) == 16


def test_images_without_a_processor_are_a_config_error_not_dropped(llava):
    from dpokit.errors import ConfigError

    _, processor = llava
    with pytest.raises(ConfigError, match="the data has images .* but no image processor"):
        prepare_dataset([chat_row([png_bytes()])], processor.tokenizer, use_cache=False)


def test_truncation_cuts_the_prompt_text_around_its_image_tokens(llava):
    _, processor = llava
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    long_text = " ".join(["What colour is the shape?"] * 6)
    rows = [chat_row([png_bytes()], text=long_text), chat_row([png_bytes()])]
    whole = prepare_dataset(rows, processor.tokenizer, PrepareOptions(max_length=None), processor=processor, use_cache=False)
    assert len(whole.items[0]["prompt_ids"]) > 40
    cut = prepare_dataset(
        rows, processor.tokenizer, PrepareOptions(max_length=44, max_prompt_length=24), processor=processor, use_cache=False
    )
    assert cut.report.tokenize.prompt_truncated == 1  # the short row fits and is not cut
    prompt = cut.items[0]["prompt_ids"]
    assert len(prompt) == 24 and prompt.count(image_id) == 16  # text cut, every image token kept
    # keep_end keeps the prompt's end: the tokens after the image are the end of the uncut prompt.
    assert prompt[-3:] == whole.items[0]["prompt_ids"][-3:]


def test_rows_whose_image_tokens_exceed_max_prompt_length_are_reported_and_counted(llava):
    _, processor = llava
    rows = [chat_row([png_bytes()]), chat_row([png_bytes()], text="short")]
    with pytest.raises(DataError, match="no examples left") as error:
        prepare_dataset(
            rows, processor.tokenizer, PrepareOptions(max_length=16, max_prompt_length=12), processor=processor, use_cache=False
        )
    assert "dropped 2: image_tokens_exceed_max_prompt_length" in str(error.value)
    assert "16 image tokens, max_prompt_length=12" in str(error.value)


def test_the_cache_keeps_the_images_and_gives_the_same_items(llava, tmp_path):
    _, processor = llava
    data = write_shapes_data(tmp_path / "data", 4)
    first = prepare_dataset(data, processor.tokenizer, processor=processor, cache_dir=tmp_path / "cache")
    again = prepare_dataset(data, processor.tokenizer, processor=processor, cache_dir=tmp_path / "cache")
    assert not first.from_cache and again.from_cache
    assert list(first.items) == list(again.items) and len(again.items[3]["images"]) == 1


@pytest.mark.parametrize("layout", ["shared_prompt", "packed"])
def test_every_layout_gives_the_padded_log_probs_and_the_images_matter(llava, tmp_path, layout):
    model, processor = llava
    data = write_shapes_data(tmp_path / "data", 4)
    items = list(prepare_dataset(data, processor.tokenizer, processor=processor, use_cache=False).items)
    options = {"pack_tokens": 256} if layout == "packed" else {}

    def logps(layout_name, batch_items, **extra):
        collate = make_collator(layout_name, processor.tokenizer.pad_token_id, image_processor=processor.image_processor, **extra)
        with torch.no_grad():
            return compute_logps(model, collate(batch_items)).logps

    padded = logps("padded", items)
    torch.testing.assert_close(logps(layout, items, **options), padded, atol=1e-4, rtol=0)
    swapped = [{**item, "images": items[(i + 1) % 4]["images"]} for i, item in enumerate(items)]
    assert not torch.allclose(logps("padded", swapped), padded, atol=1e-4)
