"""End-to-end runs of the training loop on a tiny Llama saved to disk and a learnable synthetic
preference set (chosen responses praise, rejected ones pan; see tests/helpers.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dpokit.config import config_to_dict, load_config
from dpokit.errors import ConfigError, TrainingError
from dpokit.training import run
from dpokit.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, read_trainer_state
from dpokit.training.metrics import MetricSums, StepMetrics
from dpokit.training.optim import lr_factor, plan_steps
from dpokit.training.tracking import read_metrics
from tests.helpers import write_preference_jsonl, write_tiny_model_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_assets")
    write_tiny_model_dir(root / "model")
    write_preference_jsonl(root / "train.jsonl", n=64, seed=0)
    write_preference_jsonl(root / "eval.jsonl", n=16, seed=1)
    return root


def make_config(assets: Path, run_dir: Path, *overrides: str, preset: str | None = None):
    base = [
        f"model.name_or_path={assets / 'model'}",
        f"data.train_path={assets / 'train.jsonl'}",
        f"data.cache_dir={assets / 'cache'}",
        f"logging.run_dir={run_dir}",
        "optim.optimizer=adamw",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "optim.batch_size=8",
        "optim.grad_accumulation=1",
        "optim.max_steps=12",
        "eval.every_steps=0",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "checkpoint.every_steps=0",
    ]
    return load_config(None, [*base, *overrides], preset=preset)


def losses(run_dir: Path, split: str = "train") -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir, split=split)]


def test_dpo_raises_heldout_reward_accuracy_well_above_chance(assets, tmp_path):
    """Before training the policy equals the reference, so every implicit reward is 0 and every pair is
    a tie (accuracy 0.5, a tie counting half; loss log 2 = 0.693); 20 steps later held-out accuracy is >= 0.9."""
    cfg = make_config(
        assets,
        tmp_path / "run",
        "optim.max_steps=20",
        f"data.eval_path={assets / 'eval.jsonl'}",
        "eval.every_steps=10",
        "logging.plot=true",
        "logging.tensorboard=true",
    )
    result = run(cfg)
    first = read_metrics(result.run_dir, split="train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/accuracies"] == 0.5  # policy = reference: every pair ties, a tie counts half
    evals = read_metrics(result.run_dir, split="eval")
    assert [r["step"] for r in evals] == [10, 20]
    assert result.eval_metrics["rewards/accuracies"] >= 0.9
    assert result.eval_metrics["rewards/margins"] > 0
    assert result.eval_metrics["loss"] < 0.6
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert (result.run_dir / "curves.png").stat().st_size > 0
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (result.run_dir / "config.yaml").is_file()
    assert load_config(result.run_dir / "config.yaml") == cfg
    assert result.global_step == 20 and not result.interrupted


def test_resumed_run_reproduces_the_uninterrupted_loss_curve(assets, tmp_path):
    """Stop after step 5 (checkpoint), resume, finish at 12: the 12 per-step losses equal those of a
    run that never stopped, to float32 tolerance. Grad accumulation, log windows of 2 steps
    (so a window is cut by the checkpoint) and a cosine schedule are all in play."""
    common = (
        "optim.max_steps=12",
        "optim.batch_size=4",
        "optim.grad_accumulation=2",
        "optim.schedule=cosine",
        "optim.warmup_ratio=0.25",  # 3 of the 12 steps
        "logging.log_every=2",
        "model.lora.enabled=false",
    )
    straight = run(make_config(assets, tmp_path / "straight", *common))

    stopped = run(make_config(assets, tmp_path / "resumed", *common), on_step=lambda step, metrics: step == 5)
    assert stopped.interrupted and stopped.global_step == 5 and stopped.output_dir is None
    assert [p.name for p in list_checkpoints(stopped.run_dir)] == ["checkpoint-5"]
    resumed = run(make_config(assets, tmp_path / "resumed", *common), resume="latest")
    assert resumed.global_step == 12 and not resumed.interrupted

    expected, got = losses(straight.run_dir), losses(resumed.run_dir)
    assert [s for s, _ in got] == [s for s, _ in expected] == [2, 4, 6, 8, 10, 12]
    for (_, a), (_, b) in zip(expected, got, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert resumed.train_metrics["loss"] == pytest.approx(straight.train_metrics["loss"], rel=1e-5)


def test_resume_across_an_epoch_boundary_with_lora(assets, tmp_path):
    """64 examples / batch 16 = 4 steps per epoch; stopping at step 6 resumes inside epoch 1 with
    the same (seeded) order, and the LoRA adapter + optimizer state come back."""
    common = ("optim.max_steps=9", "optim.batch_size=16", "model.lora.enabled=true", "model.lora.r=4", "optim.lr=5e-3")
    straight = run(make_config(assets, tmp_path / "a", *common))
    stopped = run(make_config(assets, tmp_path / "b", *common), on_step=lambda step, metrics: step == 6)
    state = read_trainer_state(stopped.last_checkpoint)
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    resumed = run(make_config(assets, tmp_path / "b", *common), resume=str(stopped.last_checkpoint))
    for (_, a), (_, b) in zip(losses(straight.run_dir), losses(resumed.run_dir), strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_gradient_accumulation_matches_one_big_batch(assets, tmp_path):
    """All 64 examples in one micro-batch, or in 4 micro-batches of 16, make the same optimizer step:
    each micro-batch loss is weighted by its share of the step's examples (16/64), so the summed
    gradient is that of the mean loss over all 64 -- same loss, same weights afterwards."""
    a = run(make_config(assets, tmp_path / "a", "optim.max_steps=1", "optim.batch_size=64", "optim.grad_accumulation=1"))
    b = run(make_config(assets, tmp_path / "b", "optim.max_steps=1", "optim.batch_size=16", "optim.grad_accumulation=4"))
    from safetensors.torch import load_file

    wa = load_file(str(a.output_dir / "model.safetensors"))
    wb = load_file(str(b.output_dir / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)
    record_a, record_b = read_metrics(a.run_dir, split="train")[0], read_metrics(b.run_dir, split="train")[0]
    assert record_b["loss"] == pytest.approx(record_a["loss"], rel=1e-5)
    # AdamW's first step is scale-invariant, so the gradient norm is what pins the weighting:
    # summing instead of averaging the 4 micro-batch losses would make it 4 times larger.
    assert record_b["grad_norm"] == pytest.approx(record_a["grad_norm"], rel=1e-4)


def test_gradient_checkpointing_gives_the_same_curve_and_rmsprop_learns(assets, tmp_path):
    """Recomputing activations in the backward changes memory, not math; RMSprop (the paper's
    optimizer) brings the loss down from log 2."""
    common = ("optim.max_steps=6", "optim.optimizer=rmsprop", "optim.lr=1e-4")
    plain = run(make_config(assets, tmp_path / "plain", *common))
    recomputed = run(make_config(assets, tmp_path / "ckpt", *common, "model.gradient_checkpointing=true"))
    for (_, a), (_, b) in zip(losses(plain.run_dir), losses(recomputed.run_dir), strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert losses(plain.run_dir)[-1][1] < math.log(2) - 0.05


def test_same_seed_same_run_and_other_seed_other_order(assets, tmp_path):
    first = run(make_config(assets, tmp_path / "s0a", "optim.max_steps=4"))
    again = run(make_config(assets, tmp_path / "s0b", "optim.max_steps=4"))
    other = run(make_config(assets, tmp_path / "s1", "optim.max_steps=4", "optim.seed=1"))
    assert losses(first.run_dir) == losses(again.run_dir)
    assert [loss for _, loss in losses(first.run_dir)][1:] != [loss for _, loss in losses(other.run_dir)][1:]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    """lr = 1e30 sends the weights to ~1e30 after step 1, so step 2's forward overflows to NaN."""
    cfg = make_config(assets, tmp_path / "run", "optim.lr=1e30", "checkpoint.every_steps=1", "optim.max_grad_norm=null")
    with pytest.raises(TrainingError, match=r"loss is nan at optimizer step 2") as caught:
        run(cfg)
    assert "checkpoint-1" in str(caught.value) and "optim.lr" in str(caught.value)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    assert read_trainer_state(latest_checkpoint(tmp_path / "run"))["global_step"] == 1


