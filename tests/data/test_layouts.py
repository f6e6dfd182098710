"""Shared-prompt and packed layouts: rows, positions, masks and score indices; per-sequence
log-probs equal those of the padded layout on tiny Llama and GPT-2 models (SDPA and eager); the
padded layout's right-padding mask left out for SDPA's causal kernel; ``data.layout: auto``'s
cost estimate."""

from __future__ import annotations

import pytest
import torch

from dpokit.data import make_collator
from dpokit.data.collate import PackedCollator, SharedPromptCollator, block_attention_mask
from dpokit.errors import ConfigError
from dpokit.logprobs import attention_inputs, causal_mask_suffices, compute_logps
from dpokit.training.layout import layout_costs, plan_layout
from tests.helpers import tiny_gpt2, tiny_llama

PAD = 0
ITEMS = [
    {"example_id": 7, "prompt_ids": [11, 12, 13], "response_ids": [[21, 22], [31]]},
    {"example_id": 9, "prompt_ids": [14], "response_ids": [[23, 24, 25, 26], [32, 33]]},
]


def test_shared_prompt_row_is_prompt_then_each_response_with_positions_restarting_after_the_prompt():
    batch = SharedPromptCollator(PAD)(ITEMS)
    assert batch.input_ids.tolist() == [[11, 12, 13, 21, 22, 31, PAD], [14, 23, 24, 25, 26, 32, 33]]
    # chosen continues the prompt's positions; rejected restarts at the prompt length.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0], [0, 1, 2, 3, 4, 1, 2]]
    assert batch.extras["segment_id"].tolist() == [[0, 0, 0, 1, 1, 2, -1], [0, 1, 1, 1, 1, 2, 2]]
    assert batch.extras["example_id"].tolist() == [7, 9]
    assert batch.attention_mask.shape == (2, 1, 7, 7) and batch.attention_mask.dtype == torch.bool


def test_rejected_tokens_see_the_prompt_but_not_the_chosen_tokens():
    mask = SharedPromptCollator(PAD)(ITEMS).attention_mask[0, 0].int()
    # Row 0: columns 0-2 prompt, 3-4 chosen, 5 rejected, 6 padding.
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0],  # rejected: prompt + itself, not the chosen columns 3-4
        [0, 0, 0, 0, 0, 0, 1],  # padding attends only to itself (no empty softmax row)
    ]


def test_first_token_of_every_response_is_predicted_by_the_last_prompt_token():
    """Row 0 (T = 7): chosen 21 22 at columns 3 4 are predicted by columns 2 3; rejected 31 at
    column 5 by column 2 (the last prompt token), not by column 4. Flat index = n * 7 + column."""
    batch = SharedPromptCollator(PAD)(ITEMS)
    assert batch.score_seq.tolist() == [0, 0, 1, 1, 1, 1, 2, 3, 3]  # s = k * B + b
    assert batch.score_index.tolist() == [2, 3, 7, 8, 9, 10, 2, 7, 12]
    assert batch.score_target.tolist() == [21, 22, 23, 24, 25, 26, 31, 32, 33]
    assert batch.response_lengths.tolist() == [[2, 1], [4, 2]]


def test_packing_puts_several_examples_in_a_row_with_a_block_diagonal_mask():
    batch = PackedCollator(PAD, pack_tokens=16)(ITEMS)
    assert batch.input_ids.shape == (1, 13)  # 7 + 6 tokens, no padding
    block = batch.extras["block_id"][0].tolist()
    assert block == [1] * 7 + [0] * 6  # longest block first, then the next that fits
    mask = batch.attention_mask[0, 0]
    assert not mask[7:13, :7].any() and not mask[:7, 7:13].any()  # blocks never see each other
    assert batch.position_ids[0, 7:13].tolist() == [0, 1, 2, 3, 4, 3]
    # A budget smaller than a block gives that block its own row.
    assert PackedCollator(PAD, pack_tokens=8)(ITEMS).input_ids.shape[0] == 2


def test_mask_from_ids_matches_the_collators_mask():
    batch = PackedCollator(PAD, pack_tokens=16)(ITEMS)
    assert torch.equal(block_attention_mask(batch.extras["block_id"], batch.extras["segment_id"]), batch.attention_mask)


def test_layout_names_and_option_errors():
    assert isinstance(make_collator("shared_prompt", PAD), SharedPromptCollator)
    assert make_collator("packed", PAD, pack_tokens=64).pack_tokens == 64
    with pytest.raises(ConfigError, match="available: padded, shared_prompt, packed"):
        make_collator("zigzag", PAD)
    with pytest.raises(ConfigError, match="pack_tokens applies to the 'packed' layout"):
        make_collator("padded", PAD, pack_tokens=64)


