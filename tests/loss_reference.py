"""Float64 single-process reference of the DASD loss, written independently of `dasd_megatron.loss`.

Plain full-vocabulary torch in float64 (`log_softmax`, explicit sums), per-rollout statistics with Python loops and
`torch.quantile`, and the objective token by token. It shares no code with the kernels; it only reads the fields of
a `DASDLossConfig` (or any object with the same attribute names). Autograd through it gives reference gradients.
"""

from __future__ import annotations

import math

import torch


def ref_token_stats(student, teacher, targets, temperature=1.0):
    """Per-token logp, entropy, teacher_logp, kl = KL(S||T), forward_kl = KL(T||S), in float64."""
    ls = torch.log_softmax(student.double() / temperature, dim=-1)
    p = ls.exp()
    keep = targets >= 0
    safe = targets.clamp(min=0).unsqueeze(-1)
    out = {
        "logp": torch.where(keep, ls.gather(-1, safe).squeeze(-1), torch.zeros((), dtype=torch.float64)),
        "entropy": -(p * ls).sum(-1),
    }
    if teacher is not None:
        lt = torch.log_softmax(teacher.double() / temperature, dim=-1)
        q = lt.exp()
        out["teacher_logp"] = torch.where(keep, lt.gather(-1, safe).squeeze(-1), torch.zeros((), dtype=torch.float64))
        out["kl"] = (p * (ls - lt)).sum(-1)
        out["forward_kl"] = (q * (lt - ls)).sum(-1)
    return out


def ref_rollout_stats(entropy, delta, rollout_index, num_rollouts, cfg):
    """Lists of per-rollout (tau, sigma_h, scale) as python floats, one rollout at a time."""
    q = 1.0 - cfg.rho if cfg.convention == "upper" else cfg.rho
    taus, sigmas, scales = [], [], []
    for r in range(num_rollouts):
        sel = rollout_index == r
        h = entropy.detach().double()[sel]
        d = delta.detach().double()[sel]
        if h.numel() == 0:
            taus.append(0.0)
            sigmas.append(cfg.eps)
            scales.append(cfg.eps)
            continue
        taus.append(torch.quantile(h, q).item())
        sigmas.append((h - h.mean()).abs().mean().item() + cfg.eps)
        if cfg.gap_scale == "mean_abs":
            scales.append(d.abs().mean().item() + cfg.eps)
        else:
            scales.append(math.sqrt(((d - d.mean()) ** 2).mean().item()) + cfg.eps)
    return taus, sigmas, scales


def ref_grpo_advantages(rewards, groups, std_normalize=True, eps=1e-6):
    """A list of per-rollout advantages; `groups` is a list of lists of rollout ids."""
    adv = [0.0] * len(rewards)
    for g in groups:
        r = torch.tensor([float(rewards[i]) for i in g], dtype=torch.float64)
        std = r.std().item() if len(g) > 1 else 0.0
        for i in g:
            a = float(rewards[i]) - r.mean().item()
            adv[i] = a / (std + eps) if std_normalize else a
    return adv


def ref_dasd_loss(tok, rollout_index, advantages, cfg, old_logp=None, rollout_logp=None, stats=None, n_tokens=None):
    """The DASD loss, token by token. `tok`: dict from `ref_token_stats` (with autograd to the student).

    stats: (taus, sigmas, scales) lists, or None to compute them from these tokens. n_tokens: the token-mean
    denominator (default: number of valid tokens here).
    """
    logp, ent = tok["logp"], tok["entropy"]
    tlogp = tok.get("teacher_logp")
    kl = tok.get("kl")
    T = logp.shape[0]
    delta = (tlogp - logp).detach() if tlogp is not None else torch.zeros(T, dtype=torch.float64)
    if stats is None:
        stats = ref_rollout_stats(ent, delta, rollout_index, len(advantages), cfg)
    taus, sigmas, scales = stats
    valid = [t for t in range(T) if int(rollout_index[t]) >= 0]
    denom = max(len(valid) if n_tokens is None else int(n_tokens), 1)
    total = torch.zeros((), dtype=torch.float64)
    for t in valid:
        r = int(rollout_index[t])
        H = float(ent[t].detach())
        d = float(delta[t])
        s = scales[r]
        dbar = max(-cfg.c_max, min(cfg.c_max, d / s))
        if cfg.router_mode == "tanh":
            om = math.tanh((taus[r] - H) / sigmas[r])
        elif cfg.router_mode == "hard":
            om = float((taus[r] - H) > 0) - float((taus[r] - H) < 0)
        else:
            om = cfg.router_constant
        if cfg.router_gate:
            om *= 1.0 / (1.0 + math.exp(-(abs(dbar) - 1.0)))
        old = float(logp[t]) if old_logp is None else float(old_logp[t])
        w = 1.0
        if cfg.is_cap is not None and rollout_logp is not None:
            w = min(math.exp(old - float(rollout_logp[t])), cfg.is_cap)
        A = float(advantages[r]) if cfg.reward_term else 0.0
        if cfg.estimator == "sampled":
            A += cfg.beta * om * dbar
        ratio = torch.exp(logp[t].double() - old)
        pg = -torch.minimum(ratio * A, torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * A) * w
        if cfg.estimator == "sampled" or cfg.reward_term:
            total = total + pg
        if cfg.estimator == "full" and om != 0.0:
            total = total + cfg.beta * om * kl[t] / s
    return total / denom
