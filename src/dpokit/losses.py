"""Preference objectives: DPO and its relatives as pure functions of log-probabilities.

Nothing here sees a model. Every loss takes summed sequence log-probabilities (and, where it
needs them, response lengths or per-token log-probs) and returns one loss per example.

Notation used in the docstrings, for an example with responses ranked best first:

* ``pi_k``  = log pi_theta(y_k | x), the summed log-prob of response k under the policy;
* ``ref_k`` = log pi_ref(y_k | x) under the frozen reference (0 in ``reference_free`` mode);
* ``rho_k`` = pi_k - ref_k, the *log-ratio*; for a pair ``rho_w`` (chosen) and ``rho_l`` (rejected);
* ``r_k``   = beta * rho_k, the implicit reward (DPO paper, section 5);
* ``h``     = rho_w - rho_l, the log-ratio margin, so ``beta * h = r_w - r_l``.

Two layers:

1. Plain functions (:func:`sigmoid_loss`, :func:`ipo_loss`, ..., :func:`plackett_luce_loss`) that
   are the math and nothing else; read and test them alone.
2. One registry, :data:`LOSSES`, mapping each name to its function, its parameters (read from the
   function's keyword-only signature, so there is one source of truth) and their valid ranges.
   :func:`build_objective` turns config terms such as
   ``[{"name": "sigmoid", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2}, {"name": "sft"}]``
   into an :class:`Objective` that a trainer calls on :class:`LossInputs`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.errors import ConfigError, DataError

__all__ = [
    "LossInputs",
    "ObjectiveOutput",
    "Objective",
    "LossSpec",
    "LOSSES",
    "available_losses",
    "build_objective",
    "sigmoid_loss",
    "robust_loss",
    "ipo_loss",
    "hinge_loss",
    "exo_pair_loss",
    "nca_pair_loss",
    "bco_pair_loss",
    "sppo_hard_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "discopop_loss",
    "aot_loss",
    "aot_unpaired_loss",
    "sigmoid_norm_loss",
    "sft_loss",
    "unlikelihood_loss",
    "plackett_luce_loss",
    "orpo_loss",
    "cpo_loss",
    "simpo_loss",
    "alphapo_loss",
    "alphapo_rewards",
    "kto_loss",
    "apo_zero_unpaired_loss",
    "f_divergence_scores",
]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# --------------------------------------------------------------------------------------------
# Pure loss functions. Shapes: (B,) per-example tensors unless stated otherwise.
# --------------------------------------------------------------------------------------------


def f_divergence_scores(logratios: Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """f'(t) at t = pi/pi_ref = exp(rho): the score that replaces the log-ratio under an f-divergence
    regulariser (Wang et al., 2023, "Beyond Reverse KL").

    * ``reverse_kl``: f'(t) = log t + 1, i.e. ``rho`` (the constant cancels in a margin) -- plain DPO;
    * ``forward_kl``: f'(t) = 1 - 1/t = ``1 - exp(-rho)``;
    * ``js_divergence``: f'(t) = log(2t / (1 + t)) = ``log 2 + log sigma(rho)``;
    * ``alpha_divergence``: f'(t) = (t^(alpha-1) - 1)/(alpha-1) = ``(exp((alpha-1) rho) - 1)/(alpha-1)``,
      which tends to ``rho`` (reverse KL) as alpha -> 1.
    """
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1.0 - torch.exp(-logratios)
    if f_divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratios
        return torch.expm1((f_alpha - 1.0) * logratios) / (f_alpha - 1.0)
    raise ConfigError(f"unknown f_divergence {f_divergence!r}; valid: {', '.join(F_DIVERGENCES)}")


def sigmoid_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """DPO (Rafailov et al., eq. 7), conservative DPO when ``label_smoothing`` = eps > 0:

        loss = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h),   h = rho_w - rho_l

    eps is the probability that a preference label is flipped (the paper's reference code,
    ``label_smoothing``). With an ``f_divergence`` other than reverse KL, h is the difference of
    :func:`f_divergence_scores` instead of log-ratios.
    """
    margin = f_divergence_scores(chosen_logratios, f_divergence, f_alpha) - f_divergence_scores(
        rejected_logratios, f_divergence, f_alpha
    )
    logits = beta * margin
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def robust_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO (Chowdhury et al., 2024): an unbiased loss under label-flip rate eps < 1/2,

        loss = [-(1 - eps) * log sigma(beta h) + eps * log sigma(-beta h)] / (1 - 2 eps).

    Equal to :func:`sigmoid_loss` at eps = 0.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)


def ipo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    length_normalize: bool = True,
) -> Tensor:
    """IPO (Azar et al., 2023, eq. 17; beta plays the role of tau):

        loss = (h - 1 / (2 beta))^2

    With ``length_normalize`` (default) each log-ratio is divided by its response length first,
    h = rho_w / |y_w| - rho_l / |y_l| -- the form the IPO authors report results with (and TRL's).
    ``length_normalize=False`` uses summed log-ratios, as the DPO paper's reference code does; the
    target margin 1/(2 beta) then means very different things for short and long responses.
    """
    if length_normalize:
        chosen_logratios = chosen_logratios / chosen_lengths.clamp(min=1).to(chosen_logratios.dtype)
        rejected_logratios = rejected_logratios / rejected_lengths.clamp(min=1).to(rejected_logratios.dtype)
    return (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """SLiC hinge (Zhao et al., 2023) on the reward margin: loss = max(0, 1 - beta * h)."""
    return torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))


def exo_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 1e-3) -> Tensor:
    """EXO (Ji et al., 2024, eq. 16) for a pair: KL(q || p) between the policy's pair distribution
    q = softmax(r_w, r_l) = (sigma(beta h), sigma(-beta h)) and the smoothed label p = (1 - eps, eps):

        loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps).

    eps must be > 0 (log eps); the EXO paper uses 1e-3.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    q_w, log_q_w = torch.sigmoid(logits), F.logsigmoid(logits)
    q_l, log_q_l = torch.sigmoid(-logits), F.logsigmoid(-logits)
    return q_w * (log_q_w - math.log1p(-eps)) + q_l * (log_q_l - math.log(eps))


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """NCA (Chen et al., 2024) for a pair, on absolute rewards rather than their margin:

    loss = -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l).
    """
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def bco_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """BCO (Jung et al., 2024) on pairs: each response classified alone as good or bad,

        loss = -log sigma(r_w) - log sigma(-r_l).

    The BCO paper subtracts a running mean of rewards (delta) inside both sigmoids; like TRL 1.16,
    this pairwise form uses delta = 0, so the loss stays a pure function of the batch.
    """
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """SPPO (Wu et al., 2024, eq. 4.7) with hard win probabilities (1 for chosen, 0 for rejected):

    loss = (rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2.
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al., 2024, eq. 7): push chosen up and rejected down,

    loss = 1 - sigma(r_w) + sigma(r_l).
    """
    return 1.0 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-down (eq. 8): chosen answers are worse than the model's own, push both down, rejected more,

    loss = sigma(r_w) + 1 - sigma(r_w - r_l).
    """
    return torch.sigmoid(beta * chosen_logratios) + 1.0 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))


def discopop_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, tau: float = 0.05) -> Tensor:
    """DiscoPOP (Chris Lu et al., 2024, eq. 5): a log-ratio-modulated blend of the logistic and
    exponential losses; with z = beta * h and m = sigma(z / tau),

        loss = (1 - m) * (-log sigma(z)) + m * exp(-z).
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    modulation = torch.sigmoid(logits / tau)
    return (1.0 - modulation) * -F.logsigmoid(logits) + modulation * torch.exp(-logits)


