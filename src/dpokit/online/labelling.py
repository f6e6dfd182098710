"""Who labels the online loop's completions: any judge (pointwise scores), or the policy itself.

* a judge spec (``reward:``, ``reward_model:``, ``implicit:``, ``llm:``, ``openai:``; see
  :mod:`dpokit.judges.base`) is loaded by :func:`dpokit.judges.load_judge` and asked its pointwise
  question, ``score(prompts, responses)``, once per round for all of the round's completions;
* ``self`` is the paper's self-labelling: the current policy's implicit reward
  ``r = beta * (log pi(y|x) - log pi_ref(y|x))`` against the run's own reference, from the log-probs the
  generation stage already computed (no second model, no extra forward pass).

The implicit reward is a sum over the completion's tokens, so the policy's own labels tend to prefer
longer completions. ``online.self_reward`` picks the form of the self-label (:func:`self_reward`), with
``|y|`` the number of tokens whose log-probs are summed (the completion's tokens and its stop token):

* ``implicit`` -- ``r = beta * log(pi / pi_ref)``, the paper's;
* ``length_regularized`` -- ``r = beta * log(pi / pi_ref) - alpha * |y|``, DICE's length-regularized reward
  shaping (alpha = ``online.length_penalty``, per token);
* ``length_normalized`` -- ``r = beta * log(pi / pi_ref) / |y|``, the per-token implicit reward (as
  SimPO's and ORPO's averaged log-probs).

The judge runs on rank 0 only (its scores are broadcast), so an endpoint sees each question once and a
retry happens in one place. A failing call is retried ``online.judge_retries`` times, ``judge_retry_wait_s``
seconds apart (doubling); then :class:`JudgeFailed` stops the run (with a checkpoint, see
:mod:`dpokit.online.rounds`).

An implicit reward whose policy and reference are the same weights is 0 for every completion: nothing to
learn. What can be known from the config is refused up front (:func:`check_labelling`); otherwise a round
whose implicit rewards are all 0 stops the run (:func:`check_rewards`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from dpokit.config import TrainConfig
from dpokit.errors import ConfigError, DpokitError, TrainingError

logger = logging.getLogger(__name__)

SELF = "self"
SELF_REWARDS = ("implicit", "length_regularized", "length_normalized")


class JudgeFailed(DpokitError):
    """The judge kept failing after every retry."""


class Labeller(Protocol):
    spec: str
    implicit: bool  # an implicit reward (all zeros mean the policy and reference are the same weights)

    def label(
        self, prompts: Sequence[Any], completions: Sequence[dict[str, Any]], images: Sequence[Sequence[bytes]] | None = None
    ) -> list[float]: ...


class JudgeLabeller:
    """A loaded judge's pointwise scores of the completion texts."""

    def __init__(self, judge: Any, spec: str, implicit: bool) -> None:
        self.judge, self.spec, self.implicit = judge, spec, implicit

    def label(
        self, prompts: Sequence[Any], completions: Sequence[dict[str, Any]], images: Sequence[Sequence[bytes]] | None = None
    ) -> list[float]:
        texts = [c["completion"] for c in completions]
        # Images only when there are some (per completion, its prompt's): a judge written for text takes two arguments.
        scores = self.judge.score(list(prompts), texts) if not images else self.judge.score(list(prompts), texts, images)
        return [float(s) for s in scores]


def self_reward(log_ratio: float, tokens: int, *, beta: float, form: str = "implicit", alpha: float = 0.0) -> float:
    """The self-label of a completion whose ``log pi(y|x) - log pi_ref(y|x)`` is ``log_ratio`` over
    ``tokens`` tokens, in the ``form`` the module docstring gives.

    A log-ratio of 6 over 20 tokens, beta 0.5: implicit 0.5 * 6 = 3; length-regularized with alpha 0.1,
    3 - 0.1 * 20 = 1; length-normalized 3 / 20 = 0.15::

        >>> [self_reward(6.0, 20, beta=0.5, form=f, alpha=0.1) for f in ("implicit", "length_regularized")]
        [3.0, 1.0]
        >>> self_reward(6.0, 20, beta=0.5, form="length_normalized")
        0.15
    """
    reward = beta * log_ratio
    if form == "implicit":
        return reward
    if form == "length_regularized":
        return reward - alpha * tokens
    if form == "length_normalized":
        return reward / max(1, tokens)
    raise ConfigError(f"online.self_reward must be one of {', '.join(SELF_REWARDS)}, not {form!r}")


def scored_tokens(completion: dict[str, Any]) -> int:
    """|y|: the tokens whose log-probs a completion's ``policy_logp`` sums (its tokens and its stop token)."""
    return int(completion["num_tokens"]) + int(bool(completion["stopped"]))


class SelfLabeller:
    """The policy's own implicit reward of each completion, as sampled, in the form ``online.self_reward``
    names (:func:`self_reward`)."""

    implicit = True

    def __init__(self, beta: float, form: str = "implicit", alpha: float = 0.0) -> None:
        self.beta, self.form, self.alpha = beta, form, alpha
        self.spec = SELF if form == "implicit" else f"{SELF} ({form}" + (f", alpha={alpha:g})" if alpha else ")")

        self.last_log_ratios: list[float] = []  # of the last call, for :func:`check_rewards`

    def label(
        self, prompts: Sequence[Any], completions: Sequence[dict[str, Any]], images: Sequence[Sequence[bytes]] | None = None
    ) -> list[float]:
        self.last_log_ratios = [c["policy_logp"] - c["reference_logp"] for c in completions]
        return [
            self_reward(ratio, scored_tokens(c), beta=self.beta, form=self.form, alpha=self.alpha)
            for ratio, c in zip(self.last_log_ratios, completions, strict=True)
        ]


