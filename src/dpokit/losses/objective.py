"""The objective: a weighted sum of registered losses, called on a batch's log-probs.

:data:`LOSSES` maps each name to its function, its parameters (read from the function's keyword-only
signature, so there is one source of truth), their valid ranges and the implicit reward it compares.
:func:`build_objective` turns config terms such as
``[{"name": "sigmoid", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2}, {"name": "sft"}]`` into an
:class:`Objective` that a trainer calls on :class:`LossInputs`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dpokit.errors import ConfigError, DataError
from dpokit.losses.likelihood import sft_loss, unlikelihood_loss
from dpokit.losses.listwise import plackett_luce_loss
from dpokit.losses.pairwise import (
    CPO_VARIANTS,
    F_DIVERGENCES,
    alphapo_loss,
    alphapo_rewards,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    cpo_loss,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    orpo_loss,
    per_token_average,
    robust_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
)
from dpokit.losses.unpaired import apo_zero_unpaired_loss, kto_loss


@dataclass
class LossInputs:
    """What a batch's forward passes produced, in the ranked layout (response 0 is the best).

    ``policy_logps`` (B, K) summed response log-probs under the policy; ``reference_logps`` (B, K)
    under the reference, or None when the objective does not need it; ``lengths`` (B, K) scored
    tokens per response; ``response_mask`` (B, K) bool, False for slots of rankings shorter than
    K; ``policy_token_logps`` (M,) per-token policy log-probs and ``token_seq`` (M,) their sequence
    index s = k * B + b -- needed only by token-level terms such as ``unlikelihood``.

    Unpaired data (K = 1, one completion per example) adds ``labels`` (B,) bool, True = desirable,
    and, for objectives with a KL reference point (``kto``), ``kl`` -- a scalar: the mean of
    policy - reference log-probs over the batch's mismatched prompt/completion pairs (all processes),
    computed without gradient and not yet clamped at zero.
    """

    policy_logps: Tensor
    reference_logps: Tensor | None
    lengths: Tensor
    response_mask: Tensor
    policy_token_logps: Tensor | None = None
    token_seq: Tensor | None = None
    labels: Tensor | None = None
    kl: Tensor | None = None


@dataclass
class ObjectiveOutput:
    """``loss``: scalar, the mean of ``per_example`` (B,); ``metrics``: name -> (B,) tensor, detached,
    per example so a trainer can average over batches and processes.
    """

    loss: Tensor
    per_example: Tensor
    metrics: dict[str, Tensor]


@dataclass
class _View:
    """Derived quantities a loss adapter may use; built once per call."""

    inputs: LossInputs
    policy: Tensor  # (B, K)
    reference: Tensor  # (B, K), zeros when reference-free
    logratios: Tensor  # (B, K)
    beta: float

    @property
    def chosen_logratios(self) -> Tensor:
        return self.logratios[:, 0]

    @property
    def rejected_logratios(self) -> Tensor:
        return self.logratios[:, 1]

    @property
    def lengths(self) -> Tensor:
        return self.inputs.lengths


def _rejected_tokens(view: _View) -> tuple[Tensor, Tensor]:
    inputs = view.inputs
    if inputs.policy_token_logps is None or inputs.token_seq is None:
        raise ConfigError(
            "the 'unlikelihood' loss needs per-token log-probs: pass policy_token_logps and token_seq in LossInputs"
        )
    batch_size = view.policy.shape[0]
    rank = torch.div(inputs.token_seq, batch_size, rounding_mode="floor")
    is_rejected = rank >= 1
    return inputs.policy_token_logps[is_rejected], inputs.token_seq[is_rejected] % batch_size


def _labels(view: _View) -> Tensor:
    if view.inputs.labels is None:
        raise DataError("unpaired losses need a desirable/undesirable label per example (LossInputs.labels)")
    return view.inputs.labels


def _kl(view: _View) -> Tensor:
    if view.inputs.kl is None:
        raise ConfigError("the 'kto' loss needs the KL reference point (LossInputs.kl) from mismatched prompt/completion pairs")
    return view.inputs.kl


def _own_pair_with_lengths(fn: Callable[..., Tensor]) -> Callable[[_View, dict[str, Any]], Tensor]:
    """Reference-free pairwise losses: the policy's own log-probs and the response lengths."""
    return lambda v, p: fn(v.policy[:, 0], v.policy[:, 1], v.lengths[:, 0], v.lengths[:, 1], beta=v.beta, **p)


