"""A round's selection of prompts is seeded and walks every prompt once per pass (reading them: tests/data/test_prompts.py)."""

from __future__ import annotations

from dpokit.online.prompts import round_prompt_indices


def test_rounds_walk_every_prompt_once_per_pass_and_are_seeded():
    first_pass = [i for r in range(3) for i in round_prompt_indices(9, 3, seed=0, round_index=r)]
    assert sorted(first_pass) == list(range(9))
    assert round_prompt_indices(9, 3, seed=0, round_index=4) == round_prompt_indices(9, 3, seed=0, round_index=4)
    assert [round_prompt_indices(9, 9, seed=s, round_index=0) for s in (0, 1)][0] != round_prompt_indices(
        9, 9, seed=1, round_index=0
    )