RAGGED = [
    {"example_id": 0, "prompt_ids": [5, 6, 7, 8, 9], "response_ids": [[21, 22, 23], [31, 32, 33, 34, 35, 36]]},
    {"example_id": 1, "prompt_ids": [10], "response_ids": [[24], [37, 38]]},
    {"example_id": 2, "prompt_ids": [], "response_ids": [[25, 26, 27], [39, 40]]},  # no prompt: first token unscored
    {"example_id": 3, "prompt_ids": [11, 12], "response_ids": [[28, 29], [41], [42, 43, 44]]},  # K = 3
]


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layout,options", [("shared_prompt", {}), ("packed", {"pack_tokens": 24})])
def test_layout_logps_equal_padded_logps(make_model, attention, layout, options):
    model = make_model(vocab_size=64, attn_implementation=attention)
    with torch.no_grad():
        padded = compute_logps(model, make_collator("padded", PAD)(RAGGED))
        other = compute_logps(model, make_collator(layout, PAD, **options)(RAGGED))
    torch.testing.assert_close(other.logps, padded.logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(other.lengths, padded.lengths)


def test_eager_attention_gets_an_additive_mask_and_sdpa_a_boolean_one():
    batch = SharedPromptCollator(PAD)(ITEMS)
    eager = attention_inputs(tiny_llama(vocab_size=64, attn_implementation="eager"), batch)["attention_mask"]
    assert eager.dtype == torch.float32 and eager[0, 0, 5, 3] == torch.finfo(torch.float32).min and eager[0, 0, 5, 2] == 0
    sdpa = attention_inputs(tiny_llama(vocab_size=64, attn_implementation="sdpa"), batch)
    assert sdpa["attention_mask"].dtype == torch.bool and "position_ids" in sdpa


def test_auto_layout_picks_shared_prompt_for_mask_aware_attention():
    assert plan_layout("auto", tiny_llama(vocab_size=64))[0] == "shared_prompt"
    assert plan_layout("padded", tiny_llama(vocab_size=64))[0] == "padded"


def test_attention_that_ignores_custom_masks_is_refused_with_a_clear_error():
    model = tiny_llama(vocab_size=64)
    model.config._attn_implementation = "flash_attention_2"  # kernels that take no dense mask
    with pytest.raises(ConfigError, match="data.layout=padded"):
        attention_inputs(model, SharedPromptCollator(PAD)(ITEMS))
    assert plan_layout("auto", model)[0] == "padded"


def test_sdpa_gets_no_mask_for_right_padded_rows_and_the_log_probs_do_not_change():
    """In a causal decoder a real token of a right-padded row sees only earlier, real tokens: the
    2-D padding mask changes nothing it scores, and without it SDPA needs no (N, 1, T, T) mask."""
    model = tiny_llama(vocab_size=64)
    batch = make_collator("padded", PAD)(ITEMS)
    assert (batch.attention_mask == 0).any()  # the rows really are padded
    inputs = attention_inputs(model, batch)
    assert "attention_mask" not in inputs
    with torch.no_grad():
        causal = compute_logps(model, batch).logps
        eager = compute_logps(tiny_llama(vocab_size=64, attn_implementation="eager"), batch).logps
    torch.testing.assert_close(causal, eager, atol=1e-5, rtol=1e-5)


def test_a_left_padded_mask_and_an_eager_models_mask_are_kept():
    model = tiny_llama(vocab_size=64)
    batch = make_collator("padded", PAD)(ITEMS)
    batch.attention_mask = batch.attention_mask.flip(1)  # padding on the left: earlier positions are padding
    assert torch.equal(attention_inputs(model, batch)["attention_mask"], batch.attention_mask)
    eager = tiny_llama(vocab_size=64, attn_implementation="eager")
    assert "attention_mask" in attention_inputs(eager, make_collator("padded", PAD)(ITEMS))


def test_a_model_with_bidirectional_attention_keeps_its_padding_mask():
    """Attention that sees later positions would let real tokens see the padding: the once-per-model
    check compares hidden states with and without the mask and keeps the mask."""
    model = tiny_llama(vocab_size=64)
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    assert not causal_mask_suffices(model)
    assert "attention_mask" in attention_inputs(model, make_collator("padded", PAD)(ITEMS))
    assert causal_mask_suffices(tiny_llama(vocab_size=64))


def _item(prompt: int, *responses: int) -> dict:
    return {"example_id": 0, "prompt_ids": [5] * prompt, "response_ids": [[6] * r for r in responses]}


def test_layout_cost_counts_tokens_and_attention_area_per_layout():
    """Tiny Llama: hidden 32, intermediate 64, 2 layers, 4 heads of 8. Per layer q/o 32x32 each, k/v
    32x16 each, MLP 3 x 32x64, two norms of 32: 2*1024 + 2*512 + 6144 + 64 = 9,280 weights, so
    f = 2 * 2 * 9,280 + 2 * 32 (final norm) = 37,184 FLOPs per token; a = 4 * 4 * 8 * 2 = 256 per
    query-key pair. One example, prompt 2, responses 3 and 1:
    shared_prompt: W = 6, cost = 6 f + 36 a = 223,104 + 9,216 = 232,320;
    padded: 2 rows of W = 5, causal kernel: 10 f + 2 * 25/2 a = 371,840 + 6,400 = 378,240."""
    model = tiny_llama(vocab_size=64)
    costs = layout_costs(model, {"shared_prompt": [[_item(2, 3, 1)]], "padded": [[_item(2, 3, 1)]]})
    assert costs == {"shared_prompt": 232_320.0, "padded": 378_240.0}


def test_auto_layout_shares_long_prompts_and_pads_long_responses():
    """A long prompt with short responses is computed once in shared_prompt (half the tokens); long
    responses in one dense-mask row cost attention over each other and the upper triangle (four
    times the area of two causal rows), so auto picks padded."""
    model = tiny_llama(vocab_size=64)

    def batches(item: dict) -> dict:
        return {"padded": [[item, item]], "shared_prompt": [[item, item]]}

    layout, why = plan_layout("auto", model, batches(_item(200, 5, 5)))
    assert layout == "shared_prompt" and "shared_prompt / padded" in why
    assert plan_layout("auto", model, batches(_item(2, 300, 300)))[0] == "padded"
    assert plan_layout("padded", model, batches(_item(200, 5, 5)))[0] == "padded"