def test_exported_model_reloads_with_plain_transformers_and_gives_the_same_logps(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from dpokit.data import PaddedCollator, prepare_dataset
    from dpokit.logprobs import compute_logps
    from dpokit.models import load_model_and_tokenizer

    cfg = make_config(assets, tmp_path / "run", "optim.max_steps=3", "checkpoint.every_steps=3")
    result = run(cfg)
    exported = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    # The last checkpoint holds the same weights, loaded through the checkpoint code path.
    policy, tokenizer = load_model_and_tokenizer(cfg.model)
    load_checkpoint(result.last_checkpoint, model=policy, restore_rng=False)
    policy.eval()
    base = AutoModelForCausalLM.from_pretrained(assets / "model").eval()
    data = prepare_dataset(assets / "eval.jsonl", tokenizer, cache_dir=assets / "cache")
    batch = PaddedCollator(tokenizer.pad_token_id)(list(data.items[:8]))
    with torch.no_grad():
        got = compute_logps(exported, batch).logps
        expected = compute_logps(policy, batch).logps
        untrained = compute_logps(base, batch).logps
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, untrained, atol=1e-3)  # training did change the model


def test_sft_preset_trains_on_chosen_without_a_reference(assets, tmp_path):
    """The sft preset: loss terms [sft], reference none; the chosen responses' log-prob rises."""
    cfg = make_config(assets, tmp_path / "run", "optim.max_steps=10", preset="sft")
    assert cfg.loss.terms == [{"name": "sft"}] and cfg.reference.strategy == "none"
    result = run(cfg)
    records = read_metrics(result.run_dir, split="train")
    assert records[-1]["logps/chosen"] > records[0]["logps/chosen"] + 5
    assert records[0]["loss/sft"] > records[-1]["loss/sft"]