def _conservative_logistic(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT paired (Melnyk et al., 2024): stochastic dominance of the policy's chosen-minus-rejected
    log-prob gap over the reference's, by optimal transport in 1-D -- sort both across the batch:

        d = sort_b(pi_w - pi_l) - sort_b(ref_w - ref_l),   loss_i = cDPO(d_i) with label smoothing eps.

    Entry i is the i-th order statistic, not example i: only the batch mean is per-example meaningful.
    """
    policy_gaps, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    reference_gaps, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
    return _conservative_logistic(policy_gaps - reference_gaps, beta, label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """AOT unpaired: chosen log-ratios should dominate rejected ones as distributions,

    d = sort_b(rho_w) - sort_b(rho_l),   loss_i = cDPO(d_i).   (entries are order statistics)
    """
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    return _conservative_logistic(chosen_sorted - rejected_sorted, beta, label_smoothing)


def sigmoid_norm_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *, beta: float
) -> Tensor:
    """Length-normalised DPO: loss = -log sigma(beta * (rho_w/|y_w| - rho_l/|y_l|))."""
    chosen = chosen_logratios / chosen_lengths.clamp(min=1).to(chosen_logratios.dtype)
    rejected = rejected_logratios / rejected_lengths.clamp(min=1).to(rejected_logratios.dtype)
    return -F.logsigmoid(beta * (chosen - rejected))


def sft_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Negative log-likelihood of the chosen responses, averaged over the batch's chosen *tokens*:

        loss_b = -pi_w(b) / mean_b'(|y_w(b')|),   so   mean_b(loss_b) = -sum_b pi_w(b) / sum_b |y_w(b)|,

    the per-token NLL of the batch (TRL's normalisation). Each example carries its own share of that
    mean, so per-example values add up to the batch value instead of repeating it.
    """
    mean_length = chosen_lengths.to(policy_chosen_logps.dtype).mean().clamp(min=1.0)
    return -policy_chosen_logps / mean_length


def _log1mexp(logp: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler, 2012)."""
    return torch.where(logp > -math.log(2.0), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


# 1 - p is floored at this value so a rejected token with p -> 1 costs at most -log(1e-5) = 11.5
# (as in Welleck et al.'s code) instead of an infinite loss and gradient.
UNLIKELIHOOD_MIN_ONE_MINUS_P = 1e-5


def unlikelihood_loss(
    policy_chosen_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_token_logps: Tensor,
    rejected_token_example: Tensor,
    *,
    alpha: float = 1.0,
) -> Tensor:
    """Unlikelihood training (Welleck et al., 2020), the DPO paper's baseline: maximise the
    likelihood of chosen tokens, minimise that of rejected tokens,

        loss_b = [-pi_w(b)] / mean |y_w|  +  alpha * [-sum_{t in rejected(b)} log(1 - p_t)] / mean |rejected(b)|

    with per-token p_t = exp(token log-prob) and both parts normalised by the batch's mean token
    counts (as :func:`sft_loss`). ``rejected_token_logps`` (R,) are the log-probs of every token of
    every lower-ranked response, ``rejected_token_example`` (R,) their example index in [0, B).
    log(1 - p) is computed as log1mexp with 1 - p floored at 1e-5.
    """
    batch_size = policy_chosen_logps.shape[0]
    likelihood = sft_loss(policy_chosen_logps, chosen_lengths)
    max_logp = math.log1p(-UNLIKELIHOOD_MIN_ONE_MINUS_P)
    log_one_minus_p = _log1mexp(rejected_token_logps.clamp(max=max_logp))
    per_example = torch.zeros(batch_size, dtype=log_one_minus_p.dtype, device=log_one_minus_p.device)
    per_example = per_example.index_add(0, rejected_token_example, -log_one_minus_p)
    mean_rejected_tokens = max(rejected_token_logps.shape[0] / batch_size, 1.0)
    return likelihood + alpha * per_example.to(likelihood.dtype) / mean_rejected_tokens


def plackett_luce_loss(logratios: Tensor, response_mask: Tensor, *, beta: float) -> Tensor:
    """Listwise DPO under the Plackett-Luce model (DPO paper, appendix A.3). For K responses ranked
    best first with rewards r_k = beta * rho_k:

        loss = -sum_{k=1..K_b} [ r_k - log sum_{j >= k} exp(r_j) ]

    ``logratios`` (B, K); ``response_mask`` (B, K) bool marks the K_b <= K responses an example
    really has (its ranking occupies the first K_b slots), so rankings of different lengths share a
    batch. The last term (k = K_b) is always 0. For K = 2 this is -log sigma(r_w - r_l), i.e. DPO.
    """
    rewards = beta * torch.where(response_mask, logratios, torch.zeros_like(logratios))
    num_responses = rewards.shape[1]
    position = torch.arange(num_responses, device=rewards.device)
    # include[b, k, j]: response j takes part in the softmax at step k (j >= k and present). The
    # diagonal is always included, so no row is all -inf (that would give NaN gradients through
    # logsumexp even for masked-out steps).
    later = position.view(1, -1) >= position.view(-1, 1)  # (k, j)
    include = (later.unsqueeze(0) & response_mask.unsqueeze(1)) | torch.eye(
        num_responses, dtype=torch.bool, device=rewards.device
    )
    candidates = rewards.unsqueeze(1).expand(-1, num_responses, -1).masked_fill(~include, float("-inf"))
    step_log_probs = rewards - torch.logsumexp(candidates, dim=-1)  # (B, K)
    return -(step_log_probs * response_mask.to(rewards.dtype)).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Reference-free pairwise objectives (ORPO, CPO, SimPO, AlphaPO) and unpaired ones (KTO).
# --------------------------------------------------------------------------------------------

# A per-token average log-prob of exactly 0 (probability 1) would make ORPO's log(1 - p) -inf; it is
# capped just below 0, which changes nothing for any average a model really produces.
_MAX_AVERAGE_LOGP = -1e-9


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    return logps / lengths.clamp(min=1).to(logps.dtype)


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    nll_weight: float = 1.0,
) -> Tensor:
    """ORPO (Hong et al., 2024, eqs. 6-7), reference-free; beta is the paper's lambda. With per-token
    average log-probs c = pi_w / |y_w| and r = pi_l / |y_l| (p = e^c is the geometric-mean token
    probability, odds(p) = p / (1 - p)):

        log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))
        loss_b   = nll_weight * sft_b - beta * log sigma(log_odds)

    with sft_b the chosen response's share of the batch token-mean NLL (:func:`sft_loss`).

    Worked example (one example, beta 1): |y_w| = 2, pi_w = 2 log 0.5 (c = log 0.5, odds 1) and
    |y_l| = 1, pi_l = log 0.25 (odds 1/3): log_odds = log 3, -log sigma(log 3) = -log 0.75 = 0.287682;
    the NLL is -pi_w / 2 = 0.693147, so the loss is 0.980829 (0.287682 with nll_weight 0).
    """
    chosen = _per_token(policy_chosen_logps, chosen_lengths).clamp(max=_MAX_AVERAGE_LOGP)
    rejected = _per_token(policy_rejected_logps, rejected_lengths).clamp(max=_MAX_AVERAGE_LOGP)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    odds_ratio_term = -beta * F.logsigmoid(log_odds)
    if nll_weight == 0:
        return odds_ratio_term
    return nll_weight * sft_loss(policy_chosen_logps, chosen_lengths) + odds_ratio_term


def alphapo_rewards(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward shape (Gupta et al., 2025): r = (1 - p^(-alpha)) / alpha with p = e^logps, i.e.
    ``-expm1(-alpha * logps) / alpha`` (finite where TRL's ``exp(logps) ** -alpha`` overflows); the
    log-prob itself at alpha = 0."""
    if alpha == 0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


