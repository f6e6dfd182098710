"""Vision-language families whose language model needs more than token ids and 1-D positions, tiny, built from
config. Qwen2-VL and Qwen2.5-VL (3-D rotary positions; processors without a video processor): the processor
loads without torchvision, per-example DPO losses equal TRL 1.16's in the padded layout, the shared-prompt and
packed layouts give the padded log-probs (their positions come from the model's own rope index), the
precomputed reference equals the live one, image errors stay located, and `dpokit train` runs with
`data.layout: auto`. Gemma 3 (bidirectional attention among each image's tokens): TRL parity in the padded
layout, which `layout: auto` picks; the shared-prompt layouts are refused with images."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dpokit.config import ModelConfig
from dpokit.data import PrepareOptions, make_collator, prepare_dataset
from dpokit.errors import ConfigError, DataError
from dpokit.experiments.shapes import MROPE_FAMILIES, QUESTION, build_tiny_vlm, draw_shape, shapes_rows
from dpokit.logprobs import compute_logps, final_hidden_states, multimodal_body
from dpokit.losses import LossInputs, build_objective
from dpokit.models import load_processor
from tests.test_vlm import trl_per_example, trl_rows

BETA = 0.1
NUM_PAIRS = 4
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {family: build_tiny_vlm(root / family, family, seed=0) for family in (*MROPE_FAMILIES, "gemma3")}


def processor_of(directory):
    return load_processor(ModelConfig(name_or_path=str(directory)))


def model_of(directory, *, sharpen=False):
    """The saved model; ``sharpen``: the language model's query, key and output weights made large, so the
    log-probs depend strongly on attention and with it on the rotary positions (at the initial scale every
    answer is near-uniform and positions hardly matter)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    if sharpen:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
                elif "language_model" in name and name.endswith(("q_norm.weight", "k_norm.weight")):
                    parameter.fill_(3.0)  # Gemma 3 normalises queries and keys: scale them after the norm
            head = model.get_output_embeddings().weight  # tied to the input embeddings in Gemma 3
            head.copy_(torch.randn(head.shape, generator=generator))
    return model


def test_the_processor_loads_without_a_video_processor_and_saves_under_its_own_class(qwen_dirs):
    processor = processor_of(qwen_dirs["qwen2_vl"])
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.image_token == "<|image_pad|>"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    saved = json.loads((qwen_dirs["qwen2_vl"] / "processor_config.json").read_text(encoding="utf-8"))
    assert saved["processor_class"] == "Qwen2VLProcessor"
    assert type(processor_of(qwen_dirs["qwen2_5_vl"])).__name__ == "Qwen2_5_VLProcessor"


@pytest.mark.parametrize("family", (*MROPE_FAMILIES, "gemma3"))
def test_per_example_dpo_losses_equal_trl_in_the_padded_layout(qwen_dirs, tmp_path, family):
    """TRL 1.16's DPOTrainer (its vision collator passes the processor's mm_token_type_ids / token_type_ids;
    the model computes its 3-D positions / its image attention from them) against dpokit's padded layout,
    which builds them from the token ids: equal to 1e-4 (float32, CPU)."""
    trl = pytest.importorskip("trl")

    def check_batch(batch):
        assert ("mm_token_type_ids" in batch and "image_grid_thw" in batch) or "token_type_ids" in batch

    directory = qwen_dirs[family]
    reference_dir = build_tiny_vlm(tmp_path / "reference", family, seed=1)
    rows, trl_data = trl_rows(tmp_path, NUM_PAIRS)
    processor = processor_of(directory)
    policy, reference = model_of(directory, sharpen=True), model_of(reference_dir, sharpen=True)
    trl_losses, trl_logps = trl_per_example(trl, policy, reference, processor, trl_data, tmp_path / "trl", check_batch)

    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    options = PrepareOptions(max_length=None)
    items = list(prepare_dataset(rows_file, processor.tokenizer, options, processor=processor, use_cache=False).items)
    batch = make_collator("padded", processor.tokenizer.pad_token_id, image_processor=processor.image_processor)(items)
    assert batch.position_ids is None and "pixel_values" in batch.image_inputs
    policy, reference = model_of(directory, sharpen=True).train(), model_of(reference_dir, sharpen=True)
    with torch.no_grad():
        policy_logps, reference_logps = compute_logps(policy, batch).logps, compute_logps(reference, batch).logps
    out = build_objective([{"name": "sigmoid"}], beta=BETA)(
        LossInputs(policy_logps, reference_logps, batch.response_lengths, batch.response_mask)
    )
    margins = (policy_logps[:, 0] - reference_logps[:, 0]) - (policy_logps[:, 1] - reference_logps[:, 1])
    per_example = -torch.nn.functional.logsigmoid(BETA * margins)
    torch.testing.assert_close(policy_logps, torch.tensor(trl_logps), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_example, torch.tensor(trl_losses), atol=1e-4, rtol=0)
    assert (per_example - torch.log(torch.tensor(2.0))).abs().max() > 1e-3  # the two models differ: not a tie
    assert out.loss.item() == pytest.approx(sum(trl_losses) / NUM_PAIRS, abs=1e-4)


