"""Vision-language preference training on tiny VLMs built from config (LLaVA and Idefics3, random init, a
tokenizer trained on the spot, image processors configured locally, saved and loaded back by path):
loading through dpokit's loading layer, TRL 1.16 parity of per-example DPO losses, the precomputed
reference equal to the live one, and `dpokit train` end to end on a YAML config."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dpokit.config import ModelConfig, load_config
from dpokit.data import PrepareOptions, make_collator, prepare_dataset
from dpokit.experiments.shapes import FAMILIES, build_tiny_vlm, shapes_rows, write_fixture
from dpokit.logprobs import compute_logps
from dpokit.losses import LossInputs, build_objective
from dpokit.models import apply_lora, load_model_and_tokenizer, load_processor
from tests.helpers import trl_dpo_config

BETA = 0.1
NUM_PAIRS = 4


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: build_tiny_vlm(root / family, family, seed=0) for family in FAMILIES}


def load(directory, **vision):
    cfg = ModelConfig(name_or_path=str(directory), device="cpu")
    for key, value in vision.items():
        setattr(cfg.vision, key, value)
    model, tokenizer = load_model_and_tokenizer(cfg, device=torch.device("cpu"))
    return model, tokenizer, load_processor(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loading_layer_loads_a_vlm_and_its_processor_with_the_vision_tower_frozen(vlm_dirs, family):
    model, tokenizer, processor = load(vlm_dirs[family])
    assert (
        type(model).__name__ == {"llava": "LlavaForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration"}[family]
    )
    assert processor is not None and processor.image_processor is not None and tokenizer.pad_token_id is not None
    tower = "vision_tower" if family == "llava" else "vision_model"
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(f".{tower}." in f".{name}" for name in frozen)
    assert all(p.requires_grad for name, p in model.named_parameters() if "language_model" in name or "text_model" in name)
    trained, _, _ = load(vlm_dirs[family], train_vision_tower=True)
    assert all(p.requires_grad for p in trained.parameters())


def test_a_text_model_has_no_processor(tmp_path):
    from tests.helpers import write_tiny_model_dir

    assert load_processor(ModelConfig(name_or_path=str(write_tiny_model_dir(tmp_path / "lm")))) is None


def test_lora_goes_into_the_language_model_only_by_default_and_everywhere_with_all(vlm_dirs):
    from dpokit.config import LoraConfig

    model, _, _ = load(vlm_dirs["llava"])
    adapted = apply_lora(model, LoraConfig(enabled=True, r=4, target_modules="all-linear"))
    names = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert names and all("language_model" in name and "lora_" in name for name in names)
    model, _, _ = load(vlm_dirs["llava"])
    everywhere = apply_lora(model, LoraConfig(enabled=True, r=4, target_modules="all-linear"), vision_scope="all")
    names = [name for name, p in everywhere.named_parameters() if p.requires_grad]
    assert any("vision_tower" in name for name in names) and any("multi_modal_projector" in name for name in names)
    assert not any("lm_head" in name for name in names)


def trl_rows(tmp_path, n):
    """Shapes rows with their images as PIL images (TRL's ``images`` column) and as paths (dpokit's)."""
    from PIL import Image

    rows = shapes_rows(tmp_path, n, seed=3)
    trl = [
        {**{k: v for k, v in row.items() if k != "colour"}, "images": [Image.open(tmp_path / row["images"][0]).convert("RGB")]}
        for row in rows
    ]
    return rows, trl


def trl_per_example(trl, policy, reference, processor, trl_data, out, check_batch=lambda batch: None):
    """TRL 1.16's DPOTrainer on ``policy``/``reference`` with ``processor`` (its vision collator, its loss code),
    one ``_compute_loss`` per example of ``trl_data``: the per-example losses and [chosen, rejected] log-probs.
    ``check_batch`` sees each collated batch."""
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=policy,
            ref_model=reference,
            args=trl_dpo_config(str(out), beta=BETA, batch_size=len(trl_data)),
            train_dataset=Dataset.from_list(trl_data),
            processing_class=processor,
        )
    trainer.model.train()
    losses, logps = [], []
    with torch.no_grad():
        for i in range(len(trl_data)):
            trainer._metrics["train"].clear()
            batch = trainer.data_collator([dict(trainer.train_dataset[i])])
            check_batch(batch)
            losses.append(trainer._compute_loss(trainer.model, batch, return_outputs=False).item())
            logps.append([trainer._metrics["train"][f"logps/{k}"][0] for k in ("chosen", "rejected")])
    return losses, logps


@pytest.mark.parametrize("family", FAMILIES)
def test_per_example_dpo_losses_equal_trl_on_the_same_vlm_and_rows(vlm_dirs, tmp_path, family):
    """TRL 1.16's DPOTrainer with the VLM's processor (its vision collator, its loss code), one
    ``_compute_loss`` per example, against dpokit's shared-prompt log-probs and sigmoid loss: equal to
    1e-4 (float32 on CPU)."""
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    directory = vlm_dirs[family]
    reference_dir = build_tiny_vlm(tmp_path / "reference", family, seed=1)
    rows, trl_data = trl_rows(tmp_path, NUM_PAIRS)
    processor = AutoProcessor.from_pretrained(directory)
    trl_losses, trl_logps = trl_per_example(
        trl,
        AutoModelForImageTextToText.from_pretrained(directory),
        AutoModelForImageTextToText.from_pretrained(reference_dir),
        processor,
        trl_data,
        tmp_path / "trl",
    )

    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    items = list(
        prepare_dataset(
            rows_file, processor.tokenizer, PrepareOptions(max_length=None), processor=processor, use_cache=False
        ).items
    )
    collate = make_collator("shared_prompt", processor.tokenizer.pad_token_id, image_processor=processor.image_processor)
    policy = AutoModelForImageTextToText.from_pretrained(directory).train()
    reference = AutoModelForImageTextToText.from_pretrained(reference_dir).eval()
    batch = collate(items)
    with torch.no_grad():
        policy_logps, reference_logps = compute_logps(policy, batch).logps, compute_logps(reference, batch).logps
    objective = build_objective([{"name": "sigmoid"}], beta=BETA)
    out = objective(LossInputs(policy_logps, reference_logps, batch.response_lengths, batch.response_mask))
    per_example = -torch.nn.functional.logsigmoid(
        BETA * ((policy_logps[:, 0] - reference_logps[:, 0]) - (policy_logps[:, 1] - reference_logps[:, 1]))
    )
    torch.testing.assert_close(policy_logps, torch.tensor(trl_logps), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_example, torch.tensor(trl_losses), atol=1e-4, rtol=0)
    assert (per_example - torch.log(torch.tensor(2.0))).abs().max() > 1e-3  # the two models differ: not a tie
    assert out.loss.item() == pytest.approx(sum(trl_losses) / NUM_PAIRS, abs=1e-4)


def test_the_precomputed_reference_equals_the_live_one_with_images(vlm_dirs, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dpokit.training.reference import compute_reference_logps

    processor = AutoProcessor.from_pretrained(vlm_dirs["idefics3"])
    model = AutoModelForImageTextToText.from_pretrained(vlm_dirs["idefics3"]).eval()
    fixture = write_fixture(tmp_path, family="idefics3", train=6, evaluation=1)
    items = list(prepare_dataset(fixture / "train.jsonl", processor.tokenizer, processor=processor, use_cache=False).items)
    for layout in ("padded", "shared_prompt"):
        collate = make_collator(layout, processor.tokenizer.pad_token_id, image_processor=processor.image_processor)
        ids, table = compute_reference_logps(model, items, collate, batch_size=4)
        with torch.no_grad():
            live = compute_logps(model, collate(items)).logps
        torch.testing.assert_close(table[ids.argsort()], live, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dpokit_train_runs_the_shipped_vlm_example_and_exports_a_loadable_vlm(tmp_path, monkeypatch):
    """examples/vlm.yaml as shipped (on the fixture it documents), shortened to 3 steps."""
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dpokit.commands.main import main

    example = Path(__file__).resolve().parents[1] / "examples" / "vlm.yaml"
    monkeypatch.chdir(tmp_path)
    write_fixture(tmp_path / "vlm-fixture", train=12, evaluation=4)
    overrides = ["optim.max_steps=3", "optim.batch_size=4", "eval.every_steps=0", "logging.progress_bar=false"]
    overrides += ["logging.tensorboard=false", "logging.plot=false"]
    assert main(["train", str(example), *overrides]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "vlm" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("split") == "train"][-1] == 3
    final = tmp_path / "runs" / "vlm" / "final"
    assert type(AutoModelForImageTextToText.from_pretrained(final)).__name__ == "LlavaForConditionalGeneration"
    assert AutoProcessor.from_pretrained(final).image_processor is not None
    assert load_config(example).model.vision.lora_modules == "language_model"


def test_the_fixture_command_writes_model_and_data_and_refuses_an_unknown_family(tmp_path, capsys):
    from dpokit.experiments.shapes import main

    assert main([str(tmp_path / "fixture"), "gemma"]) == 2 and "usage" in capsys.readouterr().err
    assert main([str(tmp_path / "fixture"), "idefics3"]) == 0
    assert (tmp_path / "fixture" / "model" / "config.json").is_file()
    assert len((tmp_path / "fixture" / "train.jsonl").read_text().splitlines()) == 64


@pytest.mark.slow
@pytest.mark.distributed
def test_a_vlm_run_on_two_processes_equals_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, gloo, 2 ranks x batch 4 (LoRA on the language model, precomputed reference with images)
    against one process with batch 8 on the tiny LLaVA: the same losses at every step, under DDP and under
    FSDP2 (which shards the vision tower's blocks and the language model's alike)."""
    from dpokit.training import run
    from tests.training.test_parallel import assert_same_losses, check_ok, torchrun, train_losses

    write_fixture(tmp_path / "fixture", train=12, evaluation=4)
    (tmp_path / "cfg.yaml").write_text("optim:\n  optimizer: adamw\n", encoding="utf-8")
    common = [
        f"model.name_or_path={tmp_path / 'fixture' / 'model'}",
        f"data.train_path={tmp_path / 'fixture' / 'train.jsonl'}",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "reference.strategy=precomputed",
        "data.layout=shared_prompt",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "optim.grad_accumulation=1",
        "optim.max_steps=2",
        "eval.every_steps=0",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "checkpoint.every_steps=0",
    ]
    torch.set_num_threads(1)
    single = tmp_path / "single"
    run(
        load_config(
            tmp_path / "cfg.yaml",
            [*common, f"logging.run_dir={single}", f"data.cache_dir={tmp_path / 'c1'}", "optim.batch_size=8"],
        )
    )
    expected = train_losses(single)
    assert len(expected) == 2
    for strategy in ("ddp", "fsdp"):
        ranks = tmp_path / strategy
        overrides = [*common, f"logging.run_dir={ranks}", f"data.cache_dir={tmp_path / 'c2'}", "optim.batch_size=4"]
        check_ok(torchrun(tmp_path / "cfg.yaml", [*overrides, f"distributed.strategy={strategy}"]))
        assert_same_losses(train_losses(ranks), expected)
