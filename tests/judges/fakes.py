"""Reward functions and judges for the judge tests, importable as ``reward:tests.judges.fakes:NAME``."""

from __future__ import annotations

from dpokit.judges.base import Judge, PairJudgment


def length_reward(prompts, completions, **_):
    """The number of words of the completion: longer is better."""
    return [float(len(c.split())) for c in completions]


def constant_reward(prompts, completions, **_):
    return [1.0 for _ in completions]


def wrong_count_reward(prompts, completions, **_):
    return [1.0]


class AlwaysFirst(Judge):
    """A judge that always prefers response A, whatever it says."""

    spec = "test:always-first"

    def __init__(self):
        self.calls = 0

    def judge_pairs(self, prompts, a, b):
        self.calls += len(prompts)
        return [PairJudgment(1.0, "A") for _ in prompts]


class Oracle(Judge):
    """Prefers the longer response; records how many pairs it was asked."""

    spec = "test:oracle"

    def __init__(self):
        self.calls = 0

    def judge_pairs(self, prompts, a, b):
        self.calls += len(prompts)
        return [
            PairJudgment(1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5, "len") for x, y in zip(a, b, strict=True)
        ]

    def score(self, prompts, responses):
        self.calls += len(prompts)
        return [float(len(r)) for r in responses]


def pixel_length_reward(prompts, completions, images):
    """The mean pixel value of the prompt's first image times the completion's length plus one: a reward that
    changes with the image, so a judge handed the wrong image (or none) gives other numbers."""
    import numpy as np

    from dpokit.data.images import decode_image

    return [float(np.asarray(decode_image(group[0])).mean()) * (len(c) + 1) for c, group in zip(completions, images, strict=True)]
