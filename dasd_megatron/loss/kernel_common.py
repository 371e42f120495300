"""What both kernel families of `vocab_parallel_token_stats` share: the TP-group collectives, the chunk size of the
chunked passes, the forward's output check, and the autograd plumbing (outputs and backward coefficients).

`torch_kernels.py` (chunked torch) and `triton_kernels.py` (streaming Triton) import this module and nothing of each
other; `vocab_parallel.py` (the entry point) dispatches between them. The per-token math they implement is in
`vocab_parallel.py`'s docstring; the gradient they both apply is in `grad_coefficients`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["CHUNK_VALUES", "NonFiniteLogitsError", "count_nonfinite", "default_chunk_size", "function_outputs",
           "grad_coefficients", "group_all_reduce", "group_size", "raise_if_nonfinite"]

# Values in one fp32 chunk temporary for the automatic chunk size. CUDA: 2**24 (64 MiB; the caching allocator reuses
# the blocks). CPU: 2**20 (4 MiB): larger blocks are mmap'd and page-faulted afresh by glibc on every allocation.
# Compiled (CUDA): the per-chunk math is fused, no fp32 [chunk, width] temporary exists, so chunks are larger (2**27
# values, ~880 tokens at V=152k): fewer, fuller kernels.
CHUNK_VALUES = {"cuda": 1 << 24, "cpu": 1 << 20, "compiled": 1 << 27}


class NonFiniteLogitsError(ValueError):
    """Raised when the logits given to the vocab-parallel kernels hold NaN or +-inf values."""


def default_chunk_size(width: int, device: "torch.device | str" = "cuda", compiled: bool = False) -> int:
    """Tokens per chunk so that one fp32 `[chunk, width]` temporary holds about 2**24 values on CUDA (2**20 on
    CPU; 2**27 when the chunk math is compiled and fused). `width` must be the same on every TP rank (the forward
    passes ceil(vocab_size / tp))."""
    if torch.device(device).type == "cpu":
        values = CHUNK_VALUES["cpu"]
    else:
        values = CHUNK_VALUES["compiled" if compiled else "cuda"]
    return max(1, values // max(int(width), 1))


def group_size(group: Optional["dist.ProcessGroup"]) -> int:
    """Ranks in `group`; 1 when it is None or torch.distributed is unavailable or not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_all_reduce(x: torch.Tensor, op, group: Optional["dist.ProcessGroup"]) -> torch.Tensor:
    """All-reduce `x` in place with `op` over `group` and return it; no collective when the group has one rank."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def count_nonfinite(x: torch.Tensor, width: int, temp: float, cdtype, chunk: int) -> torch.Tensor:
    """Number of values of x[:, :width] / temp that are NaN or +-inf (chunked; error path only)."""
    n = torch.zeros((), dtype=torch.int64, device=x.device)
    for c0 in range(0, x.shape[0], chunk):
        n = n + (~torch.isfinite(x[c0 : c0 + chunk, :width].to(cdtype) / temp)).sum()
    return n


def raise_if_nonfinite(outs, has_teacher, targets, vocab_size, student, teacher, width, temp, cdtype, chunk, group):
    """The forward's output check (one host sync): raise ValueError on targets >= vocab_size, and
    `NonFiniteLogitsError` with the counts of bad logits over the TP group when an output is not finite.

    Non-finite logits make the per-token outputs non-finite on every TP rank alike (NaN propagates through the SUM
    all-reduces), so every rank raises, and the counts (one more collective, error path only) are the group's."""
    T = student.shape[0]
    dev = student.device
    flags = torch.stack(
        [
            (~torch.isfinite(outs[:2])).sum(),
            (~torch.isfinite(outs[2:])).sum() if has_teacher else outs.new_zeros((), dtype=torch.int64),
            (targets >= vocab_size).sum(),
        ]
    ).tolist()  # the single host sync of the forward
    if flags[2]:
        bad = targets[targets >= vocab_size]
        raise ValueError(
            f"vocab_parallel_token_stats: targets has {flags[2]} ids >= vocab_size={vocab_size} "
            f"(e.g. {bad[:5].tolist()}); use ids in [0, vocab_size) or a negative id for ignored positions"
        )
    if flags[0] or flags[1]:
        counts = torch.stack(
            [
                count_nonfinite(student, width, temp, cdtype, chunk),
                count_nonfinite(teacher, width, temp, cdtype, chunk)
                if has_teacher
                else torch.zeros((), dtype=torch.int64, device=dev),
            ]
        )
        group_all_reduce(counts, dist.ReduceOp.SUM, group)
        n_s, n_t = counts.tolist()
        parts = []
        if n_s:
            parts.append(f"student_logits has {n_s} non-finite values (NaN/inf)")
        if n_t:
            parts.append(f"teacher_logits has {n_t} non-finite values (NaN/inf)")
        if not parts:  # cannot happen for finite inputs; keep the message honest if it does
            parts.append("the per-token statistics are non-finite although no logit is")
        raise NonFiniteLogitsError(
            "vocab_parallel_token_stats: " + "; ".join(parts) + f" over {T} tokens x {vocab_size} vocab "
            f"(all TP shards, temperature {temp}); refusing to produce a NaN loss"
        )


