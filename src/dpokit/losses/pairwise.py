"""Pairwise preference losses: DPO and its relatives on the log-ratios of a chosen and a rejected
response, and the reference-free ones (ORPO, CPO, SimPO, AlphaPO) on the policy's own log-probs.
Notation: :mod:`dpokit.losses`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.errors import ConfigError
from dpokit.losses.likelihood import log1mexp, sft_loss

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


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


def conservative_logistic(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
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
    return conservative_logistic(policy_gaps - reference_gaps, beta, label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """AOT unpaired: chosen log-ratios should dominate rejected ones as distributions,

    d = sort_b(rho_w) - sort_b(rho_l),   loss_i = cDPO(d_i).   (entries are order statistics)
    """
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    return conservative_logistic(chosen_sorted - rejected_sorted, beta, label_smoothing)


def sigmoid_norm_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *, beta: float
) -> Tensor:
    """Length-normalised DPO: loss = -log sigma(beta * (rho_w/|y_w| - rho_l/|y_l|))."""
    chosen = chosen_logratios / chosen_lengths.clamp(min=1).to(chosen_logratios.dtype)
    rejected = rejected_logratios / rejected_lengths.clamp(min=1).to(rejected_logratios.dtype)
    return -F.logsigmoid(beta * (chosen - rejected))


# A per-token average log-prob of exactly 0 (probability 1) would make ORPO's log(1 - p) -inf; it is
# capped just below 0, which changes nothing for any average a model really produces.
MAX_AVERAGE_LOGP = -1e-9


def per_token_average(logps: Tensor, lengths: Tensor) -> Tensor:
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
    chosen = per_token_average(policy_chosen_logps, chosen_lengths).clamp(max=MAX_AVERAGE_LOGP)
    rejected = per_token_average(policy_rejected_logps, rejected_lengths).clamp(max=MAX_AVERAGE_LOGP)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
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
        chosen, rejected = per_token_average(chosen, chosen_lengths), per_token_average(rejected, rejected_lengths)
    margin = alphapo_rewards(chosen, alpha) - alphapo_rewards(rejected, alpha)
    if variant == "sigmoid":
        loss = conservative_logistic(margin, beta, label_smoothing)
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
    chosen = alphapo_rewards(per_token_average(policy_chosen_logps, chosen_lengths), alpha)
    rejected = alphapo_rewards(per_token_average(policy_rejected_logps, rejected_lengths), alpha)
    loss = conservative_logistic(chosen - rejected - gamma / beta, beta, label_smoothing)
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
