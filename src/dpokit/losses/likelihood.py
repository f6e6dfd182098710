"""Likelihood terms: SFT (Preferred-FT) on the chosen response and unlikelihood on the
rejected response tokens. Notation: :mod:`dpokit.losses`."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sft_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Negative log-likelihood of the chosen responses, averaged over the batch's chosen *tokens*:

        loss_b = -pi_w(b) / mean_b'(|y_w(b')|),   so   mean_b(loss_b) = -sum_b pi_w(b) / sum_b |y_w(b)|,

    the per-token NLL of the batch (TRL's normalisation). Each example carries its own share of that
    mean, so per-example values add up to the batch value instead of repeating it.
    """
    mean_length = chosen_lengths.to(policy_chosen_logps.dtype).mean().clamp(min=1.0)
    return -policy_chosen_logps / mean_length


def log1mexp(logp: Tensor) -> Tensor:
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
    log_one_minus_p = log1mexp(rejected_token_logps.clamp(max=max_logp))
    per_example = torch.zeros(batch_size, dtype=log_one_minus_p.dtype, device=log_one_minus_p.device)
    per_example = per_example.index_add(0, rejected_token_example, -log_one_minus_p)
    mean_rejected_tokens = max(rejected_token_logps.shape[0] / batch_size, 1.0)
    return likelihood + alpha * per_example.to(likelihood.dtype) / mean_rejected_tokens
