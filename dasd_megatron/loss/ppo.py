"""PPO clipped surrogate with clip-higher, and truncated importance sampling against the rollout engine.

Per token (A_t detached, logp_t with gradient, old_logp_t = the trainer's log-prob under the policy that generated
the batch, rollout_logp_t = the rollout engine's log-prob of the same token):

    ratio_t = exp(logp_t - old_logp_t)
    pg_t    = -min(ratio_t A_t, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_t)
    w_t     = min(exp(old_logp_t - rollout_logp_t), cap)          (detached; 1 when is_cap is None or no rollout_logp)
    loss_t  = w_t * pg_t

The importance weight corrects the training-inference mismatch: tokens were sampled by the rollout engine, whose
distribution differs slightly from the trainer's (kernels, precision); truncation at `cap` bounds its variance.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["ppo_clip_token_loss", "truncated_is_weight"]


def ppo_clip_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (pg_t, ratio_t detached, clipped-low mask, clipped-high mask); a mask marks tokens where the clipped
    branch is the active minimum (its gradient is 0)."""
    A = advantage.detach()
    ratio = torch.exp(logp - old_logp.detach())
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = -torch.minimum(ratio * A, clipped * A)
    r = ratio.detach()
    clip_low = (A < 0) & (r < 1.0 - eps_low)
    clip_high = (A > 0) & (r > 1.0 + eps_high)
    return pg, r, clip_low, clip_high


def truncated_is_weight(
    old_logp: torch.Tensor, rollout_logp: Optional[torch.Tensor], cap: Optional[float]
) -> torch.Tensor:
    """w_t = min(exp(old_logp - rollout_logp), cap), detached; ones when cap is None or rollout_logp is None."""
    if cap is None or rollout_logp is None:
        return torch.ones_like(old_logp).detach()
    return torch.clamp(torch.exp(old_logp.detach() - rollout_logp.detach()), max=cap)
