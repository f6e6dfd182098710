"""Unlabelled prompts for the online loop: read once (:func:`dpokit.data.prompts.read_prompt_rows`, the
reader every sampling command uses), then a deterministic selection per round.

Round ``r`` takes positions ``r * P .. (r + 1) * P - 1`` of an endless stream over the N prompts:
pass ``q // N`` of the stream is a permutation of the prompts seeded by ``(seed, pass)``, so every
prompt is used once per pass and a round's prompts are a pure function of (seed, r, P, N).
"""

from __future__ import annotations

import torch


def round_prompt_indices(num_prompts: int, per_round: int, *, seed: int, round_index: int) -> list[int]:
    """Indices (into the prompt file) of round ``round_index``'s prompts: see the module docstring."""
    start = round_index * per_round
    indices, permutations = [], {}
    for position in range(start, start + per_round):
        epoch, offset = divmod(position, num_prompts)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            permutations[epoch] = torch.randperm(num_prompts, generator=generator).tolist()
        indices.append(permutations[epoch][offset])
    return indices
