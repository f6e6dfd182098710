"""The references: adapters-off and frozen-copy references equal the base model; strategy resolution;
precomputed log-probs equal the live reference, cached, reused and invalidated."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from dpokit.config import LoraConfig, ModelConfig
from dpokit.data import PaddedCollator, PreferenceExample, PrepareOptions, make_collator, prepare_dataset, prepare_from_examples
from dpokit.errors import ConfigError
from dpokit.logprobs import compute_logps
from dpokit.models import apply_lora, load_model_and_tokenizer
from dpokit.training.parallel import ParallelContext, ParallelPolicy
from dpokit.training.reference import (
    AdapterDisabledReference,
    CopyReference,
    NoReference,
    ReferenceWorkload,
    available_memory,
    cached_reference_files,
    compute_reference_logps,
    load_or_compute_reference,
    model_fingerprint,
    plan_reference,
    reference_batches,
    resolve_reference_strategy,
    response_rows,
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

    truncated = prepare_dataset(
        assets / "train.jsonl", tokenizer, PrepareOptions(max_length=12, max_prompt_length=6), cache_dir=tmp_path
    )
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
    assert resolve_reference_strategy("auto", needs_reference=True, lora=True) == "precomputed"
    assert resolve_reference_strategy("auto", needs_reference=True, lora=False) == "precomputed"
    assert resolve_reference_strategy("auto", needs_reference=True, lora=True, mismatched_pairs=True) == "adapter_disabled"
    assert resolve_reference_strategy("precomputed", needs_reference=True, lora=True) == "precomputed"
    assert resolve_reference_strategy("copy", needs_reference=True, lora=True) == "copy"
    with pytest.raises(ConfigError, match="loss.reference_free=true"):
        resolve_reference_strategy("none", needs_reference=True, lora=False)
    with pytest.raises(ConfigError, match="lora"):
        resolve_reference_strategy("adapter_disabled", needs_reference=True, lora=False)


GIB = 2**30


@pytest.mark.parametrize(
    "lora,workload,expected,reason",
    [
        # An epoch or more: one pass over the data is no more work than the live forwards.
        (False, ReferenceWorkload(256, 256, copy_bytes=GIB, free_bytes=20 * GIB), "precomputed", "costs no more than the 256"),
        (True, ReferenceWorkload(300, 900), "precomputed", "no reference model stays in memory"),
        # A run shorter than an epoch forwards fewer examples live.
        (True, ReferenceWorkload(1000, 80), "adapter_disabled", "forwards 80 examples, fewer than the 1000"),
        (False, ReferenceWorkload(1000, 80, copy_bytes=GIB, free_bytes=20 * GIB), "copy", "a frozen copy (1.0 GiB)"),
        (False, ReferenceWorkload(1000, 80, copy_bytes=GIB, free_bytes=None), "copy", "fewer than the 1000"),
        # ... unless the copy does not fit in half the free memory.
        (False, ReferenceWorkload(1000, 80, copy_bytes=6 * GIB, free_bytes=10 * GIB), "precomputed", "do not fit"),
    ],
)
def test_auto_picks_the_strategy_that_forwards_least_and_fits(lora, workload, expected, reason):
    strategy, why = plan_reference("auto", needs_reference=True, lora=lora, workload=workload)
    assert strategy == expected and reason in why


def test_auto_explains_none_and_the_kto_exception_and_an_explicit_choice():
    workload = ReferenceWorkload(100, 1000)
    assert plan_reference("auto", needs_reference=False, lora=False, workload=workload) == ("none", "the loss needs no reference")
    strategy, why = plan_reference("auto", needs_reference=True, lora=False, mismatched_pairs=True, workload=workload)
    assert strategy == "copy" and "KL pairs" in why
    sampled = ReferenceWorkload(100, 1000, samples_reference=True)
    strategy, why = plan_reference("auto", needs_reference=True, lora=True, workload=sampled)
    assert strategy == "adapter_disabled" and "eval.sample_prompts" in why
    assert plan_reference("copy", needs_reference=True, lora=False, workload=workload) == ("copy", "set by reference.strategy")


def test_available_memory_of_the_cpu_is_the_systems_free_memory():
    free = available_memory(torch.device("cpu"))
    assert free is None or 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _items(lengths):
    """Prepared-item stand-ins: (prompt, chosen, rejected) token counts -> ids."""
    return [{"example_id": i, "prompt_ids": [5] * p, "response_ids": [[6] * c, [7] * r]} for i, (p, c, r) in enumerate(lengths)]


def test_reference_batches_sort_by_the_layouts_row_and_keep_the_token_budget():
    """Shared-prompt rows are prompt + both responses long, padded rows prompt + the longer response
    (two rows per example); each batch holds at most max_tokens padded tokens, an example longer
    than the budget goes alone, and every example appears once."""
    items = _items([(2, 10, 10), (12, 2, 2), (4, 4, 20), (1, 1, 1), (30, 30, 30), (3, 3, 3)])
    shared = reference_batches(items, max_examples=32, max_tokens=60)
    assert shared == [[4], [2, 0], [1, 5, 3]]  # rows 90 (alone) | 28, 22 (2 x 28 <= 60) | 16, 9, 3
    padded = reference_batches(items, max_examples=32, max_tokens=60, one_row_per_response=True)
    assert padded == [[4], [2], [1, 0], [5, 3]]  # rows 60 | 24 | 14, 12 (4 rows x 14) | 6, 2
    for batches, rows_per_item, key in (
        (shared, 1, lambda it: len(it["prompt_ids"]) + sum(map(len, it["response_ids"]))),
        (padded, 2, lambda it: len(it["prompt_ids"]) + max(map(len, it["response_ids"]))),
    ):
        assert sorted(i for b in batches for i in b) == list(range(len(items)))
        flat = [key(items[i]) for b in batches for i in b]
        assert flat == sorted(flat, reverse=True)
        for b in batches:
            assert len(b) == 1 or len(b) * rows_per_item * key(items[b[0]]) <= 60
    assert reference_batches(items, max_examples=2, max_tokens=None) == [[4, 2], [0, 1], [5, 3]]


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "packed"])
def test_token_budgeted_reference_table_equals_one_example_at_a_time(assets, tmp_path, layout):
    """The batched pass (length-sorted, a budget that makes batches of several sizes) gives every
    example the log-probs it gets alone, in every layout."""
    model, tokenizer = load(assets)
    data = prepare_dataset(assets / "train.jsonl", tokenizer, cache_dir=tmp_path)
    collate = make_collator(layout, tokenizer.pad_token_id, **({"pack_tokens": 256} if layout == "packed" else {}))
    ids, table = compute_reference_logps(model, data.items, collate, batch_size=32, batch_tokens=200)
    alone_ids, alone = compute_reference_logps(model, data.items, collate, batch_size=1, batch_tokens=None)
    assert torch.equal(ids, alone_ids)
    torch.testing.assert_close(table, alone, rtol=1e-5, atol=1e-4)


def test_a_padded_pass_forwards_responses_one_by_one_into_their_example_slots(assets, tmp_path):
    """With one row per response the pass need not pad chosen and rejected to the longer of the two:
    every (example, response) becomes its own row, sorted and batched alone, and its log-prob goes
    back to slot (example, k): the table equals the shared-prompt pass's, an independent layout."""
    items = _items([(2, 10, 3), (4, 1, 7)])
    rows, places = response_rows(items)
    assert places == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [len(r["response_ids"]) for r in rows] == [1, 1, 1, 1]
    assert [len(r["response_ids"][0]) for r in rows] == [10, 3, 1, 7]
    model, tokenizer = load(assets)
    data = prepare_dataset(assets / "train.jsonl", tokenizer, cache_dir=tmp_path)
    padded = compute_reference_logps(model, data.items, make_collator("padded", tokenizer.pad_token_id), batch_tokens=200)
    shared = compute_reference_logps(model, data.items, make_collator("shared_prompt", tokenizer.pad_token_id))
    assert torch.equal(padded[0], shared[0])
    torch.testing.assert_close(padded[1], shared[1], rtol=1e-5, atol=1e-4)


