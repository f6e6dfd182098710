"""``benchmarks/gpu_check.py`` (``make gpu-check``) kept working without a GPU: its ``--cpu --tiny`` mode runs
every section as the GPU run does (child processes, torchrun with gloo instead of NCCL, a checkpoint
resumed), and a section that cannot do its job fails loudly without stopping the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.slow


def run_check(out: Path, *arguments: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(SCRIPT), "--out", str(out), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def gpu_check_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_tiny_cpu_check_runs_every_section_and_writes_json_and_markdown_reports(tmp_path):
    result = run_check(tmp_path, "--cpu", "--tiny", "--no-trl")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    statuses = {name: entry["status"] for name, entry in sections.items()}
    expected_ok = [
        "environment",
        "assets",
        "steps.dpokit_sdpa",
        "steps.dpokit_flex_packed",
        "frontier.dpokit",
        "distributed.ddp",
        "distributed.fsdp",
        "distributed.fsdp_resume",
        "lora",
    ]
    assert all(statuses[name] == "ok" for name in expected_ok), statuses
    assert statuses["steps.trl_default"] == "skipped" and statuses["frontier.trl_default"] == "skipped"
    assert statuses["qlora"] == "skipped"  # 4-bit needs CUDA
    assert statuses["vllm"] in ("not installed", "skipped")
    assert statuses["engines"] in ("not installed", "skipped") and sections["engines"]["seconds"] < 1  # never runs on a CPU
    assert f"[gpu-check] engines: {statuses['engines']} -- " in result.stdout

    steps = sections["steps.dpokit_sdpa"]
    assert steps["step_s"] > 0 and steps["tokens_per_s"] == pytest.approx(2 * 96 / steps["step_s"])
    assert 0 < steps["mfu"] < 1.5 and steps["peak_memory_gib"] > 0
    assert sections["steps.dpokit_flex_packed"]["layout"] == "packed"
    assert sections["frontier.dpokit"]["longest_pair_tokens"] == 128  # 64 and 128 both train; 128 is the largest tried
    resumed = sections["distributed.fsdp_resume"]
    assert resumed["resumed_step3_loss"] == pytest.approx(resumed["step3_loss"], rel=1e-5)
    assert sections["distributed.ddp"]["processes"] == 2 and len(sections["distributed.ddp"]["losses"]) == 3

    page = (tmp_path / "gpu_check.md").read_text()
    assert "All sections passed" in page and "| steps.dpokit_sdpa | ok |" in page
    assert not (tmp_path / "work").exists()  # the model and runs are removed unless --keep-work


def test_without_a_gpu_the_gpu_run_exits_non_zero_and_names_the_failed_section(tmp_path):
    result = run_check(tmp_path, "--no-trl", timeout=300)
    assert result.returncode == 1
    assert "FAILED sections: environment" in result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "no CUDA GPU" in report["sections"]["environment"]["error"]
    assert report["sections"]["steps.dpokit_sdpa"]["status"] == "failed"  # could not run: named as such
    assert "FAILED: environment" in (tmp_path / "gpu_check.md").read_text()


def test_a_failing_section_is_recorded_with_its_error_and_the_next_section_still_runs(gpu_check_module, tmp_path):
    """A real child run on a model directory that does not exist: the section is 'failed' with dpokit's
    message, and the section after it runs and reports."""
    check = gpu_check_module
    plan = check.make_plan(
        check.argparse.Namespace(out=str(tmp_path), tiny=True, cpu=True, no_trl=True, nproc=0, section_timeout=300)
    )
    missing = tmp_path / "no-model-here"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n", encoding="utf-8")
    assets = check.Assets(model=missing, tokenizer=None, step_pairs=pairs, peak=None, peak_name="-")
    report: dict = {"sections": {}}
    check.record(report, "steps.dpokit_sdpa", lambda: check.steps_section(plan, assets, "sdpa"))
    check.record(report, "qlora", lambda: check.qlora_section(plan, assets, {}))
    failed = report["sections"]["steps.dpokit_sdpa"]
    assert failed["status"] == "failed" and str(missing) in failed["error"]
    assert report["sections"]["qlora"]["status"] == "skipped"
    assert check.failed_sections(report) == ["steps.dpokit_sdpa"]
