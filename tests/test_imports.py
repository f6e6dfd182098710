"""Optional parts are imported only when a run uses them: importing the library, the CLI's help and a
plain training run (JSONL data, no LoRA, no plots, no TensorBoard) never load matplotlib,
TensorBoard, peft or datasets; each is loaded once a run asks for it. Checked in fresh processes
through ``sys.modules``; the run also writes its start-up record (startup.json)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import write_preference_jsonl, write_tiny_model_dir

OPTIONAL = ("matplotlib", "tensorboard", "peft", "datasets")


def loaded_after(code: str) -> set[str]:
    """The OPTIONAL top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(OPTIONAL)!r})))"
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return set(json.loads(completed.stdout.strip().splitlines()[-1]))


def test_importing_dpokit_and_the_cli_help_load_no_optional_part():
    code = (
        "import dpokit.training\n"
        "from dpokit.training import run\n"
        "import dpokit.training.reference, dpokit.training.tracking, dpokit.training.plots, dpokit.models, dpokit.data\n"
        "from dpokit.commands.main import main\n"
        "for args in (['--help'], ['train', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
    )
    assert loaded_after(code) == set()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("imports")
    write_tiny_model_dir(root / "model")
    write_preference_jsonl(root / "train.jsonl", n=16, seed=0)
    return root


def training_code(assets, run_dir, *overrides: str) -> str:
    base = [
        f"model.name_or_path={assets / 'model'}",
        f"data.train_path={assets / 'train.jsonl'}",
        f"data.cache_dir={assets / 'cache'}",
        f"logging.run_dir={run_dir}",
        "optim.batch_size=4",
        "optim.grad_accumulation=1",
        "optim.max_steps=2",
        "logging.progress_bar=false",
        "checkpoint.every_steps=0",
        *overrides,
    ]
    return f"from dpokit.config import load_config\nfrom dpokit.training import run\nrun(load_config(None, {base!r}))"


def test_a_plain_training_run_loads_no_optional_part_and_records_its_start_up(assets, tmp_path):
    run_dir = tmp_path / "run"
    assert loaded_after(training_code(assets, run_dir, "logging.tensorboard=false", "logging.plot=false")) == set()
    record = json.loads((run_dir / "startup.json").read_text())
    assert list(record["phases_s"]) == ["config", "model", "data", "reference", "other_setup", "first_step"]
    assert all(seconds >= 0 for seconds in record["phases_s"].values())
    assert record["run_to_first_step_s"] == pytest.approx(sum(record["phases_s"].values()), abs=0.01)
    assert record["process_to_first_step_s"] >= record["run_to_first_step_s"]
    assert record["reference_strategy"] == "copy"  # 2 steps of 4 forward fewer than the 16 a table would


def test_each_optional_part_is_loaded_when_the_run_uses_it(assets, tmp_path):
    code = training_code(assets, tmp_path / "run", "logging.tensorboard=true", "logging.plot=true", "model.lora.enabled=true")
    assert loaded_after(code) == {"matplotlib", "tensorboard", "peft"}
