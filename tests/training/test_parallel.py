"""Real multi-process runs: ``python -m torch.distributed.run ... -m dpokit train`` on CPU (gloo),
two processes, a tiny Llama with tied embeddings (hidden 32, 2 layers), one torch thread per process.

The yardstick is one process with the same *global* batch: 2 ranks x ``optim.batch_size=4`` draw the
micro-batches a single process with ``optim.batch_size=8`` draws, each cut in two slices, and the
loss weighting makes the averaged gradient the single-process mean. The training set has 17
examples, so the third global micro-batch holds ONE example: rank 1 has nothing to train on at step
3 and runs a weight-0 stand-in -- the comparisons below therefore also pin the uneven last batch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import load_config
from dpokit.data import LengthGroupedSampler
from dpokit.errors import ConfigError, TrainingError
from dpokit.training import run
from dpokit.training.checkpoint import is_dcp_checkpoint
from dpokit.training.parallel import ParallelContext, apply_global_batch_size
from dpokit.training.tracking import read_metrics
from tests.helpers import write_preference_jsonl, write_tiny_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

NUM_TRAIN = 17  # global micro-batches of 8: 8, 8, 1


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist_assets")
    # Tied input/output embeddings: under FSDP2 both live in the root's shards and must stay one tensor.
    write_tiny_model_dir(root / "model", hidden_size=32, layers=2, tie_word_embeddings=True)
    write_preference_jsonl(root / "train.jsonl", n=NUM_TRAIN, seed=0)
    write_preference_jsonl(root / "eval.jsonl", n=5, seed=1)
    (root / "cfg.yaml").write_text("optim:\n  optimizer: adamw\n", encoding="utf-8")
    return root


def common_overrides(assets: Path, run_dir: Path, cache: str = "cache") -> list[str]:
    return [
        f"model.name_or_path={assets / 'model'}",
        f"data.train_path={assets / 'train.jsonl'}",
        f"data.eval_path={assets / 'eval.jsonl'}",
        f"data.cache_dir={assets / cache}",
        f"logging.run_dir={run_dir}",
        "optim.optimizer=adamw",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "optim.grad_accumulation=1",
        "optim.max_steps=3",
        "eval.every_steps=0",
        "eval.batch_size=2",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "checkpoint.every_steps=0",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(
    config: Path,
    overrides: list[str],
    *,
    nproc: int = 2,
    launcher: list[str] | None = None,
    resume: str | None = None,
    timeout: int = 240,
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N --master_port P -m dpokit train cfg.yaml overrides...``"""
    launch = launcher or ["--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "dpokit", "train", str(config), *overrides]
    if resume:
        command += ["--resume", resume]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir, split="train")]