def _pair(fn: Callable[..., Tensor]) -> Callable[[_View, dict[str, Any]], Tensor]:
    return lambda v, p: fn(v.chosen_logratios, v.rejected_logratios, beta=v.beta, **p)


def _pair_with_lengths(fn: Callable[..., Tensor]) -> Callable[[_View, dict[str, Any]], Tensor]:
    return lambda v, p: fn(v.chosen_logratios, v.rejected_logratios, v.lengths[:, 0], v.lengths[:, 1], beta=v.beta, **p)


def _in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            return f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        return None

    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


DPO_REWARD_FORMULA = "beta * (log pi - log pi_ref), summed over the response"


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """One registered loss.

    ``function`` is the pure loss; its keyword-only parameters other than ``beta`` are the
    parameters a config may set (with their defaults). ``apply`` feeds it from a :class:`_View`.
    ``kind``: "pairwise" (needs K = 2), "listwise" (any K), "sequence"/"token" (likelihood terms) or
    "unpaired" (K = 1 with a desirable/undesirable label). ``needs_kl``: the loss takes KTO's KL
    reference point, estimated from mismatched prompt/completion pairs (an extra no-grad forward).
    ``reward``: the implicit reward the loss compares, (B, K) per response, for the ``rewards/*``
    metrics; None means DPO's ``beta * (policy - reference)`` summed log-ratios. ``reward_formula``
    says it in words for the run's objective line.
    """

    name: str
    function: Callable[..., Tensor]
    apply: Callable[[_View, dict[str, Any]], Tensor]
    kind: str
    needs_reference: bool
    formula: str
    checks: dict[str, Callable[[Any], str | None]] = field(default_factory=dict)
    needs_kl: bool = False
    reward: Callable[[_View, dict[str, Any]], Tensor] | None = None
    reward_formula: str = DPO_REWARD_FORMULA

    @property
    def params(self) -> dict[str, Any]:
        """Settable parameters and their defaults."""
        return {
            name: p.default
            for name, p in inspect.signature(self.function).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "beta"
        }


_SMOOTHING = _in_range(0.0, 0.5, high_open=True)


def _average_logp_reward(v: _View, p: dict[str, Any]) -> Tensor:
    """ORPO's reward (TRL's ``rewards/*``): beta * the per-token average log-prob, pi / |y|."""
    return v.beta * per_token_average(v.policy, v.lengths)


def _simpo_reward(v: _View, p: dict[str, Any]) -> Tensor:
    """SimPO / AlphaPO: beta * R(pi / |y|), R the identity or AlphaPO's shape for alpha != 0."""
    return v.beta * alphapo_rewards(per_token_average(v.policy, v.lengths), p.get("alpha", 0.0))


