"""GRPO group-relative advantages, one per rollout.

    A_G(i) = (r_i - mean_{j in g(i)} r_j) / (std_{j in g(i)} r_j + eps)      (std_normalize=True)
    A_G(i) =  r_i - mean_{j in g(i)} r_j                                      (std_normalize=False)

`std` is the sample standard deviation (Bessel's correction, as torch.std, verl and TRL use); a group of one
rollout has std 0 (and advantage 0). The result is broadcast to a rollout's tokens by `rollout_index` in the loss.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["grpo_advantages"]


def grpo_advantages(
    rewards: torch.Tensor,
    group_index: Optional[torch.Tensor] = None,
    *,
    group_size: Optional[int] = None,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages `[N]` from rewards `[N]`; groups given by `group_index` `[N]` (ids in [0, G)) or `group_size`
    (consecutive blocks of `group_size` rollouts, one block per prompt)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got {tuple(rewards.shape)}")
    N = rewards.shape[0]
    if (group_index is None) == (group_size is None):
        raise ValueError("give exactly one of group_index or group_size")
    if group_index is None:
        if group_size <= 0 or N % group_size:
            raise ValueError(f"group_size={group_size} must be > 0 and divide the number of rollouts {N}")
        group_index = torch.arange(N, device=rewards.device) // group_size
    if group_index.shape != rewards.shape:
        raise ValueError(f"group_index {tuple(group_index.shape)} must match rewards {tuple(rewards.shape)}")
    r = rewards.detach().double()
    if N == 0:
        return rewards.new_zeros(0)
    G = int(group_index.max()) + 1
    cnt = torch.bincount(group_index, minlength=G).double()
    mean = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, group_index, r) / cnt.clamp(min=1)
    adv = r - mean[group_index]
    if std_normalize:
        ss = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, group_index, adv * adv)
        std = torch.sqrt(ss / (cnt - 1).clamp(min=1))
        adv = adv / (std[group_index] + eps)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)