def test_precomputed_reference_run_equals_copy_reference_run(assets, tmp_path):
    """Same seed, same data, same model: reference log-probs from the disk cache or from a frozen
    copy give the same loss curve."""
    copy_run = run(make_config(assets, tmp_path / "copy", "optim.max_steps=5", "reference.strategy=copy"))
    pre_run = run(
        make_config(
            assets,
            tmp_path / "pre",
            "optim.max_steps=5",
            "reference.strategy=precomputed",
            "reference.batch_size=64",
            f"data.cache_dir={tmp_path / 'cache'}",
        )
    )
    assert list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    for (_, a), (_, b) in zip(losses(copy_run.run_dir), losses(pre_run.run_dir), strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_lora_run_uses_the_disabled_adapter_reference_and_exports_adapter_or_merged(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = run(
        make_config(
            assets,
            tmp_path / "adapter",
            "optim.max_steps=4",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "optim.lr=5e-3",
            "model.lora.export=adapter",
        )
    )
    assert (adapter.output_dir / "adapter_config.json").is_file()
    assert not (adapter.output_dir / "model.safetensors").exists()
    first = read_metrics(adapter.run_dir, split="train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # adapters start as a no-op: policy == reference
    reloaded = AutoModelForCausalLM.from_pretrained(adapter.output_dir)
    assert any("lora_" in name for name, _ in reloaded.named_parameters())

    merged = run(
        make_config(
            assets, tmp_path / "merged", "optim.max_steps=4", "model.lora.enabled=true", "model.lora.r=4", "optim.lr=5e-3"
        )
    )
    assert (merged.output_dir / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(merged.output_dir)
    assert not any("lora_" in name for name, _ in plain.named_parameters())


def test_fresh_run_refuses_a_run_dir_with_checkpoints_and_resume_needs_one(assets, tmp_path):
    run(make_config(assets, tmp_path / "run", "optim.max_steps=2", "checkpoint.every_steps=1"))
    with pytest.raises(TrainingError, match="--resume latest"):
        run(make_config(assets, tmp_path / "run", "optim.max_steps=2"))
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        run(make_config(assets, tmp_path / "empty", "optim.max_steps=2"), resume="latest")


def test_resume_refuses_a_changed_data_order(assets, tmp_path):
    stopped = run(make_config(assets, tmp_path / "run", "optim.max_steps=6"), on_step=lambda step, m: step == 2)
    with pytest.raises(TrainingError, match="optim.batch_size"):
        run(make_config(assets, tmp_path / "run", "optim.max_steps=6", "optim.batch_size=4"), resume=str(stopped.run_dir))


def test_reference_strategy_none_with_a_reference_loss_is_a_config_error(assets, tmp_path):
    with pytest.raises(ConfigError, match="needs reference log-probs"):
        run(make_config(assets, tmp_path / "run", "reference.strategy=none"))


def test_eval_samples_from_policy_and_reference_are_written(assets, tmp_path):
    result = run(
        make_config(
            assets,
            tmp_path / "run",
            "optim.max_steps=2",
            "data.eval_split_fraction=0.25",
            "eval.sample_prompts=2",
            "eval.max_new_tokens=4",
            "eval.every_steps=1",
        )
    )
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    assert all({"prompt", "policy", "reference"} <= set(s) for s in samples)
    assert len(read_metrics(result.run_dir, split="eval")) == 2


def test_metric_sums_average_over_examples_not_batches():
    """Batches of 3 and 1 examples with losses [1, 1, 1] and [5]: the example mean is 8/4 = 2 (a
    mean of batch means would say 3)."""
    sums = MetricSums()
    sums.add_per_example({"loss": torch.tensor([1.0, 1.0, 1.0])})
    sums.add_per_example({"loss": torch.tensor([5.0])})
    assert sums.averages() == {"loss": 2.0}
    assert MetricSums(sums.state()).averages() == {"loss": 2.0}


def test_lr_schedule_warms_up_then_decays():
    """warm-up 3: factors 1/4, 2/4, 3/4; then cosine over the 4 remaining steps of 7 to min 0.1:
    0.1 + 0.9 * 0.5 * (1 + cos(pi * p)), p = 0, 1/4, 2/4, 3/4."""
    kwargs = dict(warmup_steps=3, total_steps=7, schedule="cosine", min_lr_ratio=0.1)
    got = [lr_factor(s, **kwargs) for s in range(7)]
    expected = [0.25, 0.5, 0.75] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75)]
    assert got == pytest.approx(expected)
    assert lr_factor(10, warmup_steps=0, total_steps=10, schedule="linear", min_lr_ratio=0.0) == 0.0
    assert lr_factor(5, warmup_steps=0, total_steps=10, schedule="constant", min_lr_ratio=0.0) == 1.0


CHILD = """
import sys, torch
torch.set_num_threads(1)
from dpokit.config import load_config
from dpokit.training import run
result = run(load_config(None, sys.argv[1:]))
print("RESULT", result.interrupted, result.global_step, result.last_checkpoint, flush=True)
"""


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(assets, tmp_path):
    """A real process gets SIGTERM mid-run: it finishes the optimizer step, writes checkpoint-N
    for that step, prints its result and exits 0; resuming continues from step N."""
    run_dir = tmp_path / "run"
    cfg_args = [
        f"model.name_or_path={assets / 'model'}",
        f"data.train_path={assets / 'train.jsonl'}",
        f"data.cache_dir={assets / 'cache'}",
        f"logging.run_dir={run_dir}",
        "optim.max_steps=100000",
        "optim.batch_size=8",
        "optim.grad_accumulation=1",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "checkpoint.every_steps=0",
        "optim.lr=1e-4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *cfg_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        deadline = time.time() + 120
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    assert "SIGTERM received" in err and "Traceback" not in err
    line = [text for text in out.splitlines() if text.startswith("RESULT")][0]
    _, interrupted, step, checkpoint = line.split(" ", 3)
    assert interrupted == "True" and int(step) >= 2
    assert Path(checkpoint).name == f"checkpoint-{step}"
    assert read_trainer_state(checkpoint)["global_step"] == int(step)


def test_an_export_outside_the_run_dir_carries_the_run_config(assets, tmp_path):
    """`dpokit eval`/`score` find the reference and beta of an exported model from the config beside it."""
    from dpokit.models import load_policy

    out = tmp_path / "exports" / "dpo"
    result = run(make_config(assets, tmp_path / "run", "optim.max_steps=1", f"output_dir={out}", "loss.beta=0.3"))
    assert result.output_dir == out
    saved = load_config(out / "config.yaml")
    assert saved.loss.beta == 0.3 and saved.model.name_or_path == str(assets / "model")
    assert load_policy(out).run_config["loss"]["beta"] == 0.3


def test_step_metrics_read_once_equal_per_micro_batch_sums_and_name_the_first_bad_loss():
    """The step's micro-batch outputs are read in one go at the end: the sums equal adding each
    micro-batch's per-example metrics, and the first non-finite loss (by index) is the one reported."""
    from types import SimpleNamespace

    outputs = [
        SimpleNamespace(
            loss=torch.tensor(0.5), per_example=torch.tensor([0.25, 0.75]), metrics={"acc": torch.tensor([1.0, 0.0])}
        ),
        SimpleNamespace(loss=torch.tensor(0.1), per_example=torch.tensor([0.1]), metrics={"acc": torch.tensor([float("nan")])}),
    ]
    pending, expected = StepMetrics(), MetricSums()
    for index, out in enumerate(outputs):
        pending.add(index, out)
        expected.add_per_example({"loss": out.per_example, **out.metrics})
    seen: list[tuple[float, int]] = []
    sums = pending.finish(lambda value, index: seen.append((value, index)))
    assert seen == [(0.5, 0), (pytest.approx(0.1), 1)]
    assert sums.sums == pytest.approx(expected.sums) and sums.counts == expected.counts  # the NaN is left out of acc

    bad = StepMetrics()
    for index, value in enumerate([1.0, float("inf"), float("nan")]):
        bad.add(index, SimpleNamespace(loss=torch.tensor(value), per_example=torch.tensor([value]), metrics={}))

    def check(value: float, index: int) -> None:
        if not math.isfinite(value):
            raise TrainingError(f"micro-batch {index}: {value}")

    with pytest.raises(TrainingError, match="micro-batch 1: inf"):
        bad.finish(check)


# -- the step plan: warm-up that fits the run, and warnings when the data cannot fill it -------------


def _optim(**overrides):
    return load_config(None, [f"optim.{k}={v}" for k, v in overrides.items()]).optim


def test_warmup_is_capped_at_a_tenth_of_a_short_run_and_the_plan_says_so():
    """200 examples, batch 8 x 1, 1 epoch: total = ceil(200 / 8) = 25 steps; the paper's 150 warm-up
    steps are capped at floor(0.1 * 25) = 2, and a note names both numbers."""
    plan = plan_steps(_optim(batch_size=8, grad_accumulation=1, warmup_steps=150), num_examples=200, micro_examples=8)
    assert (plan.total_steps, plan.warmup_steps) == (25, 2)
    assert "optim.warmup_steps=150" in plan.notes[0] and "2 of the 25" in plan.notes[0]
    assert plan.warnings == ()


def test_warmup_of_a_long_run_is_the_papers_150_steps_untouched():
    plan = plan_steps(_optim(batch_size=8, grad_accumulation=8, warmup_steps=150), num_examples=160_000, micro_examples=8)
    assert (plan.total_steps, plan.warmup_steps, plan.notes, plan.warnings) == (2500, 150, (), ())


def test_warmup_ratio_replaces_warmup_steps_and_its_cap():
    """warmup_ratio 0.5 of 25 steps: round(12.5) = 12 (banker's rounding), whatever warmup_steps says."""
    plan = plan_steps(_optim(batch_size=8, grad_accumulation=1, warmup_ratio=0.5), num_examples=200, micro_examples=8)
    assert (plan.total_steps, plan.warmup_steps, plan.notes) == (25, 12, ())


def test_a_step_larger_than_the_data_warns_before_training():
    """38 examples, batch 8 x 8 = 64 per step: 5 micro-batches per epoch, one (short) step per epoch."""
    plan = plan_steps(_optim(batch_size=8, grad_accumulation=8), num_examples=38, micro_examples=8)
    assert plan.total_steps == 1 and plan.warmup_steps == 0
    assert len(plan.warnings) == 1 and "shorter than one optimizer step" in plan.warnings[0]
    assert "64 examples" in plan.warnings[0] and "lower optim.grad_accumulation" in plan.warnings[0]
    micro = plan_steps(_optim(batch_size=64, grad_accumulation=1), num_examples=38, micro_examples=64)
    assert "optim.batch_size (64 examples per micro-batch) is larger than the 38" in micro.warnings[0]


def test_a_run_of_a_few_steps_warns_and_an_online_run_without_data_does_not():
    few = plan_steps(_optim(batch_size=8, grad_accumulation=1), num_examples=38, micro_examples=8)
    assert few.total_steps == 5 and "only 5 optimizer step(s)" in few.warnings[0]
    online = plan_steps(_optim(max_steps=8), num_examples=0, micro_examples=8)
    assert online.total_steps == 8 and online.warnings == ()


# The README's minimal config (Quick start), with the model and data paths of this test.
README_MINIMAL_CONFIG = """\
model:
  name_or_path: {model}
  dtype: bfloat16
data:
  train_path: {data}
  eval_split_fraction: 0.05
loss:
  beta: 0.1
  terms: [{{name: sigmoid}}]
optim:
  lr: 5e-7
  batch_size: 8
  grad_accumulation: 8
logging:
  run_dir: {run_dir}
"""


def test_readme_minimal_config_on_40_pairs_trains_at_the_peak_lr_and_warns_why_it_is_one_step(assets, tmp_path, capsys):
    """40 pairs, 2 held out (5%): 38 training examples, 64 per step -> one step per epoch. Before, that
    one step ran at lr 5e-7 / 151 = 3.3e-9 (warm-up 150) and the run printed "finished" with no word;
    now the warm-up is capped (0 steps), the step runs at 5e-7, and a warning says why there is one."""
    write_preference_jsonl(tmp_path / "prefs.jsonl", n=40, seed=3)
    config = tmp_path / "cfg.yaml"
    config.write_text(
        README_MINIMAL_CONFIG.format(model=assets / "model", data=tmp_path / "prefs.jsonl", run_dir=tmp_path / "run")
    )
    result = run(load_config(config, [f"data.cache_dir={assets / 'cache'}", "logging.tensorboard=false", "logging.plot=false"]))
    err = capsys.readouterr().err
    assert result.global_step == 1
    (record,) = read_metrics(result.run_dir, split="train")
    assert record["lr"] == pytest.approx(5e-7)
    assert "warning: an epoch (38 examples, 5 micro-batches) is shorter than one optimizer step" in err
    assert "warm-up: 0 of the 1 planned optimizer steps" in err


def test_the_custom_loop_of_the_engine_docs_trains_its_segments_in_order(assets, tmp_path, capsys):
    """docs/engine.md's curriculum example, run as written: two segments (4 steps on one file, then 3 on
    another) -> 7 optimizer steps, an after_segment line per stage, and the state of the last
    segment in the last checkpoint."""
    docs = (REPO / "docs" / "engine.md").read_text(encoding="utf-8")
    code = docs.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/engine.md", "exec"), namespace)
    write_preference_jsonl(tmp_path / "easy.jsonl", n=32, seed=5)
    write_preference_jsonl(tmp_path / "hard.jsonl", n=24, seed=6)
    config = make_config(assets, tmp_path / "run", f"data.eval_path={assets / 'eval.jsonl'}", "checkpoint.every_steps=7")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
    stages = [(str(tmp_path / "easy.jsonl"), 4), (str(tmp_path / "hard.jsonl"), 3)]
    result = namespace["train_curriculum"](tmp_path / "cfg.yaml", stages)
    out = capsys.readouterr().out
    assert result.global_step == 7 and not result.interrupted and result.output_dir is not None
    assert "stage 0 done at step 4: held-out accuracy" in out and "stage 1 done at step 7" in out
    assert out.index("stage 0") < out.index("stage 1")
    evals = [r["step"] for r in read_metrics(result.run_dir, split="eval")]
    assert evals == [4, 7]  # after each stage, and the final evaluation is not repeated at step 7


def test_a_segment_state_is_recorded_in_the_checkpoints_taken_inside_it(assets, tmp_path):
    from dpokit.training.trainer import Segment, run_loop

    class Tagged:
        def __init__(self, trainer):
            pass

        def segments(self, trainer):
            yield Segment(end_step=2, state={"stage": {"name": "first"}})
            yield Segment(end_step=4, state={"stage": {"name": "second"}})

        def after_segment(self, trainer, segment, seconds):
            trainer.checkpoint()

    result = run_loop(make_config(assets, tmp_path / "run", "optim.max_steps=4"), check=lambda c: c, loop=Tagged)
    states = {p.name: read_trainer_state(p)["stage"]["name"] for p in list_checkpoints(result.run_dir)}
    assert states == {"checkpoint-2": "first", "checkpoint-4": "second"}