def function_outputs(ctx, outs: torch.Tensor, has_teacher: bool) -> tuple:
    """The autograd Function's outputs from the `[5, T]` (or `[2, T]`) stack: logp, entropy (and teacher_logp,
    marked non-differentiable, KL, forward KL), as fresh tensors; grads are not materialised for unused outputs."""
    ctx.set_materialize_grads(False)
    if has_teacher:
        tlogp = outs[2].clone()
        ctx.mark_non_differentiable(tlogp)
        return outs[0].clone(), outs[1].clone(), tlogp, outs[3].clone(), outs[4].clone()
    return outs[0].clone(), outs[1].clone()


def grad_coefficients(outs, valid_tgt, has_tgt, has_teacher, g_lp, g_h, rest, cdtype):
    """Per-token coefficients of the backward from the upstream gradients g_* (None = zero).

    With the global per-token scalars every gradient term is shard-local (no collective); per token, with
    onehot = the target's indicator on this shard and z_S = logits / tau:

        d logp / dz_S = onehot - p
        d H    / dz_S = -p (log p + H)
        d KL   / dz_S = p (log p - log q - KL)
        d FKL  / dz_S = p - q
        d / d logits  = (d / dz_S) / tau

    Summed with the upstream gradients: dz = p (c_logp log p + c_logq log q + c_const) - c_q q + g_y onehot, with
    c_logp = g_KL - g_H, c_logq = -g_KL, c_const = -g_H H - g_KL KL - g_lp + g_F, c_q = g_F, and g_y = g_lp on the
    shard holding the target (0 elsewhere; g_lp is 0 at ignored positions).

    Returns (c_logp, c_logq, c_const, c_q, g_y, use_teacher); use_teacher is False when no KL gradient came back,
    and the teacher logits need not be read."""
    g_kl = g_fkl = None
    if has_teacher:
        _, g_kl, g_fkl = rest
    zeros = outs.new_zeros(outs.shape[1])
    g_lp = zeros if g_lp is None else torch.where(valid_tgt, g_lp.to(cdtype), zeros)
    g_h = zeros if g_h is None else g_h.to(cdtype)
    use_teacher = has_teacher and (g_kl is not None or g_fkl is not None)
    g_kl = zeros if g_kl is None else g_kl.to(cdtype)
    g_fkl = zeros if g_fkl is None else g_fkl.to(cdtype)
    H = outs[1]
    KL = outs[3] if has_teacher else zeros
    c_logp = g_kl - g_h
    c_logq = -g_kl
    c_const = -g_h * H - g_kl * KL - g_lp + g_fkl
    g_y = torch.where(has_tgt, g_lp, zeros)
    return c_logp, c_logq, c_const, g_fkl, g_y, use_teacher
