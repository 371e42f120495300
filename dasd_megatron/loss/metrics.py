"""Diagnostics of the DASD loss, as namespaced detached 0-dim tensors (`.item()` them when logging; building them
costs one host sync, for the entropy-decile bucketing).

All means are over the valid response tokens seen by one `dasd_loss` call (local to the micro-batch and rank);
`loss/num_tokens` is that count, so a logger can token-weight them across micro-batches and ranks. Entropy deciles
are equal-count buckets of this call's tokens ranked by entropy (decile 0 = lowest entropy); an empty decile reports
0. Keys:

    loss/total, loss/pg, loss/distill           the loss and its two parts (local contributions to the global mean)
    loss/num_tokens                             valid tokens in this call
    loss/entropy, loss/kl, loss/forward_kl      token means of H, KL(S||T), KL(T||S) (KL keys need a teacher)
    loss/clip_frac, loss/clip_low_frac, loss/clip_high_frac, loss/ratio_mean, loss/ratio_max
    loss/is_weight_mean, loss/is_weight_max, loss/is_capped_frac
    rollout/logp_mismatch_abs                   mean |old_logp - rollout_logp| (0 without rollout log-probs)
    rollout/mismatch_kl_k3                      mean of (w - 1) - log w, w = exp(old_logp - rollout_logp) (k3 estimator
                                                of KL(rollout || trainer) on the sampled tokens)
    router/omega_mean, router/omega_abs_mean, router/omega_pos_frac, router/omega_neg_frac, router/gate_mean
    router/tau_mean, router/sigma_h_mean        token means of the rollout's tau and sigma_H
    router/entropy_mean_decile_{k}, router/omega_mean_decile_{k}     k = 0..9
    gap/delta_mean, gap/delta_abs_mean, gap/scale_mean, gap/dbar_abs_mean, gap/dbar_clip_frac
    adv/reward_mean                             token mean of A_G
    adv/total_abs_mean                          token mean of |A_t| actually used in the surrogate
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["decile_means", "dasd_metrics"]


def decile_means(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of `key` and `value` in 10 equal-count buckets of `key` (ascending); empty buckets give 0."""
    n = key.numel()
    zeros = key.new_zeros(10)
    if n == 0:
        return zeros, zeros.clone()
    order = torch.argsort(key, stable=True)
    bucket = torch.empty(n, dtype=torch.long, device=key.device)
    bucket[order] = torch.arange(n, device=key.device) * 10 // n
    cnt = torch.bincount(bucket, minlength=10).to(key.dtype).clamp(min=1)
    k = zeros.index_add(0, bucket, key) / cnt
    v = value.new_zeros(10).index_add(0, bucket, value) / cnt.to(value.dtype)
    return k, v


@torch.no_grad()
def dasd_metrics(
    *,
    valid: torch.Tensor,
    loss: torch.Tensor,
    pg_sum: torch.Tensor,
    distill_sum: torch.Tensor,
    denom: torch.Tensor,
    entropy: torch.Tensor,
    omega: torch.Tensor,
    gate: torch.Tensor,
    tau: torch.Tensor,
    sigma_h: torch.Tensor,
    delta: Optional[torch.Tensor],
    gap_scale: torch.Tensor,
    dbar: torch.Tensor,
    c_max: float,
    kl: Optional[torch.Tensor],
    forward_kl: Optional[torch.Tensor],
    adv_reward: torch.Tensor,
    adv_total: torch.Tensor,
    ratio: torch.Tensor,
    clip_low: torch.Tensor,
    clip_high: torch.Tensor,
    is_weight: torch.Tensor,
    is_cap: Optional[float],
    old_logp: torch.Tensor,
    rollout_logp: Optional[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The metrics listed in the module docstring (all per-token inputs are `[T]`, masked by `valid`)."""
    n = valid.sum()
    nf = n.clamp(min=1).to(torch.float32)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x.detach(), torch.zeros_like(x)).sum().float() / nf

    def vmax(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        return torch.where(valid, x, torch.full_like(x, float("-inf"))).amax() if x.numel() else x.new_zeros(())

    def frac(mask: torch.Tensor) -> torch.Tensor:
        return (mask & valid).sum().float() / nf

    m: dict[str, torch.Tensor] = {
        "loss/total": loss.detach().float(),
        "loss/pg": (pg_sum.detach() / denom).float(),
        "loss/distill": (distill_sum.detach() / denom).float(),
        "loss/num_tokens": n.float(),
        "loss/entropy": mean(entropy),
        "loss/clip_frac": frac(clip_low | clip_high),
        "loss/clip_low_frac": frac(clip_low),
        "loss/clip_high_frac": frac(clip_high),
        "loss/ratio_mean": mean(ratio),
        "loss/ratio_max": torch.clamp(vmax(ratio), min=0.0),
        "loss/is_weight_mean": mean(is_weight),
        "loss/is_weight_max": torch.clamp(vmax(is_weight), min=0.0),
        "loss/is_capped_frac": frac(is_weight >= is_cap) if is_cap is not None else nf.new_zeros(()),
        "router/omega_mean": mean(omega),
        "router/omega_abs_mean": mean(omega.abs()),
        "router/omega_pos_frac": frac(omega > 0),
        "router/omega_neg_frac": frac(omega < 0),
        "router/gate_mean": mean(gate),
        "router/tau_mean": mean(tau),
        "router/sigma_h_mean": mean(sigma_h),
        "gap/scale_mean": mean(gap_scale),
        "gap/dbar_abs_mean": mean(dbar.abs()),
        "gap/dbar_clip_frac": frac(dbar.abs() >= c_max),
        "adv/reward_mean": mean(adv_reward),
        "adv/total_abs_mean": mean(adv_total.abs()),
    }
    if kl is not None:
        m["loss/kl"] = mean(kl)
    if forward_kl is not None:
        m["loss/forward_kl"] = mean(forward_kl)
    if delta is not None:
        m["gap/delta_mean"] = mean(delta)
        m["gap/delta_abs_mean"] = mean(delta.abs())
    if rollout_logp is not None:
        d = torch.where(valid, old_logp.detach() - rollout_logp.detach(), torch.zeros_like(old_logp))
        m["rollout/logp_mismatch_abs"] = mean(d.abs())
        m["rollout/mismatch_kl_k3"] = mean(torch.expm1(d) - d)
    else:
        m["rollout/logp_mismatch_abs"] = nf.new_zeros(())
        m["rollout/mismatch_kl_k3"] = nf.new_zeros(())
    ent_dec, om_dec = decile_means(entropy.detach()[valid].float(), omega.detach()[valid].float())
    for k in range(10):
        m[f"router/entropy_mean_decile_{k}"] = ent_dec[k]
        m[f"router/omega_mean_decile_{k}"] = om_dec[k]
    return m