def judge_name(cfg: TrainConfig) -> str:
    judge = cfg.online.judge
    return str(judge.get("spec")) if isinstance(judge, dict) else str(judge)


def check_labelling(cfg: TrainConfig, reference_strategy: str) -> None:
    """Refuse, before anything is loaded, a judge that cannot label (see the module docstring)."""
    from dpokit.judges import parse_judge_spec

    on = cfg.online
    if on.judge is None or on.judge == "":
        raise ConfigError("online.judge is required: a judge spec (e.g. reward:my_module:my_reward) or 'self'")
    if on.judge == SELF:
        if reference_strategy in ("none", "precomputed") or cfg.loss.reference_free:
            raise ConfigError("online.judge=self needs a reference model (reference.strategy copy or adapter_disabled)")
        if on.reference == "refresh":
            raise ConfigError(
                "online.judge=self with online.reference=refresh labels every round with a reference equal to the policy "
                "that sampled it: every implicit reward would be 0; use online.reference=fixed"
            )
        if not cfg.reference.name_or_path or _same_path(cfg.reference.name_or_path, cfg.model.name_or_path):
            raise ConfigError(
                "online.judge=self: the reference is the start model itself, so in round 0 every implicit reward "
                "beta * log(pi / pi_ref) is 0; start from a DPO policy and set reference.name_or_path to its reference "
                "(e.g. the SFT model), or label with a frozen copy: online.judge=implicit:POLICY,reference=SFT"
            )
        return
    spec = parse_judge_spec(on.judge)
    reference = spec.options.get("reference")
    if spec.kind == "implicit" and reference and _same_path(reference, spec.target):
        raise ConfigError(
            f"online.judge {spec}: the policy and the reference are the same model, so every implicit reward is 0; "
            "point reference= at the model the policy was trained from"
        )


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve() if Path(a).exists() else a == b


def load_labeller(cfg: TrainConfig, device: str) -> Labeller:
    """The labeller ``online.judge`` names (the judge's models on ``device``)."""
    if cfg.online.judge == SELF:
        return SelfLabeller(cfg.loss.beta, cfg.online.self_reward, cfg.online.length_penalty)
    from dpokit.judges import load_judge, parse_judge_spec
    from dpokit.models import LoadOptions

    spec = parse_judge_spec(cfg.online.judge)  # type: ignore[arg-type]  # not None: check_labelling ran
    judge = load_judge(
        spec, load=LoadOptions(device=device, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    )
    return JudgeLabeller(judge, str(spec), implicit=spec.kind == "implicit")


def label_with_retries(
    labeller: Labeller,
    prompts: Sequence[Any],
    completions: Sequence[dict[str, Any]],
    *,
    retries: int,
    wait_s: float,
    where: str,
    sleep: Callable[[float], None] = time.sleep,
    images: Sequence[Sequence[bytes]] | None = None,
) -> list[float]:
    """The labeller's scores, retried on failure; :class:`JudgeFailed` after the last retry. ``images``: per
    completion, its prompt's images (a vision-language task)."""
    for attempt in range(retries + 1):
        try:
            scores = labeller.label(prompts, completions, images) if images else labeller.label(prompts, completions)
        except ConfigError:
            raise  # a wrong key or spec does not heal by waiting
        except Exception as error:  # an endpoint down, a time-out, a crashing reward function
            if attempt == retries:
                raise JudgeFailed(
                    f"{where}: judge {labeller.spec} failed {retries + 1} time(s); last error: {type(error).__name__}: {error}"
                ) from error
            delay = wait_s * 2**attempt
            logger.warning(
                "%s: judge %s failed (%s); retry %d of %d in %.1f s", where, labeller.spec, error, attempt + 1, retries, delay
            )
            sleep(delay)
            continue
        if len(scores) != len(completions):
            raise TrainingError(
                f"{where}: judge {labeller.spec} returned {len(scores)} scores for {len(completions)} completions"
            )
        return scores
    raise AssertionError("unreachable")


def check_rewards(labeller: Labeller, scores: Sequence[float], where: str) -> None:
    """Stop when an implicit reward is 0 for every completion: its policy and reference are the same weights.
    For the policy's own labels the log-ratios are checked (a length term would hide the zeros)."""
    if isinstance(labeller, SelfLabeller):
        scores = labeller.last_log_ratios
    if labeller.implicit and scores and all(math.isfinite(s) and abs(s) < 1e-9 for s in scores):
        raise TrainingError(
            f"{where}: judge {labeller.spec} gave every completion an implicit reward of 0: its policy and its reference are "
            "the same weights, so it prefers nothing. Label with a policy trained away from its reference (online.judge="
            "implicit:POLICY,reference=SFT, or 'self' starting from a DPO policy with reference.name_or_path=SFT)"
        )