def assert_same_losses(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def assert_same_weights(got_dir: Path, expected_dir: Path) -> None:
    got, expected = load_file(str(got_dir / "model.safetensors")), load_file(str(expected_dir / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory):
    """One process, optim.batch_size=8: the run every 2-process run with global batch 8 must equal."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    cfg = load_config(
        None, [*common_overrides(assets, run_dir, cache="cache_single"), "optim.batch_size=8", "reference.strategy=precomputed"]
    )
    return run(cfg)


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(assets, baseline, tmp_path):
    """2 ranks x batch 4 (DDP) vs 1 x batch 8: same 3 losses, eval metrics and final weights. The
    precomputed reference table -- each rank computes a strided half, gathered, rank 0 writes it --
    equals the single-process one; only rank 0 logs (3 train records, 1 eval record)."""
    run_dir = tmp_path / "ddp"
    result = torchrun(
        assets / "cfg.yaml",
        [
            *common_overrides(assets, run_dir, cache=f"cache_{tmp_path.name}"),
            "optim.batch_size=4",
            "distributed.strategy=ddp",
            "reference.strategy=precomputed",
        ],
    )
    check_ok(result)
    assert result.stdout.count("finished after 3 optimizer steps") == 1  # the summary is printed by rank 0 only
    assert_same_losses(train_losses(run_dir), train_losses(baseline.run_dir))
    evals = read_metrics(run_dir, split="eval")
    assert len(evals) == 1 and len(read_metrics(run_dir, split="train")) == 3
    for name, value in baseline.eval_metrics.items():
        assert evals[0][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert_same_weights(run_dir / "final", baseline.output_dir)

    single_tables = sorted((assets / "cache_single" / "reference").glob("*.safetensors"))
    gathered_tables = sorted((assets / f"cache_{tmp_path.name}" / "reference").glob("*.safetensors"))
    assert [p.name for p in gathered_tables] == [p.name for p in single_tables] and gathered_tables
    for ours, theirs in zip(gathered_tables, single_tables, strict=True):
        a, b = load_file(str(ours)), load_file(str(theirs))
        order_a, order_b = a["example_id"].argsort(), b["example_id"].argsort()
        assert a["example_id"][order_a].tolist() == b["example_id"][order_b].tolist()
        torch.testing.assert_close(a["logps"][order_a], b["logps"][order_b], rtol=1e-5, atol=1e-4)


def test_fsdp_equals_one_process_and_its_checkpoint_resumes_on_one_and_on_two_processes(assets, baseline, tmp_path):
    """FSDP2 (blocks then root; copy reference sharded too; activation checkpointing on) on 2 ranks
    equals the single-process run. Its DCP checkpoint after step 2 then resumes (a) in one plain
    process with batch 8 and (b) on 2 ranks with batch 4: both give the same step-3 loss and final
    weights. The consolidated export loads with plain transformers."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "fsdp"
    overrides = [
        *common_overrides(assets, run_dir),
        "distributed.strategy=fsdp",
        "reference.strategy=copy",
        "model.gradient_checkpointing=true",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=5",
    ]
    check_ok(torchrun(assets / "cfg.yaml", [*overrides, "optim.batch_size=4"]))
    assert_same_losses(train_losses(run_dir), train_losses(baseline.run_dir))
    (evaluation,) = read_metrics(run_dir, split="eval")  # eval shards: 3 + 2 examples, batches of 2
    for name, value in baseline.eval_metrics.items():
        assert evaluation[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert_same_weights(run_dir / "final", baseline.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied after the export
    expected = load_file(str(baseline.output_dir / "model.safetensors"))
    for name, tensor in reloaded.state_dict().items():
        if name in expected:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=2e-5)

    checkpoint = run_dir / "checkpoint-2"
    assert is_dcp_checkpoint(checkpoint)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2

    def copy_of_run(name: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        shutil.copytree(checkpoint, target / "checkpoint-2")
        shutil.copy(run_dir / "metrics.jsonl", target / "metrics.jsonl")
        return target

    one = copy_of_run("resume_on_one")
    cfg_one = load_config(None, [*common_overrides(assets, one), "optim.batch_size=4"])
    with pytest.raises(TrainingError, match=r"micro_batch_examples.*8 -> 4"):
        run(cfg_one, resume="latest")  # 1 process x 4 would change the data order
    resumed = run(load_config(None, [*common_overrides(assets, one), "optim.batch_size=8"]), resume="latest")
    assert resumed.global_step == 3
    assert_same_losses(train_losses(one), train_losses(baseline.run_dir))
    assert_same_weights(one / "final", run_dir / "final")

    two = copy_of_run("resume_on_two")
    check_ok(torchrun(assets / "cfg.yaml", [*overrides[:-2], f"logging.run_dir={two}", "optim.batch_size=4"], resume="latest"))
    assert_same_losses(train_losses(two), train_losses(baseline.run_dir))
    assert_same_weights(two / "final", run_dir / "final")


def test_fsdp_lora_reference_is_the_sharded_model_with_adapters_disabled(assets, tmp_path):
    """LoRA under FSDP2 (frozen base and trainable adapters in the same shards): the reference is the
    sharded policy with adapters off, so step 1 has loss log 2 exactly as in one process, and the 3
    losses and the merged export equal the single-process LoRA run."""
    lora = ["model.lora.enabled=true", "model.lora.r=4", "optim.lr=5e-3", "reference.strategy=adapter_disabled"]
    single = run(load_config(None, [*common_overrides(assets, tmp_path / "single"), "optim.batch_size=8", *lora]))
    run_dir = tmp_path / "fsdp_lora"
    check_ok(
        torchrun(
            assets / "cfg.yaml", [*common_overrides(assets, run_dir), "optim.batch_size=4", "distributed.strategy=fsdp", *lora]
        )
    )
    losses = train_losses(run_dir)
    assert losses[0][1] == pytest.approx(0.6931472, abs=1e-6)
    assert_same_losses(losses, train_losses(single.run_dir))
    assert_same_weights(run_dir / "final", single.output_dir)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_examples", [1, 5, 17, 24])
def test_every_example_is_trained_exactly_once_per_epoch_across_ranks(world_size, num_examples):
    """The sampler's global micro-batches (batch_size x ranks) cut into contiguous rank slices: over
    an epoch every example lands on exactly one rank once, slices differ by at most one example."""
    batch_size = 3
    sampler = LengthGroupedSampler(list(range(num_examples)), batch_size * world_size, shuffle=True, seed=7)
    seen: list[int] = []
    for global_batch in sampler:
        slices = [
            ParallelContext(strategy="ddp", rank=r, world_size=world_size).rank_slice(global_batch) for r in range(world_size)
        ]
        assert sum(slices, []) == list(global_batch)
        assert max(map(len, slices)) - min(map(len, slices)) <= 1 and max(map(len, slices)) <= batch_size
        seen.extend(sum(slices, []))
    assert sorted(seen) == list(range(num_examples))


def test_global_batch_size_sets_accumulation_and_refuses_a_remainder(assets, tmp_path):
    """global 16 = 4 per rank x 2 ranks x 2 micro-batches; global 10 cannot be split: every rank of a
    torchrun launch stops with the same message naming the numbers."""
    cfg = load_config(None, ["optim.batch_size=4", "distributed.global_batch_size=16"])
    assert apply_global_batch_size(cfg, 2).optim.grad_accumulation == 2
    assert apply_global_batch_size(cfg, 4).optim.grad_accumulation == 1
    with pytest.raises(ConfigError, match="not a multiple"):
        apply_global_batch_size(cfg, 3)

    result = torchrun(
        assets / "cfg.yaml",
        [*common_overrides(assets, tmp_path / "run"), "optim.batch_size=4", "distributed.global_batch_size=10"],
    )
    assert result.returncode != 0
    message = "distributed.global_batch_size=10 is not a multiple of optim.batch_size (4) x 2 data-parallel rank(s) = 8"
    assert result.stderr.count(message) >= 2  # printed by both ranks
    assert "use a global batch size of 8 or 16" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_nccl_on_a_machine_without_gpus_is_a_clear_error(assets, tmp_path):
    result = torchrun(
        assets / "cfg.yaml",
        [*common_overrides(assets, tmp_path / "run"), "distributed.strategy=fsdp", "distributed.backend=nccl"],
        nproc=1,
    )
    assert result.returncode != 0
    assert "error: distributed.backend=nccl needs NVIDIA GPUs, but CUDA is not available" in result.stderr
    assert "Traceback" not in result.stderr.split("error: distributed.backend=nccl")[0]


def test_a_failing_rank_brings_the_run_down_with_its_cause(assets, tmp_path):
    """Two 'machines' (two torchrun launchers, --nnodes 2): machine 1 has no copy of the model. Its
    rank fails with the reason (printed, and in torchrun's failure summary as the root cause); rank 0
    does not hang: its next collective fails at once and its launcher exits non-zero too."""
    port = free_port()
    run_dir = tmp_path / "run"
    good = [*common_overrides(assets, run_dir), "optim.batch_size=4", "distributed.timeout_s=60"]
    bad = [o if not o.startswith("model.name_or_path=") else f"model.name_or_path={tmp_path / 'no-such-model'}" for o in good]

    def launcher(node_rank: int) -> list[str]:
        return [
            "--nnodes",
            "2",
            "--node_rank",
            str(node_rank),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
        ]

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher(0),
        "-m",
        "dpokit",
        "train",
        str(assets / "cfg.yaml"),
        *good,
    ]
    node0 = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        node1 = torchrun(assets / "cfg.yaml", bad, launcher=launcher(1), timeout=120)
        out0, err0 = node0.communicate(timeout=120)
    finally:
        if node0.poll() is None:
            node0.kill()
    assert node1.returncode != 0
    cause = f"rank 1/2: model.name_or_path: {tmp_path / 'no-such-model'}: no such file or directory"
    assert f"error: {cause}" in node1.stderr
    summary = node1.stderr.split("Root Cause")[-1]
    assert "rank      : 1" in summary and cause in summary
    assert node0.returncode != 0
    assert "remote worker crashing" in err0 or "Connection closed by peer" in err0


def test_a_single_process_is_a_world_of_one_whose_collectives_are_identities():
    """The trainer calls the same collectives on 1 and N processes; on one they return their input."""
    ctx = ParallelContext()
    assert (ctx.world_size, ctx.rank, ctx.is_main, ctx.strategy) == (1, 0, True, "none")
    assert ctx.handles_signals and ctx.holds_whole_model
    ctx.barrier()
    payload = {"run_dir": "runs/x"}
    assert ctx.broadcast_object(payload) is payload
    assert ctx.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert ctx.all_gather_object(payload) == [payload]
    assert ctx.rank_slice([4, 5, 6]) == [4, 5, 6]
    with ctx.main_first():
        pass


def test_one_process_and_torchrun_ranks_run_the_same_trainer(assets, tmp_path, monkeypatch):
    """``dpokit.training.run`` in one process builds a world-of-one context and the same Trainer whose
    ``fit`` the torchrun ranks run (the 2-process tests above compare their results)."""
    from dpokit.training import trainer as trainer_module

    seen = []
    original_fit = trainer_module.Trainer.fit

    def recording_fit(self, loop=None, on_step=None):
        seen.append((type(self).__name__, self.ctx.world_size, type(self.parts.runner.module).__name__))
        return original_fit(self, loop, on_step)

    monkeypatch.setattr(trainer_module.Trainer, "fit", recording_fit)
    cfg = load_config(assets / "cfg.yaml", common_overrides(assets, tmp_path / "one") + ["optim.max_steps=1"])
    assert run(cfg).global_step == 1
    assert seen == [("Trainer", 1, "LogpsModule")]
