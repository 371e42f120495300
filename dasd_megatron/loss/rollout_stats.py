"""Per-rollout statistics of the DASD router, computed once over whole rollouts (a detached pre-pass).

For each rollout r, over its valid response tokens t (METHOD.md, "The objective"):

    tau_r     = Quantile_q({H_t})                       q = 1 - rho ('upper') or rho ('lower'); linear interpolation
                                                        between order statistics (torch.quantile's 'linear')
    sigma_H_r = mean_t |H_t - mean_t H_t| + eps         (mean absolute deviation)
    s_r       = mean_t |delta_t| + eps                  ('mean_abs'), or sqrt(mean_t (delta_t - mean delta)^2) + eps
                                                        ('std', population std)

with `H_t` the student entropy and `delta_t = log pi_T(y_t) - log pi_S(y_t)`, both detached.

Why a pre-pass: these are statistics of the *whole* rollout, but a rollout's tokens may be split across
micro-batches (gradient accumulation) and across context-parallel ranks. Computing them inside each micro-batch
from the tokens at hand would give different (wrong) tau / sigma / s per piece. So the training step first computes
the detached per-token entropy and delta for the whole local batch (e.g. in the no-grad scoring pass that also
produces the old log-probs), calls `compute_rollout_stats` once with `group` set to the ranks that share rollouts
(the CP group; add DP if rollouts are split across DP ranks), and passes the resulting `RolloutStats` to `dasd_loss`
for every micro-batch. With `group`, every rank all-gathers the (rollout id, H, delta) triples of the group (one
all_gather of sizes, one all_gather of the padded data) and computes identical statistics for all rollouts.

Layout: per-token tensors are `[T]`; `rollout_index[t]` is the global id (in [0, num_rollouts)) of the rollout that
token t belongs to, or -1 for any token that is not a valid response token (prompt, padding, other). The returned
arrays are indexed by rollout id, so they can be looked up from any micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .config import DASDLossConfig
from .kernel_common import group_size

__all__ = ["RolloutStats", "compute_rollout_stats", "segment_quantile", "gather_tokens"]


@dataclass(frozen=True)
class RolloutStats:
    """Per-rollout router statistics, each `[num_rollouts]` float64 (num_tokens int64); see the module docstring."""

    tau: torch.Tensor
    sigma_h: torch.Tensor
    gap_scale: torch.Tensor
    num_tokens: torch.Tensor


def gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather `[k, n_rank]` tensors with per-rank n over `group` into `[k, sum n]` (rank order)."""
    world = group_size(group)
    if world == 1:
        return x
    n = torch.tensor([x.shape[1]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    n_max = max(sizes)
    padded = x.new_zeros(x.shape[0], n_max)
    padded[:, : x.shape[1]] = x
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b[:, :s] for b, s in zip(bufs, sizes)], dim=1)


def segment_quantile(values: torch.Tensor, segment: torch.Tensor, num_segments: int, q: float) -> torch.Tensor:
    """Quantile q of `values` within each segment id in [0, num_segments) (linear interpolation, as torch.quantile).

    Empty segments give 0. Vectorised: sort by value, then stably by segment, and interpolate between the order
    statistics at position q * (n - 1) of each segment.
    """
    out = values.new_zeros(num_segments)
    if values.numel() == 0 or num_segments == 0:
        return out
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(segment[order], stable=True)]
    v = values[order]
    counts = torch.bincount(segment, minlength=num_segments)
    offsets = torch.cumsum(counts, 0) - counts
    nonempty = counts > 0
    pos = q * (counts - 1).clamp(min=0).to(values.dtype)
    lo = torch.floor(pos).long()
    hi = torch.minimum(lo + 1, (counts - 1).clamp(min=0))
    frac = pos - lo.to(values.dtype)
    last = v.numel() - 1
    v_lo = v[(offsets + lo).clamp(max=last)]
    v_hi = v[(offsets + hi).clamp(max=last)]
    return torch.where(nonempty, v_lo + frac * (v_hi - v_lo), out)


def compute_rollout_stats(
    entropy: torch.Tensor,
    delta: torch.Tensor,
    rollout_index: torch.Tensor,
    num_rollouts: int,
    cfg: DASDLossConfig,
    group: Optional["dist.ProcessGroup"] = None,
) -> RolloutStats:
    """Per-rollout tau, sigma_H and gap scale from detached per-token entropy and delta (see module docstring).

    Args:
        entropy, delta: `[T]` per-token student entropy and teacher-student log-prob gap (detached here).
        rollout_index: `[T]` int64 rollout id of each token, -1 for tokens that are not valid response tokens.
        num_rollouts: number of rollout ids (the returned arrays' length).
        cfg: uses `rho`, `convention`, `eps`, `gap_scale`.
        group: ranks whose tokens together make up the rollouts (CP and/or DP); None when this call sees every
            token of every rollout (e.g. all micro-batches concatenated on one rank).
    """
    if not (entropy.shape == delta.shape == rollout_index.shape) or entropy.dim() != 1:
        raise ValueError(
            f"entropy {tuple(entropy.shape)}, delta {tuple(delta.shape)} and rollout_index "
            f"{tuple(rollout_index.shape)} must all be [T]"
        )
    valid = rollout_index >= 0
    if bool((rollout_index >= num_rollouts).any()):
        raise ValueError(f"rollout_index has ids >= num_rollouts={num_rollouts}")
    # float64: exact for rollout ids below 2**53, and the statistics are cheap.
    packed = torch.stack(
        [rollout_index[valid].double(), entropy.detach()[valid].double(), delta.detach()[valid].double()]
    )
    packed = gather_tokens(packed, group)
    seg, H, d = packed[0].long(), packed[1], packed[2]
    counts = torch.bincount(seg, minlength=num_rollouts)
    n = counts.clamp(min=1).double()

    def seg_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_rollouts, dtype=torch.float64, device=x.device).index_add_(0, seg, x) / n

    tau = segment_quantile(H, seg, num_rollouts, cfg.quantile_level)
    sigma_h = seg_mean((H - seg_mean(H)[seg]).abs()) + cfg.eps
    if cfg.gap_scale == "mean_abs":
        scale = seg_mean(d.abs()) + cfg.eps
    else:
        scale = torch.sqrt(seg_mean((d - seg_mean(d)[seg]) ** 2)) + cfg.eps
    return RolloutStats(tau=tau, sigma_h=sigma_h, gap_scale=scale, num_tokens=counts)