def _cpo_reward(v: _View, p: dict[str, Any]) -> Tensor:
    """CPO: beta * R(pi) on summed log-probs (sigmoid, hinge) or per-token averages (ipo), as its loss compares."""
    logps = per_token_average(v.policy, v.lengths) if p.get("variant") == "ipo" else v.policy
    return v.beta * alphapo_rewards(logps, p.get("alpha", 0.0))


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in [
        LossSpec(
            name="sigmoid",
            function=sigmoid_loss,
            apply=_pair(sigmoid_loss),
            kind="pairwise",
            needs_reference=True,
            formula="-(1-eps) log sig(beta h) - eps log sig(-beta h)",
            checks={"label_smoothing": _SMOOTHING, "f_divergence": _one_of(*F_DIVERGENCES), "f_alpha": _positive},
        ),
        LossSpec(
            name="robust",
            function=robust_loss,
            apply=_pair(robust_loss),
            kind="pairwise",
            needs_reference=True,
            formula="[-(1-eps) log sig(beta h) + eps log sig(-beta h)] / (1-2 eps)",
            checks={"label_smoothing": _SMOOTHING},
        ),
        LossSpec(
            name="ipo",
            function=ipo_loss,
            apply=_pair_with_lengths(ipo_loss),
            kind="pairwise",
            needs_reference=True,
            formula="(h - 1/(2 beta))^2, log-ratios / length by default",
            checks={},
        ),
        LossSpec(
            name="hinge",
            function=hinge_loss,
            apply=_pair(hinge_loss),
            kind="pairwise",
            needs_reference=True,
            formula="max(0, 1 - beta h)",
        ),
        LossSpec(
            name="exo_pair",
            function=exo_pair_loss,
            apply=_pair(exo_pair_loss),
            kind="pairwise",
            needs_reference=True,
            formula="KL((sig(beta h), sig(-beta h)) || (1-eps, eps))",
            checks={"label_smoothing": _in_range(0.0, 1.0, low_open=True, high_open=True)},
        ),
        LossSpec(
            name="nca_pair",
            function=nca_pair_loss,
            apply=_pair(nca_pair_loss),
            kind="pairwise",
            needs_reference=True,
            formula="-log sig(r_w) - 0.5 log sig(-r_w) - 0.5 log sig(-r_l)",
        ),
        LossSpec(
            name="bco_pair",
            function=bco_pair_loss,
            apply=_pair(bco_pair_loss),
            kind="pairwise",
            needs_reference=True,
            formula="-log sig(r_w) - log sig(-r_l)",
        ),
        LossSpec(
            name="sppo_hard",
            function=sppo_hard_loss,
            apply=_pair(sppo_hard_loss),
            kind="pairwise",
            needs_reference=True,
            formula="(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2",
        ),
        LossSpec(
            name="apo_zero",
            function=apo_zero_loss,
            apply=_pair(apo_zero_loss),
            kind="pairwise",
            needs_reference=True,
            formula="1 - sig(r_w) + sig(r_l)",
        ),
        LossSpec(
            name="apo_down",
            function=apo_down_loss,
            apply=_pair(apo_down_loss),
            kind="pairwise",
            needs_reference=True,
            formula="sig(r_w) + 1 - sig(r_w - r_l)",
        ),
        LossSpec(
            name="discopop",
            function=discopop_loss,
            apply=_pair(discopop_loss),
            kind="pairwise",
            needs_reference=True,
            formula="(1-m) (-log sig(beta h)) + m exp(-beta h), m = sig(beta h / tau)",
            checks={"tau": _positive},
        ),
        LossSpec(
            name="aot",
            function=aot_loss,
            apply=lambda v, p: aot_loss(v.policy[:, 0], v.policy[:, 1], v.reference[:, 0], v.reference[:, 1], beta=v.beta, **p),
            kind="pairwise",
            needs_reference=True,
            formula="cDPO(sort(pi_w - pi_l) - sort(ref_w - ref_l))",
            checks={"label_smoothing": _SMOOTHING},
        ),
        LossSpec(
            name="aot_unpaired",
            function=aot_unpaired_loss,
            apply=_pair(aot_unpaired_loss),
            kind="pairwise",
            needs_reference=True,
            formula="cDPO(sort(rho_w) - sort(rho_l))",
            checks={"label_smoothing": _SMOOTHING},
        ),
        LossSpec(
            name="sigmoid_norm",
            function=sigmoid_norm_loss,
            apply=_pair_with_lengths(sigmoid_norm_loss),
            kind="pairwise",
            needs_reference=True,
            formula="-log sig(beta (rho_w/|y_w| - rho_l/|y_l|))",
        ),
        LossSpec(
            name="plackett_luce",
            function=plackett_luce_loss,
            apply=lambda v, p: plackett_luce_loss(v.logratios, v.inputs.response_mask, beta=v.beta, **p),
            kind="listwise",
            needs_reference=True,
            formula="-sum_k [r_k - log sum_{j>=k} exp r_j]",
        ),
        LossSpec(
            name="sft",
            function=sft_loss,
            apply=lambda v, p: sft_loss(v.policy[:, 0], v.lengths[:, 0], **p),
            kind="sequence",
            needs_reference=False,
            formula="-pi_w / mean |y_w| (token-mean NLL of chosen)",
        ),
        LossSpec(
            name="unlikelihood",
            function=unlikelihood_loss,
            apply=lambda v, p: unlikelihood_loss(v.policy[:, 0], v.lengths[:, 0], *_rejected_tokens(v), **p),
            kind="token",
            needs_reference=False,
            formula="NLL(chosen) - alpha sum_{rejected tokens} log(1 - p)",
            checks={"alpha": _non_negative},
        ),
        LossSpec(
            name="orpo",
            function=orpo_loss,
            apply=_own_pair_with_lengths(orpo_loss),
            kind="pairwise",
            needs_reference=False,
            formula="nll_weight NLL(chosen) - beta log sig(log odds(p_w) - log odds(p_l)), p = exp(pi/|y|)",
            checks={"nll_weight": _non_negative},
            reward=_average_logp_reward,
            reward_formula="beta * log pi / |y| (per-token average, no reference)",
        ),
        LossSpec(
            name="cpo",
            function=cpo_loss,
            apply=_own_pair_with_lengths(cpo_loss),
            kind="pairwise",
            needs_reference=False,
            formula="sigmoid/hinge on pi_w - pi_l (ipo: per-token averages), no reference, + bc_weight NLL(chosen)",
            checks={"variant": _one_of(*CPO_VARIANTS), "label_smoothing": _SMOOTHING, "bc_weight": _non_negative},
            reward=_cpo_reward,
            reward_formula="beta * log pi (summed; per-token average for variant ipo), no reference",
        ),
        LossSpec(
            name="simpo",
            function=simpo_loss,
            apply=_own_pair_with_lengths(simpo_loss),
            kind="pairwise",
            needs_reference=False,
            formula="-log sig(beta (pi_w/|y_w| - pi_l/|y_l|) - gamma), no reference",
            checks={"label_smoothing": _SMOOTHING, "gamma": _non_negative, "bc_weight": _non_negative},
            reward=_simpo_reward,
            reward_formula="beta * log pi / |y| (per-token average, no reference)",
        ),
        LossSpec(
            name="alphapo",
            function=alphapo_loss,
            apply=_own_pair_with_lengths(alphapo_loss),
            kind="pairwise",
            needs_reference=False,
            formula="simpo on r = (1 - p^-alpha)/alpha of per-token average p, no reference",
            checks={"label_smoothing": _SMOOTHING, "gamma": _non_negative, "bc_weight": _non_negative},
            reward=_simpo_reward,
            reward_formula="beta * (1 - p^-alpha) / alpha, p = exp(log pi / |y|), no reference",
        ),
        LossSpec(
            name="kto",
            function=kto_loss,
            apply=lambda v, p: kto_loss(v.logratios[:, 0], _labels(v), _kl(v), beta=v.beta, **p),
            kind="unpaired",
            needs_reference=True,
            formula="w_D (1 - sig(beta (rho - z0))) | w_U (1 - sig(beta (z0 - rho))), z0 = max(0, KL)",
            checks={"desirable_weight": _non_negative, "undesirable_weight": _non_negative},
            needs_kl=True,
        ),
        LossSpec(
            name="apo_zero_unpaired",
            function=apo_zero_unpaired_loss,
            apply=lambda v, p: apo_zero_unpaired_loss(v.logratios[:, 0], _labels(v), beta=v.beta, **p),
            kind="unpaired",
            needs_reference=True,
            formula="w_D (1 - sig(r)) | w_U sig(r)",
            checks={"desirable_weight": _non_negative, "undesirable_weight": _non_negative},
        ),
    ]
}