CPO_VARIANTS = ("sigmoid", "hinge", "ipo")


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
    bc_weight: float = 1.0,
) -> Tensor:
    """CPO (Xu et al., 2024): a DPO-style loss on the policy's own log-probs (no reference) plus a
    behaviour-cloning NLL of the chosen response. With d = R(pi_w) - R(pi_l),

        sigmoid: -(1 - eps) log sigma(beta d) - eps log sigma(-beta d)    (summed log-probs)
        hinge:   max(0, 1 - beta d)                                       (summed log-probs)
        ipo:     (d - 1/(2 beta))^2                                       (per-token average log-probs)
        loss_b = that + bc_weight * sft_b

    R is the identity, or AlphaPO's :func:`alphapo_rewards` when ``alpha`` != 0. As in TRL 1.16,
    sigmoid/hinge use summed log-probs and ipo per-token averages; hinge and ipo ignore eps.

    Worked example (one example, beta 0.5, bc_weight 0): pi_w = -4, pi_l = -6: d = 2, the sigmoid loss
    is -log sigma(1) = 0.313262, the hinge loss max(0, 1 - 1) = 0.
    """
    if variant not in CPO_VARIANTS:
        raise ConfigError(f"unknown CPO variant {variant!r}; valid: {', '.join(CPO_VARIANTS)}")
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if variant == "ipo":
        chosen, rejected = _per_token(chosen, chosen_lengths), _per_token(rejected, rejected_lengths)
    margin = alphapo_rewards(chosen, alpha) - alphapo_rewards(rejected, alpha)
    if variant == "sigmoid":
        loss = _conservative_logistic(margin, beta, label_smoothing)
    elif variant == "hinge":
        loss = torch.relu(1.0 - beta * margin)
    else:
        loss = (margin - 1.0 / (2.0 * beta)) ** 2
    if bc_weight == 0:
        return loss
    return loss + bc_weight * sft_loss(policy_chosen_logps, chosen_lengths)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
    bc_weight: float = 0.0,
) -> Tensor:
    """SimPO (Meng et al., 2024, eq. 6), reference-free and length-normalised, with a target margin
    reward margin gamma (TRL's ``simpo_gamma``; in log-prob units the target is gamma / beta):

        d = R(pi_w / |y_w|) - R(pi_l / |y_l|) - gamma / beta
        loss_b = -(1 - eps) log sigma(beta d) - eps log sigma(-beta d) + bc_weight * sft_b

    R is the identity, or AlphaPO's reward shape when ``alpha`` != 0 (see :func:`alphapo_loss`).

    Worked example (one example, beta 2, gamma 1, bc_weight 0): pi_w = -2 over 4 tokens (-0.5 per
    token), pi_l = -3 over 2 (-1.5): d = 1 - 0.5 = 0.5, loss = -log sigma(1) = 0.313262.
    """
    chosen = alphapo_rewards(_per_token(policy_chosen_logps, chosen_lengths), alpha)
    rejected = alphapo_rewards(_per_token(policy_rejected_logps, rejected_lengths), alpha)
    loss = _conservative_logistic(chosen - rejected - gamma / beta, beta, label_smoothing)
    if bc_weight == 0:
        return loss
    return loss + bc_weight * sft_loss(policy_chosen_logps, chosen_lengths)


