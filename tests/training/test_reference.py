"""The references: adapters-off and frozen-copy references equal the base model; strategy resolution;
precomputed log-probs equal the live reference, cached, reused and invalidated."""

from __future__ import annotations

import os

import pytest
import torch

from dpokit.config import LoraConfig, ModelConfig
from dpokit.data import PaddedCollator, PreferenceExample, prepare_dataset, prepare_from_examples
from dpokit.errors import ConfigError
from dpokit.logprobs import compute_logps
from dpokit.models import apply_lora, load_model_and_tokenizer
from dpokit.training.parallel import ParallelContext, ParallelPolicy
from dpokit.training.reference import (
    AdapterDisabledReference,
    CopyReference,
    NoReference,
    cached_reference_files,
    load_or_compute_reference,
    model_fingerprint,
    resolve_reference_strategy,
)
from tests.helpers import preference_rows, write_preference_jsonl, write_tiny_model_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    write_tiny_model_dir(root / "model")
    write_preference_jsonl(root / "train.jsonl", n=40, seed=0)
    return root


def load(assets):
    return load_model_and_tokenizer(ModelConfig(name_or_path=str(assets / "model"), device="cpu"))


def precompute(model, data, collate, cache_dir, **kwargs):
    return load_or_compute_reference(
        model, data.items, collate, dataset_fingerprint=data.fingerprint, cache_dir=cache_dir, **kwargs
    )


def test_precomputed_reference_equals_the_live_reference(assets, tmp_path):
    """Computed longest-first in batches of 16 (different padding than training batches), looked up
    by example id for shuffled batches of 5: equal to a frozen copy's live log-probs."""
    model, tokenizer = load(assets)
    data = prepare_dataset(assets / "train.jsonl", tokenizer, cache_dir=tmp_path)
    collate = PaddedCollator(tokenizer.pad_token_id)
    table = precompute(model, data, collate, tmp_path, batch_size=16)
    live = CopyReference.from_policy(model)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    for start in range(0, len(order), 5):
        batch = collate([data.items[i] for i in order[start : start + 5]])
        torch.testing.assert_close(table.logps(batch), live.logps(batch), rtol=1e-5, atol=1e-4)
    assert len(table) == len(data) and not table.from_cache


def test_cache_is_reused_by_a_later_run_with_other_loss_settings(assets, tmp_path):
    model, tokenizer = load(assets)
    data = prepare_dataset(assets / "train.jsonl", tokenizer, cache_dir=tmp_path)
    collate = PaddedCollator(tokenizer.pad_token_id)
    first = precompute(model, data, collate, tmp_path)
    mtime = os.stat(first.path).st_mtime_ns
    again_model, _ = load(assets)  # a fresh process would load the same weights again
    second = precompute(again_model, data, collate, tmp_path, batch_size=3)
    assert second.from_cache and second.path == first.path and os.stat(second.path).st_mtime_ns == mtime
    torch.testing.assert_close(second.logps_table, first.logps_table, rtol=0, atol=0)
    assert len(cached_reference_files(tmp_path)) == 1


def test_cache_is_invalidated_by_a_change_of_model_data_or_tokenization(assets, tmp_path):
    model, tokenizer = load(assets)
    collate = PaddedCollator(tokenizer.pad_token_id)
    data = prepare_dataset(assets / "train.jsonl", tokenizer, cache_dir=tmp_path)
    base = precompute(model, data, collate, tmp_path)

    with torch.no_grad():
        model.model.norm.weight[0] += 0.5
    changed_model = precompute(model, data, collate, tmp_path)
    assert not changed_model.from_cache and changed_model.path != base.path
    assert not torch.allclose(changed_model.logps_table, base.logps_table)

    model, _ = load(assets)
    other_rows = write_preference_jsonl(tmp_path / "other.jsonl", n=40, seed=5)
    changed_data = precompute(model, prepare_dataset(other_rows, tokenizer, cache_dir=tmp_path), collate, tmp_path)
    assert not changed_data.from_cache and changed_data.path != base.path

    truncated = prepare_dataset(assets / "train.jsonl", tokenizer, cache_dir=tmp_path, max_length=12, max_prompt_length=6)
    changed_tokens = precompute(model, truncated, collate, tmp_path)
    assert not changed_tokens.from_cache and changed_tokens.path != base.path
    assert len(cached_reference_files(tmp_path)) == 4


