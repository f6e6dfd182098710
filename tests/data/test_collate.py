"""PaddedCollator: row order s = k*B + b, right padding, attention masks, labels and score indices;
log-probs read through the Batch equal unpadded per-sequence log-probs. LengthGroupedSampler."""

from __future__ import annotations

import numpy as np
import torch

from dpokit.data import LengthGroupedSampler, PaddedCollator, make_collator
from tests.helpers import tiny_llama

PAD = 0
ITEMS = [
    {"example_id": 7, "prompt_ids": [11, 12, 13], "response_ids": [[21, 22], [31]]},
    {"example_id": 9, "prompt_ids": [14], "response_ids": [[23, 24, 25, 26], [32, 33]]},
]


def test_rows_are_prompt_plus_response_stacked_chosen_first_and_right_padded():
    batch = PaddedCollator(PAD)(ITEMS)
    # s = k * B + b: rows 0, 1 are the chosen responses of examples 0, 1; rows 2, 3 the rejected.
    assert batch.input_ids.tolist() == [
        [11, 12, 13, 21, 22],
        [14, 23, 24, 25, 26],
        [11, 12, 13, 31, PAD],
        [14, 32, 33, PAD, PAD],
    ]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch.extras["example_id"].tolist() == [7, 9]
    assert batch.model_inputs().keys() == {"input_ids", "attention_mask"}


def test_labels_mask_prompt_and_padding():
    labels = PaddedCollator(PAD)(ITEMS).extras["labels"]
    assert labels.tolist() == [
        [-100, -100, -100, 21, 22],
        [-100, 23, 24, 25, 26],
        [-100, -100, -100, 31, -100],
        [-100, 32, 33, -100, -100],
    ]


def test_score_indices_point_at_the_position_before_each_response_token():
    """Row 2 (T = 5) holds [11 12 13 31 pad]: token 31 at column 3 is predicted by column 2 -> flat 2*5+2 = 12."""
    batch = PaddedCollator(PAD)(ITEMS)
    width = batch.input_ids.shape[1]
    assert batch.score_index.tolist() == [2, 3, 5, 6, 7, 8, 12, 15, 16]
    assert batch.score_seq.tolist() == [0, 0, 1, 1, 1, 1, 2, 3, 3]
    assert torch.equal(batch.input_ids.view(-1)[batch.score_index + 1], batch.score_target)
    assert torch.equal(batch.score_index // width, batch.score_seq)
    assert batch.response_lengths.tolist() == [[2, 1], [4, 2]]
    assert batch.response_mask.all()


def test_shorter_rankings_get_masked_sequences_without_scored_tokens():
    items = [
        {"example_id": 0, "prompt_ids": [11], "response_ids": [[21], [22], [23]]},
        {"example_id": 1, "prompt_ids": [12, 13], "response_ids": [[24], [25]]},
    ]
    batch = PaddedCollator(PAD)(items)
    assert batch.num_responses == 3 and batch.input_ids.shape[0] == 6
    assert batch.response_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.response_lengths.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert 5 not in batch.score_seq.tolist()  # s = 2*2+1: example 1 has no third response
    assert batch.input_ids[5].tolist() == [12, 13, PAD]  # the prompt alone


def test_pad_to_multiple_and_layout_by_name():
    batch = make_collator("padded", PAD, pad_to_multiple_of=8)(ITEMS)
    assert batch.input_ids.shape == (4, 8) and batch.attention_mask[:, 5:].sum() == 0


def test_logprobs_through_the_batch_equal_unpadded_per_sequence_logprobs():
    """sum_t log softmax(h[score_index]) [score_target] per sequence == the same sum computed on each
    prompt + response alone (no padding): right padding and the index math change nothing."""
    model = tiny_llama(vocab_size=64)
    batch = PaddedCollator(PAD)(ITEMS)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
        flat = logits.reshape(-1, logits.shape[-1]).log_softmax(-1)
        token_logps = flat[batch.score_index, batch.score_target]
        batched = torch.zeros(batch.num_sequences).index_add_(0, batch.score_seq, token_logps)
        for s, (b, k) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
            prompt, response = ITEMS[b]["prompt_ids"], ITEMS[b]["response_ids"][k]
            ids = torch.tensor([prompt + response])
            alone = model(input_ids=ids).logits[0].log_softmax(-1)
            expected = sum(alone[len(prompt) - 1 + t, tok] for t, tok in enumerate(response))
            torch.testing.assert_close(batched[s], expected, atol=1e-5, rtol=1e-5)


def test_length_grouped_batches_cover_every_index_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 125
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert lengths[batches[0]].max() == lengths.max()  # the longest batch first surfaces OOM at step one

    def padding(batch_list):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batch_list)

    random_batches = np.array_split(rng.permutation(1000), 125)
    assert padding(batches) < 0.2 * padding(random_batches)


def test_sampler_order_is_seeded_and_changes_per_epoch():
    lengths = list(range(100))
    a, b = LengthGroupedSampler(lengths, 4, seed=3), LengthGroupedSampler(lengths, 4, seed=3)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0


def test_sampler_deals_equal_batch_counts_to_ranks():
    lengths = list(range(50))
    ranks = [list(LengthGroupedSampler(lengths, 4, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert (
        [len(r) for r in ranks] == [5, 5, 5] == [len(LengthGroupedSampler(lengths, 4, num_replicas=3, rank=r)) for r in range(3)]
    )
    seen = {i for r in ranks for batch in r for i in batch}
    assert seen == set(range(50))
