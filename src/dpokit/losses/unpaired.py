"""Unpaired objectives: one completion per example with a desirable/undesirable label (KTO,
APO-zero unpaired). Notation: :mod:`dpokit.losses`."""

from __future__ import annotations

import torch
from torch import Tensor


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