def test_a_damaged_cache_file_is_recomputed(assets, tmp_path):
    model, tokenizer = load(assets)
    data = prepare_dataset(assets / "train.jsonl", tokenizer, cache_dir=tmp_path)
    collate = PaddedCollator(tokenizer.pad_token_id)
    first = precompute(model, data, collate, tmp_path)
    first.path.write_bytes(b"not a safetensors file")
    again = precompute(model, data, collate, tmp_path)
    assert not again.from_cache
    torch.testing.assert_close(again.logps_table, first.logps_table)


def test_fingerprint_sees_weights_and_dtype_but_not_lora_adapters(assets):
    model, _ = load(assets)
    plain = model_fingerprint(model)
    wrapped = apply_lora(load(assets)[0], LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    assert model_fingerprint(wrapped) == plain  # with adapters disabled the reference is the base
    assert model_fingerprint(load(assets)[0].to(torch.bfloat16)) != plain
    with torch.no_grad():
        model.lm_head.weight[3, 3] += 1e-3
    assert model_fingerprint(model) != plain


def batch_for(tokenizer, n: int = 6):
    examples = [
        PreferenceExample(prompt=row["prompt"], responses=[row["chosen"], row["rejected"]], scores=None, source=f"test:{i}")
        for i, row in enumerate(preference_rows(n))
    ]
    return PaddedCollator(tokenizer.pad_token_id)(prepare_from_examples(examples, tokenizer).items)


def _perturb_adapters(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_lora_reference_with_adapters_disabled_equals_the_base_model(assets):
    """After the adapters have moved (policy != base), the adapter-disabled reference still gives
    exactly the base model's log-probs, without holding a second copy, and restores train mode."""
    cfg = ModelConfig(name_or_path=str(assets / "model"), device="cpu")
    base, tokenizer = load_model_and_tokenizer(cfg)
    base.eval()
    policy, _ = load_model_and_tokenizer(cfg)
    policy = apply_lora(policy, LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj", "lm_head"])).train()
    batch = batch_for(tokenizer)
    with torch.no_grad():
        expected = compute_logps(base, batch).logps
        torch.testing.assert_close(compute_logps(policy, batch).logps, expected, rtol=1e-5, atol=1e-5)  # B = 0 at init
    _perturb_adapters(policy)
    reference = AdapterDisabledReference(ParallelPolicy(ParallelContext(), policy))
    with torch.no_grad():
        assert not torch.allclose(compute_logps(policy, batch).logps, expected, atol=1e-2)
    torch.testing.assert_close(reference.logps(batch), expected, rtol=1e-5, atol=1e-5)
    assert reference.policy.model is policy and policy.training
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) < sum(p.numel() for p in base.parameters()) / 5


def test_copy_reference_is_frozen_and_unaffected_by_policy_updates(assets):
    policy, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(assets / "model"), device="cpu"))
    reference = CopyReference.from_policy(policy)
    batch = batch_for(tokenizer)
    before = reference.logps(batch)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.01)
    torch.testing.assert_close(reference.logps(batch), before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reference.model.parameters())
    assert NoReference().logps(batch) is None


def test_auto_strategy_resolution_and_mismatches():
    assert resolve_reference_strategy("auto", needs_reference=False, lora=True) == "none"
    assert resolve_reference_strategy("auto", needs_reference=True, lora=True) == "adapter_disabled"
    assert resolve_reference_strategy("auto", needs_reference=True, lora=False) == "copy"
    assert resolve_reference_strategy("precomputed", needs_reference=True, lora=True) == "precomputed"
    with pytest.raises(ConfigError, match="loss.reference_free=true"):
        resolve_reference_strategy("none", needs_reference=True, lora=False)
    with pytest.raises(ConfigError, match="lora"):
        resolve_reference_strategy("adapter_disabled", needs_reference=True, lora=False)