def available_losses() -> list[str]:
    """Names accepted by :func:`build_objective`, in registry order."""
    return list(LOSSES)


def _validate_value(spec: LossSpec, name: str, value: Any) -> None:
    default = spec.params[name]
    where = f"loss {spec.name!r}, parameter {name!r}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    check = spec.checks.get(name)
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{where} {problem}, got {value!r}")


@dataclass(frozen=True)
class _Term:
    spec: LossSpec
    weight: float
    params: dict[str, Any]


class Objective:
    """A weighted sum of registered losses; call it on :class:`LossInputs`.

    ``per_example = sum_t weight_t * loss_t`` (B,), ``loss = mean(per_example)``. The ``rewards/*``
    metrics (chosen, rejected, margins, accuracies) use the implicit reward of the first preference
    term (not a likelihood term such as sft): ``beta * (policy - reference)`` summed log-ratios for
    DPO and its reference-based relatives, the length-averaged log-prob for SimPO and ORPO, as each
    loss compares them (and as TRL's trainers log them).
    """

    def __init__(self, terms: list[_Term], *, beta: float, reference_free: bool = False) -> None:
        self.terms = terms
        self.beta = beta
        self.reference_free = reference_free
        preference = [t for t in terms if t.spec.kind in ("pairwise", "listwise", "unpaired")]
        self.reward_term: _Term | None = preference[0] if preference else None

    @property
    def reward_formula(self) -> str:
        """The implicit reward behind ``rewards/*``, in words."""
        return DPO_REWARD_FORMULA if self.reward_term is None else self.reward_term.spec.reward_formula

    def rewards(self, view: _View) -> Tensor:
        """(B, K) implicit rewards of every response, detached: the reward term's own, else DPO's."""
        term = self.reward_term
        with torch.no_grad():
            if term is None or term.spec.reward is None:
                return view.beta * view.logratios.detach()
            return term.spec.reward(view, term.params).detach()

    @property
    def needs_reference(self) -> bool:
        """Whether reference log-probs must be computed: False in reference-free mode or when every
        term is a likelihood term (sft, unlikelihood)."""
        return not self.reference_free and any(t.spec.needs_reference for t in self.terms)

    @property
    def unpaired(self) -> bool:
        """Whether the objective trains on unpaired examples (one completion and a desirable/undesirable
        label each); :func:`build_objective` does not mix them with paired terms."""
        return any(t.spec.kind == "unpaired" for t in self.terms)

    @property
    def needs_kl(self) -> bool:
        """Whether LossInputs.kl must be estimated: an extra no-grad forward of the policy and the
        reference over mismatched prompt/completion pairs of the batch (KTO's reference point)."""
        return any(t.spec.needs_kl for t in self.terms)

    def __repr__(self) -> str:
        parts = [f"{t.weight:g}*{t.spec.name}({', '.join(f'{k}={v!r}' for k, v in t.params.items())})" for t in self.terms]
        reference = "used" if self.needs_reference else "not used"
        return f"Objective({' + '.join(parts)}, beta={self.beta:g}; reference: {reference}; rewards: {self.reward_formula})"

    def __call__(self, inputs: LossInputs) -> ObjectiveOutput:
        policy = inputs.policy_logps
        if policy.dim() != 2:
            raise ValueError(f"policy_logps must be (B, K), got shape {tuple(policy.shape)}")
        if not policy.is_floating_point() or policy.dtype in (torch.float16, torch.bfloat16):
            policy = policy.float()  # the losses' exp/log need more than half precision
        if self.needs_reference:
            if inputs.reference_logps is None:
                raise ConfigError(
                    "this objective needs reference log-probs (reference_logps is None); compute them or set reference_free: true"
                )
            reference = inputs.reference_logps.to(policy.dtype)
        elif inputs.reference_logps is not None and not self.reference_free:
            reference = inputs.reference_logps.to(policy.dtype)
        else:
            reference = torch.zeros_like(policy)
        mask = inputs.response_mask.to(torch.bool)
        num_responses = policy.shape[1]
        if self.unpaired:
            return self._unpaired(inputs, policy, reference, mask)
        pairwise = [t.spec.name for t in self.terms if t.spec.kind == "pairwise"]
        if pairwise and num_responses != 2:
            raise ConfigError(
                f"loss {', '.join(pairwise)} compares exactly two responses but the batch has rankings of "
                f"{num_responses}; use the listwise 'plackett_luce' loss, or expand rankings to pairs when reading "
                "the data (ranked_mode: all_pairs, best_vs_rest or best_vs_worst)"
            )
        if num_responses < 2 or not bool(mask[:, :2].all()):
            raise DataError("every example needs at least a chosen and a rejected response (response_mask[:, :2])")

        view = _View(inputs=inputs, policy=policy, reference=reference, logratios=policy - reference, beta=self.beta)
        per_example = torch.zeros(policy.shape[0], dtype=policy.dtype, device=policy.device)
        metrics: dict[str, Tensor] = {}
        for term in self.terms:
            term_loss = term.spec.apply(view, term.params)
            metrics[f"loss/{term.spec.name}"] = term_loss.detach()
            per_example = per_example + term.weight * term_loss

        metrics.update(_reward_metrics(view, self.rewards(view), mask))
        return ObjectiveOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)

    def _unpaired(self, inputs: LossInputs, policy: Tensor, reference: Tensor, mask: Tensor) -> ObjectiveOutput:
        if policy.shape[1] != 1 or not bool(mask.all()):
            raise DataError(
                f"unpaired losses take one completion per example, got {policy.shape[1]}; "
                "read paired data as unpaired (chosen -> desirable, rejected -> undesirable)"
            )
        view = _View(inputs=inputs, policy=policy, reference=reference, logratios=policy - reference, beta=self.beta)
        per_example = torch.zeros(policy.shape[0], dtype=policy.dtype, device=policy.device)
        metrics: dict[str, Tensor] = {}
        for term in self.terms:
            term_loss = term.spec.apply(view, term.params)
            metrics[f"loss/{term.spec.name}"] = term_loss.detach()
            per_example = per_example + term.weight * term_loss
        metrics.update(_unpaired_metrics(view, _labels(view)))
        return ObjectiveOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)


