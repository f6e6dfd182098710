"""Every speed feature is switchable and changes nothing but speed: the shared-prompt and packed
layouts, the chunk size of the output layer and the precomputed reference give the same loss and
the same gradients as the plain padded path, to float32 tolerance."""

from __future__ import annotations

import pytest
import torch

from dpokit.data import make_collator
from dpokit.logprobs import compute_logps
from dpokit.losses import LossInputs, build_objective
from dpokit.training import run
from dpokit.training.reference import compute_reference_logps
from dpokit.training.tracking import read_metrics
from tests.helpers import tiny_llama
from tests.training.test_trainer import assets, make_config  # noqa: F401  (assets is a fixture)

PAD = 0
ITEMS = [
    {"example_id": 0, "prompt_ids": [5, 6, 7, 8, 9, 10], "response_ids": [[21, 22, 23], [31, 32, 33, 34, 35, 36]]},
    {"example_id": 1, "prompt_ids": [11], "response_ids": [[24], [37, 38]]},
    {"example_id": 2, "prompt_ids": [12, 13, 14], "response_ids": [[25, 26, 27, 28, 29], [39, 40]]},
    {"example_id": 3, "prompt_ids": [15, 16], "response_ids": [[30, 41], [42]]},
]
LAYOUTS = [("padded", {}), ("shared_prompt", {}), ("packed", {"pack_tokens": 32})]


def loss_and_gradients(layout: str, options: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss (beta 0.1) of a tiny Llama against a perturbed copy as reference, and the
    gradient of every policy parameter; the same weights and items whatever the layout."""
    policy = tiny_llama(vocab_size=64, seed=0).train()
    reference = tiny_llama(vocab_size=64, seed=1)
    batch = make_collator(layout, PAD, **options)(ITEMS)
    with torch.no_grad():
        reference_logps = compute_logps(reference, batch).logps
    policy_out = compute_logps(policy, batch, chunk_size=chunk_size)
    objective = build_objective([{"name": "sigmoid"}], beta=0.1)
    out = objective(LossInputs(policy_out.logps, reference_logps, batch.response_lengths, batch.response_mask))
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in policy.named_parameters()}


@pytest.mark.parametrize("layout,options", LAYOUTS[1:], ids=[name for name, _ in LAYOUTS[1:]])
def test_layout_gives_the_padded_loss_and_gradients(layout, options):
    expected_loss, expected_grads = loss_and_gradients("padded", {})
    loss, grads = loss_and_gradients(layout, options)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_output_layer_chunk_size_does_not_change_loss_or_gradients():
    expected_loss, expected_grads = loss_and_gradients("shared_prompt", {}, chunk_size=1024)
    loss, grads = loss_and_gradients("shared_prompt", {}, chunk_size=3)  # 3-token chunks: many chunk edges
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4)


def test_precomputed_reference_table_is_the_same_in_every_layout():
    model = tiny_llama(vocab_size=64, seed=1)
    ids, expected = compute_reference_logps(model, ITEMS, make_collator("padded", PAD), batch_size=3)
    for layout, options in LAYOUTS[1:]:
        other_ids, table = compute_reference_logps(model, ITEMS, make_collator(layout, PAD, **options), batch_size=3)
        assert torch.equal(other_ids, ids)
        torch.testing.assert_close(table, expected, atol=1e-5, rtol=1e-5)


def test_training_loss_curve_is_the_same_in_every_layout(assets, tmp_path):  # noqa: F811
    """Four optimizer steps with a precomputed reference: data.layout changes no logged loss. (Each
    step takes all 64 examples, since shared-prompt layouts group batches by whole-block length and
    so visit smaller batches in another order.)"""
    curves = {}
    for layout in ("padded", "shared_prompt", "packed"):
        cfg = make_config(
            assets,
            tmp_path / layout,
            "optim.max_steps=4",
            "optim.batch_size=64",
            "reference.strategy=precomputed",
            f"data.layout={layout}",
            "data.pack_tokens=96",
            f"data.cache_dir={tmp_path / ('cache-' + layout)}",
        )
        result = run(cfg)
        curves[layout] = [record["loss"] for record in read_metrics(result.run_dir, split="train")]
    assert len(curves["padded"]) == 4
    for layout in ("shared_prompt", "packed"):
        assert curves[layout] == pytest.approx(curves["padded"], abs=1e-5, rel=1e-5)