class _Recorder(logging.Handler):
    """Keeps the message of every record it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_run_logged_to_a_file_prints_a_handful_of_reference_lines_and_no_attention_mask_advice(tmp_path, capfd):
    """Standard error is not a terminal here (as in a log file or CI): the precomputed pass, about 20
    token-budgeted batches, prints at most 4 progress lines (one per quarter) plus its end, like the
    trainer's own plain lines. GPT-2 warns "We strongly recommend passing in an `attention_mask`" when
    padded ids reach it without a mask, which dpokit does on purpose only where the mask changes
    nothing (right padding, causal attention, checked per model); the advice is not printed."""
    from dpokit.training import run
    from tests.helpers import tiny_gpt2, tiny_tokenizer
    from tests.training.test_trainer import make_config

    tiny_gpt2().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    write_preference_jsonl(tmp_path / "train.jsonl", n=40, seed=0)
    warning_once = getattr(logging.Logger, "warning_once", None)
    if warning_once is not None and hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()  # transformers says it once per process: an earlier test may have used that up
    listener = _Recorder()
    logging.getLogger("transformers").addHandler(listener)  # whatever stream transformers' own handler writes to
    capfd.readouterr()
    cfg = make_config(
        tmp_path,
        tmp_path / "run",
        "optim.max_steps=1",
        "reference.strategy=precomputed",
        "reference.batch_tokens=64",
        "logging.progress_bar=true",
        "data.layout=padded",
    )
    try:
        assert run(cfg).global_step == 1
    finally:
        logging.getLogger("transformers").removeHandler(listener)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("reference log-probs: ")]
    assert 1 <= len(lines) <= 5 and lines[-1].startswith("reference log-probs: 80/80 (100%)"), err
    assert not [message for message in listener.messages if "attention_mask" in message] and "attention_mask" not in err
