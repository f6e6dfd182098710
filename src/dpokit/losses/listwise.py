"""The listwise Plackett-Luce loss over K ranked responses (the DPO paper, appendix A.3)."""

from __future__ import annotations

import torch
from torch import Tensor


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