def alphapo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    alpha: float = 0.25,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    bc_weight: float = 0.0,
) -> Tensor:
    """AlphaPO (Gupta et al., 2025): SimPO with the reward r = (1 - p^(-alpha)) / alpha of the per-token
    average probability p instead of log p (alpha -> 0 gives SimPO). Unlike TRL 1.16's ``alphapo``
    (which leaves alpha at 0, i.e. plain SimPO, unless it is given), alpha defaults to 0.25 here.

    Worked example (beta 1, gamma 0, alpha 1, bc_weight 0): per-token averages log p_w = -log 2,
    log p_l = -log 4: r_w = 1 - 2 = -1, r_l = 1 - 4 = -3, loss = -log sigma(2) = 0.126928.
    """
    return simpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=beta,
        gamma=gamma,
        label_smoothing=label_smoothing,
        alpha=alpha,
        bc_weight=bc_weight,
    )


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al., 2024, eq. 8) on unpaired data: each example has one completion and a
    label, desirable (True) or undesirable (False). With the reference point z0 = max(0, kl), kl the
    batch-mean log-ratio of mismatched prompt/completion pairs (no gradient; averaged over processes
    before the clamp; not times beta):

        desirable:    desirable_weight   * (1 - sigma(beta (rho - z0)))
        undesirable:  undesirable_weight * (1 - sigma(beta (z0 - rho)))

    Worked example (beta 1, kl = -0.3 so z0 = 0): rho = log 3 desirable gives 1 - 3/4 = 0.25;
    rho = log 3 undesirable gives 1 - 1/4 = 0.75. With kl = log 3 both give 0.5.
    """
    z0 = kl.detach().to(logratios.dtype).clamp(min=0.0)
    desirable_loss = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_loss = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratios)))
    return torch.where(desirable.to(torch.bool), desirable_loss, undesirable_loss)


def apo_zero_unpaired_loss(
    logratios: Tensor, desirable: Tensor, *, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> Tensor:
    """APO-zero for unpaired data (D'Oosterlinck et al., 2024; TRL's KTO ``apo_zero_unpaired``): push
    desirable completions up and undesirable ones down, with no reference point:

        desirable: desirable_weight * (1 - sigma(beta rho)),   undesirable: undesirable_weight * sigma(beta rho)

    Worked example (beta 1): rho = log 3 gives 0.25 if desirable, 0.75 if undesirable (= KTO at z0 = 0).
    """
    rewards = torch.sigmoid(beta * logratios)
    return torch.where(desirable.to(torch.bool), desirable_weight * (1.0 - rewards), undesirable_weight * rewards)


# --------------------------------------------------------------------------------------------
# Inputs, outputs and the registry.
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
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
    return v.beta * _per_token(v.policy, v.lengths)


def _simpo_reward(v: _View, p: dict[str, Any]) -> Tensor:
    """SimPO / AlphaPO: beta * R(pi / |y|), R the identity or AlphaPO's shape for alpha != 0."""
    return v.beta * alphapo_rewards(_per_token(v.policy, v.lengths), p.get("alpha", 0.0))


