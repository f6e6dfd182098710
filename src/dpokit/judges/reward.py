"""Judges built on a scalar reward: ``reward:MODULE:FUNCTION``, ``reward_model:PATH`` and ``implicit:POLICY``.

Pointwise, the judge is the reward r(x, y). Pairwise it is the Bradley-Terry model on two rewards,

    P(A > B) = sigmoid((r(x, A) - r(x, B)) / temperature),

with ``temperature`` an option (default 1; smaller is more decisive). Equal rewards give exactly 0.5, a
tie, which the statistics report separately. The raw judgment records both rewards.

* ``reward:MODULE:FUNCTION`` -- any callable ``f(prompts=[...], completions=[...]) -> [float]``, e.g.
  ``dpokit.experiments.reward:vader_reward`` (the signature ``dpokit frontier`` and TRL use). A function
  with an ``images`` parameter (named so; ``**kwargs`` does not count) also judges prompts with images: it
  gets ``images=[[encoded image files] per prompt]`` (e.g. ``dpokit.experiments.shapes:colour_reward``).
* ``reward_model:PATH`` -- a sequence-classification model loaded by
  :func:`dpokit.models.load_sequence_classifier` through :func:`dpokit.scoring.load_reward`
  (single-label head: its logit; otherwise p(positive)).
* ``implicit:POLICY`` -- r = beta * (log pi(y|x) - log pi_ref(y|x)), computed by ``dpokit score``'s
  code (:func:`dpokit.scoring.score_rows`) with the reference chosen as ``dpokit score`` chooses
  it (options ``reference=PATH``, ``reference_free=true``, ``beta=``). At temperature 1 the pairwise
  probability is exactly the preference probability DPO was trained to model. A vision-language policy
  reads the prompts' images as ``dpokit score`` does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from dpokit.judges.base import Images, Judge, JudgeSpec, PairJudgment, Text, bradley_terry, check_lengths, text_of

RewardBatch = Callable[[Sequence[Text], Sequence[Text], Images | None], Sequence[float]]


class RewardJudge(Judge):
    """A judge from a batch reward function ``reward_fn(prompts, responses, images) -> list[float]``
    (``images``: per prompt its images, or None); ``sees_images``: whether the function reads them."""

    def __init__(self, spec: str, reward_fn: RewardBatch, temperature: float = 1.0, *, sees_images: bool = False) -> None:
        from dpokit.errors import ConfigError

        if not temperature > 0:
            raise ConfigError(f"judge {spec}: temperature must be > 0, got {temperature}")
        self.spec = spec
        self.reward_fn = reward_fn
        self.temperature = temperature
        self.description = spec
        self.sees_images = sees_images

    @property
    def identity(self) -> str:
        return f"{self.spec}|T={self.temperature!r}"

    def score(self, prompts: Sequence[Text], responses: Sequence[Text], images: Images | None = None) -> list[float]:
        check_lengths(prompts, responses)
        self.check_images(prompts, images)
        if not prompts:
            return []
        scores = [float(s) for s in self.reward_fn(prompts, responses, images if images and any(images) else None)]
        if len(scores) != len(prompts):
            from dpokit.errors import ConfigError

            raise ConfigError(f"judge {self.spec}: the reward returned {len(scores)} scores for {len(prompts)} responses")
        return scores

    def judge_pairs(
        self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text], images: Images | None = None
    ) -> list[PairJudgment]:
        check_lengths(prompts, a, b)
        scores = self.score([*prompts, *prompts], [*a, *b], None if images is None else [*images, *images])
        n = len(prompts)
        return [
            PairJudgment(bradley_terry(sa, sb, self.temperature), f"reward A={sa!r} B={sb!r}")
            for sa, sb in zip(scores[:n], scores[n:], strict=True)
        ]


class ImplicitJudge(RewardJudge):
    """Pairs are scored as the pairs they are (one row, both responses, as ``dpokit score`` does); a pair
    of identical responses is a tie without a forward pass."""

    pair_rewards: Callable[[Sequence[Text], Sequence[Text], Sequence[Text], Images | None], list[tuple[float, float]]]

    def judge_pairs(
        self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text], images: Images | None = None
    ) -> list[PairJudgment]:
        check_lengths(prompts, a, b)
        self.check_images(prompts, images)
        distinct = [i for i in range(len(prompts)) if a[i] != b[i]]
        given = None if images is None or not any(images) else [images[i] for i in distinct]
        picked = [[seq[i] for i in distinct] for seq in (prompts, a, b)]
        scored = self.pair_rewards(picked[0], picked[1], picked[2], given) if distinct else []
        rewards = dict(zip(distinct, scored, strict=True))
        judgments = []
        for i in range(len(prompts)):
            ra, rb = rewards.get(i, (0.0, 0.0))
            judgments.append(PairJudgment(bradley_terry(ra, rb, self.temperature), f"reward A={ra!r} B={rb!r}"))
        return judgments


def function_judge(spec: JudgeSpec) -> RewardJudge:
    """``reward:MODULE:FUNCTION``: the callable gets plain text (chat messages flattened)."""
    from dpokit.errors import ConfigError
    from dpokit.scoring import load_reward

    spec.check_options(["temperature"])
    if spec.target.count(":") < 1:
        raise ConfigError(f"judge {spec}: expected reward:MODULE:FUNCTION (e.g. reward:dpokit.experiments.reward:vader_reward)")
    function = load_reward(spec.target)
    sees_images = takes_images(function)

    def reward(prompts: Sequence[Text], responses: Sequence[Text], images: Images | None) -> Sequence[float]:
        texts = {"prompts": [text_of(p) for p in prompts], "completions": [text_of(r) for r in responses]}
        return function(**texts, images=images) if sees_images else function(**texts)

    return RewardJudge(str(spec), reward, spec.option("temperature", 1.0, float), sees_images=sees_images)


def takes_images(function: Callable[..., Any]) -> bool:
    """Whether a reward function names an ``images`` parameter (``**kwargs`` alone does not count: a
    function that would ignore the images must not be handed prompts that need them)."""
    try:
        return "images" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def reward_model_judge(spec: JudgeSpec, device: str | None = None) -> RewardJudge:
    """``reward_model:PATH``: a sequence-classification model directory."""
    from pathlib import Path

    from dpokit.errors import ConfigError
    from dpokit.scoring import load_reward

    spec.check_options(["temperature", "device"])
    if not Path(spec.target).is_dir():
        raise ConfigError(f"judge {spec}: {spec.target} is not a model directory")
    function = load_reward(spec.target, device=spec.option("device", device))

    def reward(prompts: Sequence[Text], responses: Sequence[Text], images: Images | None) -> Sequence[float]:
        return function(prompts=[text_of(p) for p in prompts], completions=[text_of(r) for r in responses])

    return RewardJudge(str(spec), reward, spec.option("temperature", 1.0, float))


def implicit_judge(spec: JudgeSpec, load: Any = None) -> RewardJudge:
    """``implicit:POLICY``: the DPO policy's implicit reward, as ``dpokit score`` computes it."""
    from dpokit.models import LoadOptions, load_policy
    from dpokit.scoring import ScoreRow, policy_runner, resolve_reference, score_rows, training_defaults, unify_row

    spec.check_options(["reference", "reference_free", "beta", "temperature", "batch_size"])
    load = load or LoadOptions()
    policy = load_policy(spec.target, load)
    beta = spec.option("beta", None, float)
    beta = float(beta if beta is not None else training_defaults(policy).loss.beta)
    runner = policy_runner(policy)
    reference, described = resolve_reference(
        policy, runner, spec.option("reference", None), reference_free=spec.option("reference_free", False, bool), load=load
    )
    batch_size = spec.option("batch_size", 8, int)

    def scored(prompts: Sequence[Text], responses: Sequence[list[Text]], images: Images | None) -> list[list[float]]:
        rows = [
            ScoreRow(*unify_row(p, list(r)), "judge", images=list(images[i]) if images else [])
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
        out = score_rows(runner, policy.tokenizer, reference, rows, beta=beta, batch_size=batch_size, processor=policy.processor)
        return [row.rewards for row in out]

    def reward(prompts: Sequence[Text], responses: Sequence[Text], images: Images | None) -> Sequence[float]:
        return [rewards[0] for rewards in scored(prompts, [[r] for r in responses], images)]

    judge = ImplicitJudge(str(spec), reward, spec.option("temperature", 1.0, float), sees_images=policy.processor is not None)
    judge.description = f"implicit reward of {spec.target} (beta={beta:g}, {described})"

    def pair_rewards(
        prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text], images: Images | None
    ) -> list[tuple[float, float]]:
        return [(r[0], r[1]) for r in scored(prompts, [[x, y] for x, y in zip(a, b, strict=True)], images)]

    judge.pair_rewards = pair_rewards
    return judge
