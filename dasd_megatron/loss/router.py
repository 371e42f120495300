"""The DASD router: the normalised gap dbar_t and the direction weight omega_t (all detached).

    dbar_t  = clip(delta_t / s_r, -c_max, c_max)                               s_r: gap scale of t's rollout
    omega_t = m_t * g_t, with the map m_t by `cfg.router_mode`:
        'tanh'     : tanh((tau_r - H_t) / sigma_H_r)       (paper)
        'hard'     : sign(tau_r - H_t)                     (ablation: hard threshold)
        'constant' : cfg.router_constant                   (0: GRPO, +1: conformity/OPSD, -1: novelty)
    and the reliability gate g_t = sigmoid(|dbar_t| - 1) when `cfg.router_gate` (else 1): `reliability_gate`.

omega > 0 pulls the token toward the teacher (low entropy), omega < 0 pushes it away (high entropy).
"""

from __future__ import annotations

import torch

from .config import DASDLossConfig

__all__ = ["normalized_gap", "reliability_gate", "router_omega"]


def normalized_gap(delta: torch.Tensor, gap_scale: torch.Tensor, c_max: float) -> torch.Tensor:
    """dbar = clip(delta / s, -c_max, c_max), detached. `gap_scale` is per token (already gathered by rollout)."""
    return torch.clamp(delta.detach() / gap_scale, -c_max, c_max)


def reliability_gate(dbar: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """g_t = sigmoid(|dbar_t| - 1) when `enabled` (`cfg.router_gate`), else ones like dbar.

    The gate trusts the direction of a token with a large normalised teacher-student gap (|dbar| >> 1: g -> 1) and
    damps it where the gap is within its rollout's typical scale (dbar = 0: g = sigmoid(-1) ~ 0.27)."""
    if not enabled:
        return torch.ones_like(dbar)
    return torch.sigmoid(dbar.abs() - 1.0)


def router_omega(
    entropy: torch.Tensor, dbar: torch.Tensor, tau: torch.Tensor, sigma_h: torch.Tensor, cfg: DASDLossConfig
) -> torch.Tensor:
    """omega_t (detached) from per-token entropy and dbar and per-token (rollout-gathered) tau and sigma_H."""
    H = entropy.detach()
    if cfg.router_mode == "tanh":
        omega = torch.tanh((tau - H) / sigma_h)
    elif cfg.router_mode == "hard":
        omega = torch.sign(tau - H)
    else:
        omega = torch.full_like(H, cfg.router_constant)
    if cfg.router_gate:
        omega = omega * reliability_gate(dbar)
    return omega