def _cpo_reward(v: _View, p: dict[str, Any]) -> Tensor:
    """CPO: beta * R(pi) on summed log-probs (sigmoid, hinge) or per-token averages (ipo), as its loss compares."""
    logps = _per_token(v.policy, v.lengths) if p.get("variant") == "ipo" else v.policy
    return v.beta * alphapo_rewards(logps, p.get("alpha", 0.0))


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in [
        LossSpec(
            "sigmoid",
            sigmoid_loss,
            _pair(sigmoid_loss),
            "pairwise",
            True,
            "-(1-eps) log sig(beta h) - eps log sig(-beta h)",
            {"label_smoothing": _SMOOTHING, "f_divergence": _one_of(*F_DIVERGENCES), "f_alpha": _positive},
        ),
        LossSpec(
            "robust",
            robust_loss,
            _pair(robust_loss),
            "pairwise",
            True,
            "[-(1-eps) log sig(beta h) + eps log sig(-beta h)] / (1-2 eps)",
            {"label_smoothing": _SMOOTHING},
        ),
        LossSpec(
            "ipo",
            ipo_loss,
            _pair_with_lengths(ipo_loss),
            "pairwise",
            True,
            "(h - 1/(2 beta))^2, log-ratios / length by default",
            {},
        ),
        LossSpec("hinge", hinge_loss, _pair(hinge_loss), "pairwise", True, "max(0, 1 - beta h)"),
        LossSpec(
            "exo_pair",
            exo_pair_loss,
            _pair(exo_pair_loss),
            "pairwise",
            True,
            "KL((sig(beta h), sig(-beta h)) || (1-eps, eps))",
            {"label_smoothing": _in_range(0.0, 1.0, low_open=True, high_open=True)},
        ),
        LossSpec(
            "nca_pair",
            nca_pair_loss,
            _pair(nca_pair_loss),
            "pairwise",
            True,
            "-log sig(r_w) - 0.5 log sig(-r_w) - 0.5 log sig(-r_l)",
        ),
        LossSpec("bco_pair", bco_pair_loss, _pair(bco_pair_loss), "pairwise", True, "-log sig(r_w) - log sig(-r_l)"),
        LossSpec(
            "sppo_hard",
            sppo_hard_loss,
            _pair(sppo_hard_loss),
            "pairwise",
            True,
            "(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2",
        ),
        LossSpec("apo_zero", apo_zero_loss, _pair(apo_zero_loss), "pairwise", True, "1 - sig(r_w) + sig(r_l)"),
        LossSpec("apo_down", apo_down_loss, _pair(apo_down_loss), "pairwise", True, "sig(r_w) + 1 - sig(r_w - r_l)"),
        LossSpec(
            "discopop",
            discopop_loss,
            _pair(discopop_loss),
            "pairwise",
            True,
            "(1-m) (-log sig(beta h)) + m exp(-beta h), m = sig(beta h / tau)",
            {"tau": _positive},
        ),
        LossSpec(
            "aot",
            aot_loss,
            lambda v, p: aot_loss(v.policy[:, 0], v.policy[:, 1], v.reference[:, 0], v.reference[:, 1], beta=v.beta, **p),
            "pairwise",
            True,
            "cDPO(sort(pi_w - pi_l) - sort(ref_w - ref_l))",
            {"label_smoothing": _SMOOTHING},
        ),
        LossSpec(
            "aot_unpaired",
            aot_unpaired_loss,
            _pair(aot_unpaired_loss),
            "pairwise",
            True,
            "cDPO(sort(rho_w) - sort(rho_l))",
            {"label_smoothing": _SMOOTHING},
        ),
        LossSpec(
            "sigmoid_norm",
            sigmoid_norm_loss,
            _pair_with_lengths(sigmoid_norm_loss),
            "pairwise",
            True,
            "-log sig(beta (rho_w/|y_w| - rho_l/|y_l|))",
        ),
        LossSpec(
            "plackett_luce",
            plackett_luce_loss,
            lambda v, p: plackett_luce_loss(v.logratios, v.inputs.response_mask, beta=v.beta, **p),
            "listwise",
            True,
            "-sum_k [r_k - log sum_{j>=k} exp r_j]",
        ),
        LossSpec(
            "sft",
            sft_loss,
            lambda v, p: sft_loss(v.policy[:, 0], v.lengths[:, 0], **p),
            "sequence",
            False,
            "-pi_w / mean |y_w| (token-mean NLL of chosen)",
        ),
        LossSpec(
            "unlikelihood",
            unlikelihood_loss,
            lambda v, p: unlikelihood_loss(v.policy[:, 0], v.lengths[:, 0], *_rejected_tokens(v), **p),
            "token",
            False,
            "NLL(chosen) - alpha sum_{rejected tokens} log(1 - p)",
            {"alpha": _non_negative},
        ),
        LossSpec(
            "orpo",
            orpo_loss,
            _own_pair_with_lengths(orpo_loss),
            "pairwise",
            False,
            "nll_weight NLL(chosen) - beta log sig(log odds(p_w) - log odds(p_l)), p = exp(pi/|y|)",
            {"nll_weight": _non_negative},
            reward=_average_logp_reward,
            reward_formula="beta * log pi / |y| (per-token average, no reference)",
        ),
        LossSpec(
            "cpo",
            cpo_loss,
            _own_pair_with_lengths(cpo_loss),
            "pairwise",
            False,
            "sigmoid/hinge on pi_w - pi_l (ipo: per-token averages), no reference, + bc_weight NLL(chosen)",
            {"variant": _one_of(*CPO_VARIANTS), "label_smoothing": _SMOOTHING, "bc_weight": _non_negative},
            reward=_cpo_reward,
            reward_formula="beta * log pi (summed; per-token average for variant ipo), no reference",
        ),
        LossSpec(
            "simpo",
            simpo_loss,
            _own_pair_with_lengths(simpo_loss),
            "pairwise",
            False,
            "-log sig(beta (pi_w/|y_w| - pi_l/|y_l|) - gamma), no reference",
            {"label_smoothing": _SMOOTHING, "gamma": _non_negative, "bc_weight": _non_negative},
            reward=_simpo_reward,
            reward_formula="beta * log pi / |y| (per-token average, no reference)",
        ),
        LossSpec(
            "alphapo",
            alphapo_loss,
            _own_pair_with_lengths(alphapo_loss),
            "pairwise",
            False,
            "simpo on r = (1 - p^-alpha)/alpha of per-token average p, no reference",
            {"label_smoothing": _SMOOTHING, "gamma": _non_negative, "bc_weight": _non_negative},
            reward=_simpo_reward,
            reward_formula="beta * (1 - p^-alpha) / alpha, p = exp(log pi / |y|), no reference",
        ),
        LossSpec(
            "kto",
            kto_loss,
            lambda v, p: kto_loss(v.logratios[:, 0], _labels(v), _kl(v), beta=v.beta, **p),
            "unpaired",
            True,
            "w_D (1 - sig(beta (rho - z0))) | w_U (1 - sig(beta (z0 - rho))), z0 = max(0, KL)",
            {"desirable_weight": _non_negative, "undesirable_weight": _non_negative},
            needs_kl=True,
        ),
        LossSpec(
            "apo_zero_unpaired",
            apo_zero_unpaired_loss,
            lambda v, p: apo_zero_unpaired_loss(v.logratios[:, 0], _labels(v), beta=v.beta, **p),
            "unpaired",
            True,
            "w_D (1 - sig(r)) | w_U sig(r)",
            {"desirable_weight": _non_negative, "undesirable_weight": _non_negative},
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
