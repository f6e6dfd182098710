"""dpokit.data.batch on its own: the sizes a batch reports, the model's inputs, moving it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dpokit.data.batch import Batch


def make_batch(*, batch_size: int = 2, num_responses: int = 3, position_ids: bool = False, extras: bool = False) -> Batch:
    """``batch_size`` examples with ``num_responses`` responses each, one padded row per sequence."""
    num_sequences, length = batch_size * num_responses, 5
    input_ids = torch.arange(num_sequences * length).view(num_sequences, length)
    response_mask = torch.ones(batch_size, num_responses, dtype=torch.bool)
    response_mask[-1, -1] = False  # the last example's ranking is one response short
    return Batch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        score_index=torch.tensor([3, 4, 8, 9]),
        score_target=torch.tensor([4, 5, 9, 10]),
        score_seq=torch.tensor([0, 0, 1, 1]),
        response_mask=response_mask,
        response_lengths=response_mask.long() * 2,
        position_ids=torch.arange(length).expand(num_sequences, length).clone() if position_ids else None,
        extras={"example_ids": torch.arange(batch_size)} if extras else {},
    )


@pytest.mark.parametrize(("batch_size", "num_responses"), [(1, 2), (2, 3), (4, 2)])
def test_sizes_come_from_the_response_mask(batch_size, num_responses):
    batch = make_batch(batch_size=batch_size, num_responses=num_responses)
    assert batch.batch_size == batch_size
    assert batch.num_responses == num_responses
    assert batch.num_sequences == batch_size * num_responses
    assert all(isinstance(n, int) for n in (batch.batch_size, batch.num_responses, batch.num_sequences))


def test_sizes_do_not_depend_on_the_token_rows():
    # A shared-prompt layout packs a pair into one row: N = B rows for S = 2B sequences.
    batch = make_batch(batch_size=2, num_responses=2)
    packed = dataclasses.replace(batch, input_ids=batch.input_ids[:2], attention_mask=batch.attention_mask[:2])
    assert (packed.batch_size, packed.num_responses, packed.num_sequences) == (2, 2, 4)


def test_model_inputs_without_position_ids():
    batch = make_batch()
    inputs = batch.model_inputs()
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"] is batch.input_ids
    assert inputs["attention_mask"] is batch.attention_mask


def test_model_inputs_with_position_ids_and_never_the_score_vectors_or_extras():
    batch = make_batch(position_ids=True, extras=True)
    inputs = batch.model_inputs()
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids"}
    assert inputs["position_ids"] is batch.position_ids


def test_a_default_batch_has_no_extras_and_each_batch_its_own_dict():
    first, second = make_batch(), make_batch()
    assert first.position_ids is None and first.extras == {}
    first.extras["example_ids"] = torch.tensor([0, 1])
    assert second.extras == {}


def test_to_moves_every_tensor_and_the_extras_into_a_new_batch():
    batch = make_batch(position_ids=True, extras=True)
    batch.image_inputs = {"pixel_values": torch.zeros(2, 3, 4, 4)}
    moved = batch.to("meta")
    assert moved is not batch
    for f in dataclasses.fields(Batch):
        value = getattr(moved, f.name)
        if f.name == "extras":
            assert set(value) == {"example_ids"}
            assert value["example_ids"].device.type == "meta"
        elif f.name == "image_inputs":
            assert set(value) == {"pixel_values"} and value["pixel_values"].device.type == "meta"
        elif f.name in ("desirable", "mismatched"):  # unpaired data only (tests/data/test_unpaired.py)
            assert value is None
        else:
            assert value.device.type == "meta", f.name
            assert value.shape == getattr(batch, f.name).shape
            assert value.dtype == getattr(batch, f.name).dtype
    # The original is untouched.
    assert batch.input_ids.device.type == "cpu" and batch.extras["example_ids"].device.type == "cpu"


def test_to_keeps_a_missing_position_ids_missing_and_the_values():
    batch = make_batch()
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert moved.position_ids is None and moved.extras == {}
    for name in ("input_ids", "attention_mask", "score_index", "score_target", "score_seq", "response_mask", "response_lengths"):
        assert torch.equal(getattr(moved, name), getattr(batch, name)), name
    assert moved.num_sequences == batch.num_sequences


def test_to_casts_nothing():
    batch = make_batch()
    moved = batch.to("cpu")
    assert moved.response_mask.dtype == torch.bool
    assert moved.response_lengths.dtype == torch.long
    assert moved.response_lengths.tolist() == [[2, 2, 2], [2, 2, 0]]