def _unpaired_metrics(view: _View, labels: Tensor) -> dict[str, Tensor]:
    """Per-example metrics for unpaired data. A desirable-only metric is NaN on undesirable examples
    (and the other way round); NaN entries are left out of the (sum, count) averages, so
    ``rewards/desirable`` averages over the desirable examples only (TRL's ``rewards/chosen``).
    ``kl`` is the batch's KL estimate before the clamp, repeated per example."""
    with torch.no_grad():
        rewards = view.beta * view.logratios.detach()[:, 0]
        policy = view.policy.detach()[:, 0]
        desirable = labels.to(torch.bool).to(rewards.device)
        nan = torch.full_like(rewards, math.nan)
        metrics = {
            "rewards/desirable": torch.where(desirable, rewards, nan),
            "rewards/undesirable": torch.where(desirable, nan, rewards),
            "logps/desirable": torch.where(desirable, policy, nan),
            "logps/undesirable": torch.where(desirable, nan, policy),
            "desirable": desirable.to(rewards.dtype),
        }
        if view.inputs.kl is not None:
            metrics["kl"] = view.inputs.kl.detach().to(rewards.dtype).expand_as(rewards).clone()
        return metrics


def _reward_metrics(view: _View, rewards: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """From ``rewards`` (B, K), the objective's implicit reward per response: chosen = response 0;
    rejected = the worst (last present) response, so for pairs they are simply chosen and rejected.
    Accuracy is the fraction of correctly ordered pairs of responses, a tie counting half (for K = 2: 1 if r_w > r_l,
    0.5 if r_w = r_l).
    preference_prob = sigma(margin), the implicit reward model's probability that chosen beats rejected (Bradley-Terry)."""
    with torch.no_grad():
        batch_index = torch.arange(rewards.shape[0], device=rewards.device)
        worst = mask.long().sum(dim=1) - 1
        chosen_rewards, rejected_rewards = rewards[:, 0], rewards[batch_index, worst]
        margins = chosen_rewards - rejected_rewards
        num_responses = rewards.shape[1]
        upper = torch.triu(torch.ones(num_responses, num_responses, dtype=torch.bool, device=rewards.device), diagonal=1)
        pair_valid = upper.unsqueeze(0) & mask.unsqueeze(2) & mask.unsqueeze(1)  # (B, i, j), i better than j
        # A tie is half right, as in a win rate (TRL counts r_w > r_l only): at step 0, with the policy its own
        # reference, every reward is 0 and the accuracy is 0.5 -- chance -- rather than 0.
        ahead, tied = rewards.unsqueeze(2) > rewards.unsqueeze(1), rewards.unsqueeze(2) == rewards.unsqueeze(1)
        correct = (ahead.to(rewards.dtype) + 0.5 * tied.to(rewards.dtype)) * pair_valid
        accuracies = correct.sum(dim=(1, 2)) / pair_valid.sum(dim=(1, 2)).clamp(min=1).to(rewards.dtype)
        policy = view.policy.detach()
        return {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": accuracies,
            "rewards/margins": margins,
            "logps/chosen": policy[:, 0],
            "logps/rejected": policy[batch_index, worst],
            "preference_prob": torch.sigmoid(margins),
        }


def build_objective(terms: list[dict[str, Any]], *, beta: float, reference_free: bool = False) -> Objective:
    """Build an :class:`Objective` from config terms.

    Each term is ``{"name": <registered loss>, "weight": float (default 1), **that loss's params}``.
    Raises :class:`ConfigError` for an unknown name (listing the valid ones), a parameter the loss
    does not take (listing the ones it does), or a value out of range.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ConfigError(f"loss beta must be a positive number, got {beta!r}")
    if not terms:
        raise ConfigError(f"the objective needs at least one loss term; available: {', '.join(available_losses())}")
    built: list[_Term] = []
    for position, raw in enumerate(terms):
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"loss term {position} must be a mapping with a 'name' key, got {raw!r}")
        params = dict(raw)
        name = params.pop("name")
        spec = LOSSES.get(name)
        if spec is None:
            raise ConfigError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"loss {name!r}: weight must be a finite number, got {weight!r}")
        if weight < 0:
            raise ConfigError(
                f"loss {name!r}: weight must be >= 0, got {weight!r} (a negative weight would train away from the "
                "preferred responses; use a loss that does what you want instead)"
            )
        valid = spec.params
        unknown = sorted(set(params) - set(valid))
        if unknown:
            takes = ", ".join(f"{k} (default {v!r})" for k, v in valid.items()) or "no parameters"
            raise ConfigError(f"loss {name!r} does not take {', '.join(unknown)}; it takes: {takes}, plus weight")
        for key, value in params.items():
            _validate_value(spec, key, value)
        built.append(_Term(spec=spec, weight=float(weight), params={**valid, **params}))
    if not any(t.weight > 0 for t in built):
        raise ConfigError("every loss term has weight 0, so training would not change the model; give a term a positive weight")
    unpaired = [t.spec.name for t in built if t.spec.kind == "unpaired"]
    if unpaired and len(unpaired) != len(built):
        others = [t.spec.name for t in built if t.spec.kind != "unpaired"]
        raise ConfigError(
            f"loss {', '.join(unpaired)} trains on unpaired examples and cannot be combined with {', '.join(others)}, "
            "which need pairs or rankings"
        )
    return Objective(built, beta=float(beta), reference_free=reference_free)
