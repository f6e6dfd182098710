"""Checkpoints: complete round trip, atomic publication, pruning, safe loading, and a kill mid-save."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpokit.errors import TrainingError
from dpokit.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_resume_path,
    save_checkpoint,
)
from tests.helpers import tiny_llama, tiny_tokenizer, write_preference_jsonl, write_tiny_model_dir

REPO = Path(__file__).resolve().parents[2]


def _trained_state(seed: int = 0):
    """A tiny model after two AdamW steps, with its optimizer and a LambdaLR schedule."""
    model = tiny_llama(seed=seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def _save(run_dir: Path, step: int, model, optimizer, scheduler, keep_last: int = 2) -> Path:
    return save_checkpoint(
        run_dir,
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={"epoch": 1, "batch_in_epoch": 3},
        tokenizer=tiny_tokenizer(),
        keep_last=keep_last,
    )


def test_round_trip_restores_weights_optimizer_scheduler_rng_and_position(tmp_path):
    model, optimizer, scheduler = _trained_state()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    path = _save(tmp_path, 2, model, optimizer, scheduler)
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))

    fresh, fresh_optimizer, fresh_scheduler = tiny_llama(seed=1).train(), None, None
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 1.0 / (step + 1))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state = load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)

    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (2, 1, 3)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    saved_opt, loaded_opt = optimizer.state_dict(), fresh_optimizer.state_dict()
    for key in saved_opt["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(saved_opt["state"][key][field], loaded_opt["state"][key][field], rtol=0, atol=0)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 2
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)
    assert (random.random(), float(np.random.rand())) == expected_draws[:2]
    torch.testing.assert_close(torch.rand(3), expected_draws[2], rtol=0, atol=0)
    # The checkpoint's model directory is itself loadable as a model.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path / "model")


def test_checkpoint_files_load_without_unpickling_code(tmp_path):
    """Optimizer and scheduler states hold only tensors and plain values (weights_only=True loads
    them); everything else is safetensors or JSON -- no pickle a loader would have to trust."""
    model, optimizer, scheduler = _trained_state()
    path = _save(tmp_path, 2, model, optimizer, scheduler)
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.load(path / name, weights_only=True)
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes <= {".pt", ".safetensors", ".json", ".jinja"}
    # A pickle that would run code is refused by the same loader.
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def test_keep_last_prunes_older_checkpoints_and_latest_is_the_newest(tmp_path):
    model, optimizer, scheduler = _trained_state()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, scheduler, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-4"
    assert resolve_resume_path(str(tmp_path), None).name == "checkpoint-4"
    assert resolve_resume_path(str(tmp_path / "checkpoint-3"), None).name == "checkpoint-3"


def test_partial_directories_are_never_picked_and_are_cleaned_by_the_next_save(tmp_path):
    model, optimizer, scheduler = _trained_state()
    _save(tmp_path, 1, model, optimizer, scheduler)
    partial = tmp_path / "checkpoint-2.tmp-abc123"
    (partial / "model").mkdir(parents=True)
    (tmp_path / "checkpoint-7").mkdir()  # no trainer_state.json: not a complete checkpoint
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    _save(tmp_path, 2, model, optimizer, scheduler)
    assert not partial.exists()
    with pytest.raises(TrainingError, match="not a checkpoint directory"):
        resolve_resume_path(str(tmp_path / "nowhere"), None)


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    model, optimizer, scheduler = _trained_state()
    _save(tmp_path, 3, model, optimizer, scheduler)
    path = save_checkpoint(
        tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler, trainer_state={"epoch": 9, "batch_in_epoch": 0}
    )
    assert read_trainer_state(path)["epoch"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


def test_loading_a_checkpoint_into_another_architecture_is_a_clear_error(tmp_path):
    model, optimizer, scheduler = _trained_state()
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    bigger = tiny_llama(hidden_size=64)
    with pytest.raises(TrainingError, match="does not fit the model"):
        load_checkpoint(path, model=bigger)


KILLED_CHILD = """
import sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
import dpokit.training.checkpoint as checkpoint
from dpokit.config import load_config
from dpokit.training import run

marker = Path(sys.argv[1])
write_state = checkpoint._write_training_state

