"""The DASD objective on per-token statistics: router, GRPO/PPO surrogate, routed KL, global token-mean.

Inputs are per-token `[T]` tensors of one micro-batch on one rank (the output of `vocab_parallel_token_stats`, plus
old / rollout log-probs) and per-rollout arrays `[N]` indexed by `rollout_index` (GRPO advantages A_G and the
`RolloutStats` of the pre-pass). Valid tokens are those with `rollout_index >= 0`.

Per valid token t of rollout r (all of s, tau, sigma, omega, dbar, A detached):

    delta_t = tlogp_t - logp_t                dbar_t = clip(delta_t / s_r, -c_max, c_max)
    omega_t = router(H_t, dbar_t; tau_r, sigma_H_r)                                   (see router.py)
    w_t     = min(exp(old_logp_t - rollout_logp_t), is_cap)                             (see ppo.py)
    PPO(A)  = w_t * -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A)

    estimator 'sampled':  loss_t = PPO(A_t),  A_t = [A_G(r) if reward_term] + beta omega_t dbar_t
    estimator 'full':     loss_t = [PPO(A_G(r)) if reward_term] + beta omega_t KL_t / s_r
                          (KL_t = KL(pi_S || sg pi_T) over the full vocabulary; gradient through the student only;
                           the KL term is not importance-weighted: it is an exact expectation over the vocabulary)

    loss = sum_{valid t in this call} loss_t / N_global

Token-mean over the global batch: N_global is the number of valid tokens in the whole global batch (all micro-batches,
all DP and CP ranks). Then the sum of the losses returned by every call (micro-batches x DP x CP) equals the
single-process token mean over the whole batch, and so do the gradients. Give N_global as `num_global_tokens`
(recommended: count it once per step, e.g. with `global_token_count`), or pass `token_count_group` to all-reduce this
call's count over that group (right only when the call sees all of the rank's tokens, i.e. no micro-batching).
Without either, N_global is the local count. Note: Megatron's DDP *averages* gradients over DP ranks; with a global
token-mean loss scale the loss by the DP size (or use a summing reduction) so the update is the global mean.

Per-rollout statistics (tau, sigma_H, s) must come from whole rollouts: pass `rollout_stats` computed in a pre-pass
by `compute_rollout_stats` (see rollout_stats.py). If omitted they are computed here from the tokens of this call
(and `stats_group`), which is right only when this call holds every token of its rollouts.

Special cases (same code): router constant 0 = GRPO; +1 = GRPO + uniform distillation (OPSD-style, 'full' gives
GRPO + beta KL/s); -1 = uniform push-away; reward_term off with +1 = pure self-distillation.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from .config import DASDLossConfig
from .kernel_common import group_all_reduce
from .metrics import dasd_metrics
from .ppo import ppo_clip_token_loss, truncated_is_weight
from .rollout_stats import RolloutStats, compute_rollout_stats
from .router import normalized_gap, reliability_gate, router_omega
from .vocab_parallel import TokenStats

__all__ = ["dasd_loss", "global_token_count"]


def global_token_count(rollout_index: Union[torch.Tensor, list], group: Optional["dist.ProcessGroup"] = None) -> int:
    """Number of valid tokens (rollout_index >= 0) in `rollout_index` (a tensor or a list of micro-batch tensors),
    summed over `group` (e.g. the DP x CP group). One all-reduce and one host sync."""
    tensors = rollout_index if isinstance(rollout_index, (list, tuple)) else [rollout_index]
    device = tensors[0].device if tensors else "cpu"
    n = torch.zeros((), dtype=torch.int64, device=device)
    for ri in tensors:
        n = n + (ri >= 0).sum()
    group_all_reduce(n, dist.ReduceOp.SUM, group)
    return int(n.item())


def _take(per_rollout: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, dtype, fill: float = 0.0) -> torch.Tensor:
    """per_rollout[rollout_index] on valid tokens, `fill` elsewhere (safe for -1 ids and empty arrays)."""
    out = torch.full(idx.shape, fill, dtype=dtype, device=idx.device)
    if per_rollout.numel() == 0:
        return out
    vals = per_rollout.to(device=idx.device, dtype=dtype)[idx.clamp(min=0, max=per_rollout.numel() - 1)]
    return torch.where(valid, vals, out)


def dasd_loss(
    stats: TokenStats,
    rollout_index: torch.Tensor,
    advantages: torch.Tensor,
    cfg: DASDLossConfig,
    *,
    old_logp: Optional[torch.Tensor] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    rollout_stats: Optional[RolloutStats] = None,
    num_global_tokens: Optional[Union[int, torch.Tensor]] = None,
    token_count_group: Optional["dist.ProcessGroup"] = None,
    stats_group: Optional["dist.ProcessGroup"] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DASD loss of one micro-batch (this rank's share of the global token mean) and its metrics.

    Args:
        stats: `TokenStats` of this micro-batch's tokens (`vocab_parallel_token_stats`). `teacher_logp` is needed
            unless the teacher term is off (beta = 0, or router constant 0); `kl` for estimator 'full'.
        rollout_index: `[T]` int64 global rollout id per token, -1 for tokens outside any response.
        advantages: `[N]` GRPO advantage A_G per rollout id (`grpo_advantages`).
        cfg: the `DASDLossConfig`.
        old_logp: `[T]` trainer log-probs of the sampled tokens before this update (None: `stats.logp` detached,
            i.e. on-policy, ratio 1).
        rollout_logp: `[T]` the rollout engine's log-probs (None: no importance correction).
        rollout_stats: per-rollout tau / sigma_H / s from the pre-pass (None: computed from this call's tokens).
        num_global_tokens: valid tokens in the global batch (see the module docstring).
        token_count_group: all-reduce this call's valid-token count over this group when num_global_tokens is None.
        stats_group: group passed to `compute_rollout_stats` when rollout_stats is None.

    Returns:
        (loss, metrics): loss is a 0-dim tensor with autograd to the student logits; metrics see metrics.py.
    """
    logp, entropy = stats.logp, stats.entropy
    T = logp.shape[0]
    for name, x in (("entropy", entropy), ("rollout_index", rollout_index), ("old_logp", old_logp),
                    ("rollout_logp", rollout_logp), ("teacher_logp", stats.teacher_logp), ("kl", stats.kl)):
        if x is not None and x.shape != (T,):
            raise ValueError(f"dasd_loss: {name} has shape {tuple(x.shape)}, expected [{T}] like stats.logp")
    teacher_on = cfg.teacher_term_on
    if teacher_on and stats.teacher_logp is None:
        raise ValueError("dasd_loss: the teacher term is on (beta != 0 and omega not constant 0) but "
                         "stats.teacher_logp is None; pass teacher logits to vocab_parallel_token_stats")
    if teacher_on and cfg.estimator == "full" and stats.kl is None:
        raise ValueError("dasd_loss: estimator 'full' needs stats.kl (teacher logits)")

    dtype = logp.dtype
    valid = rollout_index >= 0
    zero = logp.new_zeros(())
    # Sanitise masked positions first so no inf/NaN there can leak into gradients through torch.where.
    logp_v = torch.where(valid, logp, zero)
    old = logp_v.detach() if old_logp is None else torch.where(valid, old_logp.detach().to(dtype), zero)
    roll = None if rollout_logp is None else torch.where(valid, rollout_logp.detach().to(dtype), zero)
    H = torch.where(valid, entropy.detach(), zero)
    has_teacher = stats.teacher_logp is not None
    delta = torch.where(valid, stats.teacher_logp.to(dtype) - logp.detach(), zero) if has_teacher else None

    n_rollouts = advantages.shape[0]
    if rollout_stats is None:
        rollout_stats = compute_rollout_stats(
            H, delta if delta is not None else torch.zeros_like(H), rollout_index, n_rollouts, cfg, group=stats_group
        )
    tau = _take(rollout_stats.tau, rollout_index, valid, dtype)
    sigma = _take(rollout_stats.sigma_h, rollout_index, valid, dtype, fill=1.0)
    scale = _take(rollout_stats.gap_scale, rollout_index, valid, dtype, fill=1.0)
    a_g = _take(advantages.detach(), rollout_index, valid, dtype)

    dbar = normalized_gap(delta, scale, cfg.c_max) if has_teacher else torch.zeros_like(H)
    omega = torch.where(valid, router_omega(H, dbar, tau, sigma, cfg), zero)
    gate = reliability_gate(dbar, cfg.router_gate)

    if num_global_tokens is None:
        n = valid.sum()
        group_all_reduce(n, dist.ReduceOp.SUM, token_count_group)
        denom = n.clamp(min=1).to(dtype)
    else:
        denom = torch.as_tensor(num_global_tokens, device=logp.device).clamp(min=1).to(dtype)

    a_reward = a_g if cfg.reward_term else torch.zeros_like(a_g)
    is_w = torch.where(valid, truncated_is_weight(old, roll, cfg.is_cap), zero)
    if cfg.estimator == "sampled":
        adv = a_reward + cfg.beta * omega * dbar
        use_pg = True
    else:
        adv = a_reward
        use_pg = cfg.reward_term
    pg, ratio, clip_low, clip_high = ppo_clip_token_loss(logp_v, old, adv, cfg.clip_eps_low, cfg.clip_eps_high)
    pg_sum = torch.where(valid, is_w * pg, zero).sum() if use_pg else (logp_v * 0.0).sum()
    if cfg.estimator == "full" and teacher_on:
        kl_v = torch.where(valid, stats.kl, zero)
        distill_sum = (cfg.beta * omega / scale * kl_v).sum()
    else:
        distill_sum = zero
    loss = (pg_sum + distill_sum) / denom

    metrics = dasd_metrics(
        valid=valid, loss=loss, pg_sum=pg_sum, distill_sum=distill_sum, denom=denom, entropy=H, omega=omega,
        gate=gate, tau=tau, sigma_h=sigma, delta=delta, gap_scale=scale, dbar=dbar, c_max=cfg.c_max,
        kl=stats.kl, forward_kl=stats.forward_kl, adv_reward=a_reward, adv_total=adv, ratio=ratio,
        clip_low=clip_low, clip_high=clip_high, is_weight=is_w, is_cap=cfg.is_cap, old_logp=old, rollout_logp=roll,
    )
    return loss, metrics
