"""Sequence parallelism on CPU (gloo): rows split along their positions over 2 ranks train exactly as
one process does.

The yardstick is one plain process with the same micro-batches. The rows are long and of uneven
length (prompts of 7 to 29 tokens, responses of 3 to 41), so the split point (half of each padded
batch's width, rounded up) falls inside prompts in some rows and inside responses in others, and
widths are odd. Tolerances: losses rel 1e-5 / abs 1e-6 and weights rtol 1e-4 / atol 2e-5, as for
DDP and FSDP (tests/training/test_parallel.py); the split attention merges two softmax halves by
their log-sum-exp, which changes the float32 rounding, not the result.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dpokit.config import load_config
from dpokit.errors import ConfigError
from dpokit.training import run
from dpokit.training.parallel import setup_parallel
from dpokit.training.tracking import read_metrics
from tests.helpers import write_tiny_model_dir
from tests.training.test_parallel import assert_same_losses, assert_same_weights, check_ok, torchrun, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORDS = ("good", "bad", "movie", "plot", "music", "great", "awful", "story", "actor", "film", "best", "worst")


def long_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Rows with prompts of 7-29 words and responses of 3-41 words (odd and even counts mixed)."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    return [{"prompt": text(7, 29), "chosen": " " + text(3, 41), "rejected": " " + text(3, 41)} for _ in range(n)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sp_assets")
    write_tiny_model_dir(root / "model", hidden_size=32, layers=2)
    for name, n, seed in (("train", 6, 0), ("eval", 3, 1)):
        rows = long_rows(n, seed)
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "cfg.yaml").write_text("data:\n  layout: padded\n", encoding="utf-8")
    return root


def overrides(assets: Path, run_dir: Path, cache: str) -> list[str]:
    return [
        f"model.name_or_path={assets / 'model'}",
        f"data.train_path={assets / 'train.jsonl'}",
        f"data.eval_path={assets / 'eval.jsonl'}",
        f"data.cache_dir={assets / cache}",
        "data.layout=padded",
        f"logging.run_dir={run_dir}",
        "optim.optimizer=adamw",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "optim.batch_size=3",
        "optim.max_steps=2",
        "optim.logps_chunk_size=7",
        "reference.strategy=precomputed",
        "eval.every_steps=0",
        "eval.batch_size=2",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "checkpoint.every_steps=0",
    ]


def test_two_sequence_parallel_ranks_train_exactly_as_one_process(assets, tmp_path):
    """torchrun, 2 processes, distributed.sequence_parallel=2 (one group: both ranks hold every
    example, each half of every row) against one process: the same 2 training losses, eval metrics
    and final weights. The precomputed reference is computed once per group and its table is the
    one-process table; metrics count each example once (3 eval examples, not 6)."""
    torch.set_num_threads(1)
    single = run(load_config(None, overrides(assets, tmp_path / "single", "cache_single")))
    run_dir = tmp_path / "sp"
    result = torchrun(
        assets / "cfg.yaml",
        [*overrides(assets, run_dir, "cache_sp"), "distributed.strategy=ddp", "distributed.sequence_parallel=2"],
    )
    check_ok(result)
    assert "rows split over 2 ranks" in result.stdout + result.stderr
    assert_same_losses(train_losses(run_dir), train_losses(single.run_dir))
    (evaluation,) = read_metrics(run_dir, split="eval")
    for name, value in single.eval_metrics.items():
        assert evaluation[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert evaluation["rewards/accuracies_n"] == 3
    assert_same_weights(run_dir / "final", single.output_dir)


def test_sequence_parallel_that_does_not_divide_the_processes_is_refused_before_any_collective(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = load_config(
        None, ["data.layout=padded", "distributed.strategy=ddp", "distributed.backend=gloo", "distributed.sequence_parallel=2"]
    )
    with pytest.raises(ConfigError, match=r"sequence_parallel=2 does not divide the 3 processes"):
        setup_parallel(cfg)


def test_sequence_parallel_takes_the_padded_layout_only():
    with pytest.raises(ConfigError, match=r"sequence_parallel=2 splits the rows of the padded layout only.*data.layout=auto"):
        load_config(None, ["model.name_or_path=x", "distributed.sequence_parallel=2"])
