"""Judges built on a scalar reward: ``reward:MODULE:FUNCTION``, ``reward_model:PATH`` and ``implicit:POLICY``.

Pointwise, the judge is the reward r(x, y). Pairwise it is the Bradley-Terry model on two rewards,

    P(A > B) = sigmoid((r(x, A) - r(x, B)) / temperature),

with ``temperature`` an option (default 1; smaller is more decisive). Equal rewards give exactly 0.5, a
tie, which the statistics report separately. The raw judgment records both rewards.

* ``reward:MODULE:FUNCTION`` -- any callable ``f(prompts=[...], completions=[...]) -> [float]``, e.g.
  ``dpokit.experiments.reward:vader_reward`` (the signature ``dpokit frontier`` and TRL use).
* ``reward_model:PATH`` -- a sequence-classification model loaded by
  :func:`dpokit.models.load_sequence_classifier` through :func:`dpokit.scoring.load_reward`
  (single-label head: its logit; otherwise p(positive)).
* ``implicit:POLICY`` -- r = beta * (log pi(y|x) - log pi_ref(y|x)), computed by ``dpokit score``'s
  code (:func:`dpokit.scoring.score_rows`) with the reference chosen as ``dpokit score`` chooses
  it (options ``reference=PATH``, ``reference_free=true``, ``beta=``). At temperature 1 the pairwise
  probability is exactly the preference probability DPO was trained to model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dpokit.judges.base import Judge, JudgeSpec, PairJudgment, Text, bradley_terry, check_lengths, text_of

RewardBatch = Callable[[Sequence[Text], Sequence[Text]], Sequence[float]]


class RewardJudge(Judge):
    """A judge from a batch reward function ``reward_fn(prompts, responses) -> list[float]``."""

    def __init__(self, spec: str, reward_fn: RewardBatch, temperature: float = 1.0) -> None:
        from dpokit.errors import ConfigError

        if not temperature > 0:
            raise ConfigError(f"judge {spec}: temperature must be > 0, got {temperature}")
        self.spec = spec
        self.reward_fn = reward_fn
        self.temperature = temperature
        self.description = spec

    @property
    def identity(self) -> str:
        return f"{self.spec}|T={self.temperature!r}"

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        check_lengths(prompts, responses)
        if not prompts:
            return []
        scores = [float(s) for s in self.reward_fn(prompts, responses)]
        if len(scores) != len(prompts):
            from dpokit.errors import ConfigError

            raise ConfigError(f"judge {self.spec}: the reward returned {len(scores)} scores for {len(prompts)} responses")
        return scores

    def judge_pairs(self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text]) -> list[PairJudgment]:
        check_lengths(prompts, a, b)
        scores = self.score([*prompts, *prompts], [*a, *b])
        n = len(prompts)
        return [
            PairJudgment(bradley_terry(sa, sb, self.temperature), f"reward A={sa!r} B={sb!r}")
            for sa, sb in zip(scores[:n], scores[n:], strict=True)
        ]


class ImplicitJudge(RewardJudge):
    """Pairs are scored as the pairs they are (one row, both responses, as ``dpokit score`` does); a pair
    of identical responses is a tie without a forward pass."""

    pair_rewards: Callable[[Sequence[Text], Sequence[Text], Sequence[Text]], list[tuple[float, float]]]

    def judge_pairs(self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text]) -> list[PairJudgment]:
        check_lengths(prompts, a, b)
        distinct = [i for i in range(len(prompts)) if a[i] != b[i]]
        scored = self.pair_rewards(*([seq[i] for i in distinct] for seq in (prompts, a, b))) if distinct else []
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

    def reward(prompts: Sequence[Text], responses: Sequence[Text]) -> Sequence[float]:
        return function(prompts=[text_of(p) for p in prompts], completions=[text_of(r) for r in responses])

    return RewardJudge(str(spec), reward, spec.option("temperature", 1.0, float))


def reward_model_judge(spec: JudgeSpec, device: str | None = None) -> RewardJudge:
    """``reward_model:PATH``: a sequence-classification model directory."""
    from pathlib import Path

    from dpokit.errors import ConfigError
    from dpokit.scoring import load_reward

    spec.check_options(["temperature", "device"])
    if not Path(spec.target).is_dir():
        raise ConfigError(f"judge {spec}: {spec.target} is not a model directory")
    function = load_reward(spec.target, device=spec.option("device", device))

    def reward(prompts: Sequence[Text], responses: Sequence[Text]) -> Sequence[float]:
        return function(prompts=[text_of(p) for p in prompts], completions=[text_of(r) for r in responses])

    return RewardJudge(str(spec), reward, spec.option("temperature", 1.0, float))


def implicit_judge(spec: JudgeSpec, load: Any = None) -> RewardJudge:
    """``implicit:POLICY``: the DPO policy's implicit reward, as ``dpokit score`` computes it."""
    from dpokit.models import LoadOptions, load_policy
    from dpokit.scoring import ScoreRow, policy_runner, resolve_reference, score_rows, training_defaults, unify_row

    spec.check_options(["reference", "reference_free", "beta", "temperature", "batch_size"])
    load = load or LoadOptions()
    options = {"dtype": load.dtype, "device": load.device, "trust_remote_code": load.trust_remote_code}
    policy = load_policy(spec.target, **options)
    beta = spec.option("beta", None, float)
    beta = float(beta if beta is not None else training_defaults(policy).loss.beta)
    runner = policy_runner(policy)
    reference, described = resolve_reference(
        policy, runner, spec.option("reference", None), reference_free=spec.option("reference_free", False, bool), **options
    )
    batch_size = spec.option("batch_size", 8, int)

    def reward(prompts: Sequence[Text], responses: Sequence[Text]) -> Sequence[float]:
        rows = [ScoreRow(*unify_row(p, [r]), "judge") for p, r in zip(prompts, responses, strict=True)]
        scored = score_rows(runner, policy.tokenizer, reference, rows, beta=beta, batch_size=batch_size)
        return [row.rewards[0] for row in scored]

    judge = ImplicitJudge(str(spec), reward, spec.option("temperature", 1.0, float))
    judge.description = f"implicit reward of {spec.target} (beta={beta:g}, {described})"

    def pair_rewards(prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text]) -> list[tuple[float, float]]:
        rows = [ScoreRow(*unify_row(p, [x, y]), "judge") for p, x, y in zip(prompts, a, b, strict=True)]
        scored = score_rows(runner, policy.tokenizer, reference, rows, beta=beta, batch_size=batch_size)
        return [(row.rewards[0], row.rewards[1]) for row in scored]

    judge.pair_rewards = pair_rewards
    return judge
