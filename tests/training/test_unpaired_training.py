"""The new objectives in the engine: reference-free ones (ORPO, CPO, SimPO, AlphaPO) build no
reference and run no reference forward; KTO trains on unpaired labels with its KL reference point
from mismatched pairs (an extra no-grad forward in the same layout), equal on 2 processes and 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpokit.config import load_config
from dpokit.data import PrepareOptions, make_collator, prepare_dataset
from dpokit.errors import ConfigError
from dpokit.losses import build_objective
from dpokit.training import reference as reference_module
from dpokit.training import run
from dpokit.training.parallel import ParallelContext, ParallelPolicy
from dpokit.training.reference import CopyReference, resolve_reference_strategy
from dpokit.training.splits import Split
from dpokit.training.step import collate_examples, forward_batch, rotated
from dpokit.training.tracking import read_metrics
from tests.helpers import tiny_llama, tiny_tokenizer, write_preference_jsonl, write_tiny_model_dir
from tests.training.test_parallel import check_ok, common_overrides, torchrun

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unpaired_assets")
    write_tiny_model_dir(root / "model", hidden_size=32, layers=2, tie_word_embeddings=True)
    write_preference_jsonl(root / "train.jsonl", n=9, seed=0)  # 18 unpaired examples: micro-batches 8, 8, 2
    write_preference_jsonl(root / "eval.jsonl", n=3, seed=1)
    (root / "cfg.yaml").write_text("optim:\n  optimizer: adamw\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("loss", ["orpo", "cpo", "simpo", "alphapo"])
def test_reference_free_objectives_build_no_reference_and_run_no_reference_forward(assets, tmp_path, monkeypatch, loss):
    def refuse(*args, **kwargs):
        raise AssertionError("a reference was built or run for a reference-free objective")

    monkeypatch.setattr(CopyReference, "__init__", refuse)
    monkeypatch.setattr(reference_module, "load_or_compute_reference", refuse)
    monkeypatch.setattr(reference_module.NoReference, "logps", refuse)
    cfg = load_config(None, [*common_overrides(assets, tmp_path / "run"), "optim.batch_size=4", f"loss.terms=[{{name: {loss}}}]"])
    result = run(cfg)
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(result.run_dir, "train"))
    assert (
        resolve_reference_strategy(
            "auto", needs_reference=build_objective([{"name": loss}], beta=0.1).needs_reference, lora=False
        )
        == "none"
    )


def test_kto_cannot_use_a_precomputed_reference():
    with pytest.raises(ConfigError, match="mismatched"):
        resolve_reference_strategy("precomputed", needs_reference=True, lora=False, mismatched_pairs=True)
    assert resolve_reference_strategy("auto", needs_reference=True, lora=False, mismatched_pairs=True) == "copy"


def test_kl_reference_point_is_the_mean_log_ratio_of_rotated_pairs(assets):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    policy_model, reference_model = tiny_llama(seed=0), tiny_llama(seed=1)
    data = prepare_dataset(assets / "train.jsonl", tokenizer, PrepareOptions(unpaired=True), use_cache=False)
    split = Split(data, list(range(len(data))))
    collate = make_collator("padded", tokenizer.pad_token_id or 0)
    objective = build_objective([{"name": "kto"}], beta=0.1)
    ctx = ParallelContext()
    policy, reference = ParallelPolicy(ctx, policy_model), CopyReference(reference_model)
    positions = [0, 3, 5, 8]
    batch = collate_examples(collate, split, positions, rotated(positions), objective)
    assert batch.mismatched is not None and batch.desirable is not None
    out = forward_batch(policy, batch, reference, objective)
    # by hand: prompt of positions[j] with the completion of positions[j - 1]
    items = split.items(positions)
    pairs = [{**items[j], "response_ids": items[j - 1]["response_ids"]} for j in range(len(items))]
    hand = collate(pairs)
    with torch.no_grad():
        expected = (policy.logps(hand).logps - reference.logps(hand)).double().mean()
    assert out.metrics["kl"][0].item() == pytest.approx(expected.item(), abs=1e-5)
    # a stand-in batch counts nothing: the KL is then 0 / 0 -> 0
    stand_in = forward_batch(policy, batch, reference, objective, counted=False)
    assert stand_in.metrics["kl"][0].item() == 0.0


def test_kto_trains_on_paired_data_read_as_unpaired(assets, tmp_path):
    cfg = load_config(None, [*common_overrides(assets, tmp_path / "run"), "optim.batch_size=8", "loss.terms=[{name: kto}]"])
    result = run(cfg)
    records = read_metrics(result.run_dir, "train")
    assert len(records) == 3 and all("kl" in r and "rewards/desirable" in r for r in records)


@pytest.mark.slow
@pytest.mark.distributed
def test_kto_on_two_processes_equals_one_process_including_the_kl_term(assets, tmp_path):
    """2 ranks x batch 4 vs 1 x batch 8 (18 unpaired examples: the third global micro-batch has 2, so
    each rank has one): same losses and the same KL estimate (mismatched pairs across the global
    micro-batch, summed over ranks before the mean and the clamp)."""
    torch.set_num_threads(1)
    kto = ["loss.terms=[{name: kto}]", "reference.strategy=copy"]
    single = run(load_config(None, [*common_overrides(assets, tmp_path / "single"), "optim.batch_size=8", *kto]))
    run_dir = tmp_path / "ddp"
    check_ok(torchrun(assets / "cfg.yaml", [*common_overrides(assets, run_dir, cache="cache_ddp"), "optim.batch_size=4", *kto]))
    got, expected = read_metrics(run_dir, "train"), read_metrics(single.run_dir, "train")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]
    for a, b in zip(got, expected, strict=True):
        assert set(a) == set(b)  # a step whose examples are all of one class has no metric for the other
        for name in {"loss", "rewards/desirable", "rewards/undesirable"} & set(b):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), name
        # the KL is a mean of differences of summed float32 log-probs of about -50 (rounding ~1e-5)
        assert a["kl"] == pytest.approx(b["kl"], abs=5e-5)


@pytest.mark.parametrize("name", ["kto", "orpo", "simpo"])
def test_example_configs_load(name):
    cfg = load_config(REPO / "examples" / f"{name}.yaml")
    assert cfg.loss.terms[0]["name"] == name