def image_of(width, height, colour="red"):
    return draw_shape(colour, "square", size=max(width, height)).resize((width, height))


def mixed_rows():
    """Images of three sizes (so 4 or 6 image tokens), a prompt with two images between text, and a plain-text
    prompt that ends with its image (the response follows the image directly)."""

    def chat(images, content):
        return {
            "images": images,
            "prompt": [{"role": "user", "content": content}],
            "chosen": [{"role": "assistant", "content": "It is red."}],
            "rejected": [{"role": "assistant", "content": "It is blue, a square."}],
        }

    question = {"type": "text", "text": QUESTION}
    return [
        chat([image_of(32, 32)], [{"type": "image"}, question]),
        chat([image_of(48, 32, "blue")], [{"type": "image"}, question]),
        chat(
            [image_of(32, 48, "green"), image_of(32, 32)],
            [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, question],
        ),
        {"images": [image_of(48, 32)], "prompt": f"{QUESTION} {IMAGE}", "chosen": "red", "rejected": "It is yellow."},
    ]


@pytest.mark.parametrize("family", MROPE_FAMILIES)
def test_the_shared_prompt_and_packed_layouts_give_the_padded_log_probs_with_3d_positions(qwen_dirs, family):
    """The padded rows get their positions from the model itself; the shared-prompt and packed rows get them from
    dpokit (the prompt's from the model's rope index, the responses' after it). Equal to 1e-4 on a model whose
    attention depends strongly on positions; with the 1-D positions the layout writes, they would differ."""
    processor = processor_of(qwen_dirs[family])
    model = model_of(qwen_dirs[family], sharpen=True)
    prepared = prepare_dataset(
        mixed_rows(), processor.tokenizer, PrepareOptions(max_length=None), processor=processor, use_cache=False
    )
    items = list(prepared.items)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert sorted(item["prompt_ids"].count(image_id) for item in items) == [4, 6, 6, 10]
    logps = {}
    for layout in ("padded", "shared_prompt", "packed"):
        options = {"pack_tokens": 200} if layout == "packed" else {}
        batch = make_collator(layout, processor.tokenizer.pad_token_id, image_processor=processor.image_processor, **options)(
            items
        )
        with torch.no_grad():
            logps[layout] = compute_logps(model, batch).logps
        if layout == "packed":
            assert batch.input_ids.shape[0] < len(items)  # several prompts share a row
    torch.testing.assert_close(logps["shared_prompt"], logps["padded"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logps["packed"], logps["padded"], atol=1e-4, rtol=0)

    # The control: the same shared-prompt batch with its 1-D positions (each axis the same) is measurably off.
    batch = make_collator("shared_prompt", processor.tokenizer.pad_token_id, image_processor=processor.image_processor)(items)
    types = (batch.input_ids == image_id).long()
    inputs = {**batch.model_inputs(), "mm_token_type_ids": types, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        hidden = final_hidden_states(model, inputs)
        logits = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[batch.score_index]).float()
    token_logps = logits.log_softmax(-1).gather(1, batch.score_target[:, None]).squeeze(1)
    flat = torch.zeros(batch.num_sequences).index_add(0, batch.score_seq, token_logps)
    wrong = flat.view(batch.num_responses, batch.batch_size).t()
    assert (wrong - logps["padded"]).abs().max() > 1.0
    assert type(multimodal_body(model)).__name__.endswith("Model")


@pytest.mark.parametrize("family", MROPE_FAMILIES)
def test_the_precomputed_reference_equals_the_live_one_on_a_qwen_vl_model(qwen_dirs, family):
    from dpokit.training.reference import compute_reference_logps

    processor = processor_of(qwen_dirs[family])
    model = model_of(qwen_dirs[family], sharpen=True)
    items = list(prepare_dataset(mixed_rows(), processor.tokenizer, processor=processor, use_cache=False).items)
    for layout in ("padded", "shared_prompt"):
        collate = make_collator(layout, processor.tokenizer.pad_token_id, image_processor=processor.image_processor)
        ids, table = compute_reference_logps(model, items, collate, batch_size=3)
        with torch.no_grad():
            live = compute_logps(model, collate(items)).logps
        torch.testing.assert_close(table[ids.argsort()], live, atol=1e-5, rtol=0)


def test_image_errors_on_a_qwen_vl_model_name_the_row_field_and_placeholder(qwen_dirs, tmp_path):
    processor = processor_of(qwen_dirs["qwen2_vl"])
    image = tmp_path / "red.png"
    image_of(32, 32).save(image)
    plain = {"images": ["red.png"], "prompt": QUESTION, "chosen": "red", "rejected": "blue"}
    two = {**mixed_rows()[0], "images": ["red.png", "red.png"]}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(plain) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rows.jsonl:line 1: field 'images': the row has 1 image\(s\) but write <\|image_pad\|>"):
        prepare_dataset(data, processor.tokenizer, processor=processor, use_cache=False)
    data.write_text(json.dumps(two) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rows.jsonl:line 1: field 'images': the row has 2 image\(s\) but its prompt has 1"):
        prepare_dataset(data, processor.tokenizer, processor=processor, use_cache=False)


@pytest.mark.slow
def test_dpokit_train_trains_a_qwen2_vl_model_with_the_auto_layout_and_exports_it(tmp_path, caplog):
    """Two steps of `dpokit train` on the Qwen2-VL fixture: `layout: auto` picks the shared prompt (cheaper for
    these short answers), the losses are finite and the exported model's processor loads."""
    from dpokit.commands.main import main
    from dpokit.experiments.shapes import write_fixture

    fixture = write_fixture(tmp_path / "fixture", family="qwen2_vl", train=8, evaluation=4)
    config = tmp_path / "cfg.yaml"
    config.write_text("optim:\n  optimizer: adamw\n", encoding="utf-8")
    overrides = [
        f"model.name_or_path={fixture / 'model'}",
        f"data.train_path={fixture / 'train.jsonl'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"logging.run_dir={tmp_path / 'run'}",
        "data.layout=auto",
        "optim.max_steps=2",
        "optim.batch_size=4",
        "optim.grad_accumulation=1",
        "optim.lr=1e-2",
        "eval.every_steps=0",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    ]
    with caplog.at_level(logging.INFO, logger="dpokit.training.trainer"):
        assert main(["train", str(config), *overrides]) == 0
    assert "layout: shared_prompt (estimated decoder FLOPs" in caplog.text
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m.get("split") == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert type(processor_of(tmp_path / "run" / "final")).__name__ == "Qwen2VLProcessor"


def test_gemma3_trains_in_the_padded_layout_only_auto_picks_it_and_shared_prompt_is_refused(qwen_dirs, tmp_path):
    """Gemma 3's image tokens attend to each other both ways, which the shared-prompt mask does not express:
    with images, a shared_prompt batch is a ConfigError naming the model type, and layout auto gives padded."""
    from dpokit.training.layout import plan_layout

    processor = processor_of(qwen_dirs["gemma3"])
    model = model_of(qwen_dirs["gemma3"], sharpen=True)
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in shapes_rows(tmp_path, 3)), encoding="utf-8")
    items = list(prepare_dataset(rows_file, processor.tokenizer, processor=processor, use_cache=False).items)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert all(item["prompt_ids"].count(image_id) == 4 for item in items)
    layout, why = plan_layout("auto", model, {"padded": [items], "shared_prompt": [items]})
    assert layout == "padded" and "'gemma3'" in why
    collate = make_collator("shared_prompt", processor.tokenizer.pad_token_id, image_processor=processor.image_processor)
    with pytest.raises(ConfigError, match=r"the 'gemma3' model attends both ways .*use data.layout=padded"):
        compute_logps(model, collate(items))