def slow_write(directory, *args, **kwargs):
    # The model files of checkpoint-4 are on disk; stall here so the parent can kill us mid-save.
    if directory.name.startswith("checkpoint-4.tmp-"):
        marker.write_text(str(directory))
        time.sleep(600)
    return write_state(directory, *args, **kwargs)

checkpoint._write_training_state = slow_write
run(load_config(None, sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    """SIGKILL while checkpoint-4 is half written: checkpoint-2 is intact, `--resume latest` picks it
    (never the partial directory) and the resumed run completes."""
    model_dir = write_tiny_model_dir(tmp_path / "model")
    data = write_preference_jsonl(tmp_path / "train.jsonl", n=32)
    run_dir, marker = tmp_path / "run", tmp_path / "saving"
    args = [
        f"model.name_or_path={model_dir}",
        f"data.train_path={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"logging.run_dir={run_dir}",
        "optim.max_steps=6",
        "optim.batch_size=8",
        "optim.grad_accumulation=1",
        "optim.optimizer=adamw",
        "optim.lr=1e-3",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "logging.log_every=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(marker), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.stderr.read() if child.poll() is not None else "timed out"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()

    partial = Path(marker.read_text())
    assert partial.is_dir() and (partial / "model" / "model.safetensors").is_file()  # killed mid-save
    assert not (partial / "trainer_state.json").exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert resolve_resume_path("latest", run_dir).name == "checkpoint-2"

    from dpokit.config import load_config
    from dpokit.models import load_model_and_tokenizer
    from dpokit.training import run

    cfg = load_config(None, args)
    policy, _ = load_model_and_tokenizer(cfg.model)
    assert load_checkpoint(run_dir / "checkpoint-2", model=policy)["global_step"] == 2
    result = run(cfg, resume="latest")
    assert result.global_step == 6 and not partial.exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-6"]


class _CreatesAFile:
    """A pickle payload: unpickling it calls ``open(path, "w")``, which creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _dcp_checkpoint(tmp_path: Path):
    """A torchrun-format (DCP) checkpoint written in this process, and a fresh model/optimizer to load it into."""
    import warnings

    from dpokit.training.parallel import ParallelContext

    model, optimizer, scheduler = _trained_state()
    with warnings.catch_warnings():  # DCP notes that it saves without a process group: it does
        warnings.simplefilter("ignore")
        path = save_checkpoint(
            tmp_path / "run",
            2,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state={"epoch": 0, "batch_in_epoch": 2},
            ctx=ParallelContext(strategy="ddp"),
        )
    fresh = tiny_llama(seed=1)
    return path, model, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3)


def test_a_dcp_checkpoint_loads_in_one_process_through_the_safe_reader(tmp_path):
    path, model, fresh, fresh_optimizer = _dcp_checkpoint(tmp_path)
    assert (path / "dcp" / ".metadata").is_file() and not (path / "model").exists()
    load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, restore_rng=False)
    for (name, expected), actual in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)  # LambdaLR's lr after two steps


def test_a_crafted_dcp_metadata_pickle_is_refused_and_runs_nothing(tmp_path):
    """``torch.distributed.checkpoint`` unpickles ``dcp/.metadata`` with plain pickle: a crafted file
    would run code on ``--resume``. dpokit reads it through an allow-list and refuses instead."""
    path, _, fresh, fresh_optimizer = _dcp_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(_CreatesAFile(marker)))
    with pytest.raises(TrainingError, match="unsafe to load .refusing to load io.open"):
        load_checkpoint(path, model=fresh, optimizer=fresh_optimizer)
    assert not marker.exists()


def test_a_crafted_non_tensor_entry_is_refused_and_runs_nothing(tmp_path):
    """Non-tensor DCP entries (the optimizer's param_groups) are read with ``weights_only=True``."""
    import io

    from dpokit.compat import dcp_safe_reader_and_planner

    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(_CreatesAFile(marker), buffer)
    buffer.seek(0)
    _, planner = dcp_safe_reader_and_planner(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(None, buffer)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# The model card of the final export.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def card_assets(tmp_path_factory) -> Path:
    """A tiny model whose own README declares a license, and 40 preference pairs."""
    root = tmp_path_factory.mktemp("card_assets")
    write_tiny_model_dir(root / "model")
    (root / "model" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n", encoding="utf-8")
    write_preference_jsonl(root / "train.jsonl", n=40, seed=0)
    return root


def _front_matter_and_body(card: str) -> tuple[dict, str]:
    import yaml

    assert card.startswith("---\n")
    front, body = card[len("---\n") :].split("\n---\n", 1)
    return yaml.safe_load(front), body


@pytest.mark.parametrize("export", ["full", "adapter"])
def test_the_final_export_carries_a_model_card_and_still_loads(card_assets, tmp_path, export):
    """README.md beside the weights: Hub front matter that parses (library, tags, the base model's
    license; a local base is named in the text, not as base_model, which the Hub takes for a hub id),
    the objective and its settings, the data and its counts, the final metrics of the run, and a
    snippet that loads it; the directory still loads with transformers (peft for the adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.training import run
    from tests.training.test_trainer import make_config

    lora = ["model.lora.enabled=true", "model.lora.export=adapter", "model.lora.r=4"] if export == "adapter" else []
    cfg = make_config(card_assets, tmp_path / "run", "optim.max_steps=2", "data.eval_split_fraction=0.25", *lora)
    result = run(cfg)
    card = (result.output_dir / "README.md").read_text(encoding="utf-8")
    front, body = _front_matter_and_body(card)
    assert front["library_name"] == ("peft" if export == "adapter" else "transformers")
    assert front["tags"][:2] == ["dpokit", "dpo"] and ("lora" in front["tags"]) == (export == "adapter")
    assert front["license"] == "apache-2.0" and front["pipeline_tag"] == "text-generation"
    assert "base_model" not in front and "datasets" not in front  # local paths
    assert f"from `{card_assets / 'model'}`" in body
    assert "| beta | 0.1 |" in body and "| steps | 2 |" in body and "| loss terms | sigmoid |" in body
    assert "adamw, lr 0.001" in body and "| batch | 8 examples per step (8 x 1 accumulation) |" in body
    assert f"- training: `{card_assets / 'train.jsonl'}` (30 examples)" in body
    assert "- evaluation: 0.25 of the training data (10 examples)" in body
    for name in ("loss", "rewards/accuracies", "rewards/margins"):
        row = f"| {name} | {result.train_metrics[name]:.4g} | {result.eval_metrics[name]:.4g} |"
        assert row in body, row
    if export == "adapter":
        from peft import AutoPeftModelForCausalLM

        assert "AutoPeftModelForCausalLM.from_pretrained(" in body
        model = AutoPeftModelForCausalLM.from_pretrained(result.output_dir)
    else:
        assert f"AutoModelForCausalLM.from_pretrained({str(result.output_dir)!r})" in body
        model = AutoModelForCausalLM.from_pretrained(result.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    ids = tokenizer("the movie was good", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()


def test_a_model_card_names_hub_ids_as_base_model_and_datasets_and_tags_the_objective(tmp_path):
    """Hub ids (no such local path) are what the Hub's base_model and datasets hold; each loss term
    becomes a tag (sigmoid as 'dpo'), an SFT run is tagged 'sft'."""
    from dpokit.config import load_config
    from dpokit.training.model_card import RunSummary, model_card

    cfg = load_config(
        None,
        ["model.name_or_path=some-org/base-model", "data.train_path=some-org/preferences", "loss.terms=[{name: ipo}]"],
    )
    summary = RunSummary(cfg, "Objective(1*ipo())", steps=5, train_examples=100, reference="precomputed")
    front, body = _front_matter_and_body(model_card(summary, tmp_path / "out", adapter=False))
    assert front["base_model"] == "some-org/base-model" and front["datasets"] == ["some-org/preferences"]
    assert front["tags"] == ["dpokit", "ipo"] and "license" not in front
    assert "| reference | precomputed |" in body and "## Results" not in body  # no metrics logged: no table
    sft = load_config(None, ["model.name_or_path=some-org/base-model", "data.train_path=data.jsonl"], preset="sft")
    front, body = _front_matter_and_body(model_card(RunSummary(sft, "sft", 5, 100), tmp_path / "out", adapter=False))
    assert front["tags"] == ["dpokit", "sft"] and "datasets" not in front and "supervised fine-tuning" in body
