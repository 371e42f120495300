"""The torch kernels behind `vocab_parallel_token_stats(..., kernel_backend="torch")`: chunked passes over the logits.

Same inputs, outputs and errors as every backend (the per-token math is in `vocab_parallel.py`'s docstring). The
tokens are processed in chunks; per chunk, with `w = z - m` (z = logits / tau, m the global max), three collectives,
all over `tp_group` (none when it is None or has one rank):

    1. all_reduce(MAX) of the stacked local maxima       [m_S; m_T]                         shape [2, C]
    2. all_reduce(SUM) of the stacked local sum-exps     [se_S; se_T]                       shape [2, C]
    3. all_reduce(SUM) of the stacked per-token partials [w_S[y], sum p w_S, w_T[y], sum p w_T, sum q w_S,
                                                          sum q w_T]                          shape [6, C]

(without a teacher the stacks have 1, 1 and 2 rows). Then, with log se the log of the global sum-exp:

    logp = w_S[y] - log se_S        H = log se_S - sum p w_S
    KL   = sum p w_S - sum p w_T - log se_S + log se_T          FKL = sum q w_T - sum q w_S - log se_T + log se_S

Backward needs no collective (`kernel_common.grad_coefficients`): it recomputes p and q chunk by chunk.

Memory: forward saves the input logits (by reference, no copy) and per-token scalars (lse_S, lse_T, H, KL), never a
softmax. Transient memory is a few fp32 `[chunk, width]` buffers; the default chunk size
(`kernel_common.default_chunk_size`) keeps one at about 2**24 values (64 MiB) on CUDA, 2**20 on CPU. Inputs are
never modified in place. float64 inputs are computed in float64 (for `gradcheck`), everything else in fp32.

`compile=True` wraps the per-chunk math in `torch.compile` (meant for CUDA, where it fuses each pass into one kernel
and no fp32 chunk temporaries exist). Use the compiled path on CUDA; the eager path is for CPUs and for checking, and
is the reference that the CPU tests run.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .kernel_common import (default_chunk_size, function_outputs, grad_coefficients, group_all_reduce, group_size,
                            raise_if_nonfinite)

__all__ = ["TorchTokenStats", "torch_token_stats"]


# ----------------------------------------------------------------------------------------------------------------
# Per-chunk math. Pure functions (no in-place ops, no collectives) so that torch.compile can fuse each into a kernel.
# `s`, `t`: [C, width] raw logits slices; `temp`: python float; `cdtype`: compute dtype.
# ----------------------------------------------------------------------------------------------------------------


def _local_max(s: torch.Tensor, t: Optional[torch.Tensor], temp: float, cdtype: torch.dtype) -> torch.Tensor:
    # max of z = x / temp equals max(x) / temp (division by temp > 0 and rounding are monotone).
    ms = s.amax(dim=-1).to(cdtype) / temp
    if t is None:
        return ms.unsqueeze(0)
    return torch.stack([ms, t.amax(dim=-1).to(cdtype) / temp])


def _sum_exp(s, t, m, temp: float, cdtype: torch.dtype) -> torch.Tensor:
    ses = torch.exp(s.to(cdtype) / temp - m[0].unsqueeze(-1)).sum(dim=-1)
    if t is None:
        return ses.unsqueeze(0)
    return torch.stack([ses, torch.exp(t.to(cdtype) / temp - m[1].unsqueeze(-1)).sum(dim=-1)])


def _partials(s, t, m, log_se, tgt_local, has_tgt, temp: float, cdtype: torch.dtype) -> torch.Tensor:
    idx = tgt_local.unsqueeze(-1)
    ws = s.to(cdtype) / temp - m[0].unsqueeze(-1)
    p = torch.exp(ws - log_se[0].unsqueeze(-1))
    zero = ws.new_zeros(())
    ws_y = torch.where(has_tgt, ws.gather(-1, idx).squeeze(-1), zero)
    p_ws = (p * ws).sum(dim=-1)
    if t is None:
        return torch.stack([ws_y, p_ws])
    wt = t.to(cdtype) / temp - m[1].unsqueeze(-1)
    q = torch.exp(wt - log_se[1].unsqueeze(-1))
    wt_y = torch.where(has_tgt, wt.gather(-1, idx).squeeze(-1), zero)
    return torch.stack([ws_y, p_ws, wt_y, (p * wt).sum(dim=-1), (q * ws).sum(dim=-1), (q * wt).sum(dim=-1)])


def _grad_chunk(s, t, lse, c_logp, c_logq, c_const, c_q, g_y, tgt_local, temp: float, cdtype, out_dtype):
    """d/dlogits of sum_t [g_lp logp + g_H H + g_KL KL + g_F FKL] for one chunk:
    dz = p * (c_logp log p + c_logq log q + c_const) - c_q q + g_y onehot (coefficients from
    `kernel_common.grad_coefficients`), then d/dlogits = dz / temp."""
    logp = s.to(cdtype) / temp - lse[0].unsqueeze(-1)
    p = torch.exp(logp)
    inner = c_logp.unsqueeze(-1) * logp + c_const.unsqueeze(-1)
    if t is not None:
        logq = t.to(cdtype) / temp - lse[1].unsqueeze(-1)
        inner = inner + c_logq.unsqueeze(-1) * logq
        dz = p * inner - c_q.unsqueeze(-1) * torch.exp(logq)
    else:
        dz = p * inner
    dz = dz.scatter_add(-1, tgt_local.unsqueeze(-1), g_y.unsqueeze(-1))
    return (dz / temp).to(out_dtype)


_EAGER = {"max": _local_max, "sumexp": _sum_exp, "partials": _partials, "grad": _grad_chunk}
_COMPILED: dict = {}


def _kernels(compile: bool) -> dict:
    if not compile:
        return _EAGER
    if not _COMPILED:
        _COMPILED.update({k: torch.compile(fn, dynamic=True) for k, fn in _EAGER.items()})
    return _COMPILED


class TorchTokenStats(torch.autograd.Function):
    """Autograd function of the torch path (see the module docstring for the passes and collectives).

    Outputs: (logp, entropy) without a teacher, (logp, entropy, teacher_logp, kl, forward_kl) with one.
    """

    @staticmethod
    def forward(ctx, student, teacher, targets, group, vocab_start, vocab_size, temp, chunk, check_finite, compile):
        T, v_local = student.shape
        width = max(0, min(vocab_size - vocab_start, v_local))
        cdtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        dev = student.device
        has_teacher = teacher is not None
        k = _kernels(compile)
        nrow = 2 if has_teacher else 1
        # Every TP rank must run the same number of chunks (each chunk has collectives), so the automatic chunk
        # size depends only on values shared by all ranks, not on this rank's (possibly uneven) shard width.
        chunk = chunk or default_chunk_size(-(-vocab_size // group_size(group)), dev, compile)

        valid_tgt = targets >= 0
        tgt_local = targets - vocab_start
        has_tgt = valid_tgt & (tgt_local >= 0) & (tgt_local < width)
        tgt_local = torch.where(has_tgt, tgt_local, torch.zeros_like(tgt_local))

        lse = torch.empty(nrow, T, dtype=cdtype, device=dev)  # saved: lse_S (, lse_T)
        outs = torch.empty(5 if has_teacher else 2, T, dtype=cdtype, device=dev)  # logp, H (, tlogp, KL, FKL)
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            s = student[c0:c1, :width]
            t = teacher[c0:c1, :width] if has_teacher else None
            C = c1 - c0
            if width > 0:
                m = k["max"](s, t, temp, cdtype)
            else:
                m = torch.full((nrow, C), float("-inf"), dtype=cdtype, device=dev)
            group_all_reduce(m, dist.ReduceOp.MAX, group)  # collective 1: stacked maxima
            se = k["sumexp"](s, t, m, temp, cdtype) if width > 0 else torch.zeros(nrow, C, dtype=cdtype, device=dev)
            group_all_reduce(se, dist.ReduceOp.SUM, group)  # collective 2: stacked sum-exps
            log_se = torch.log(se)
            if width > 0:
                part = k["partials"](s, t, m, log_se, tgt_local[c0:c1], has_tgt[c0:c1], temp, cdtype)
            else:
                part = torch.zeros(3 * nrow if has_teacher else 2, C, dtype=cdtype, device=dev)
            group_all_reduce(part, dist.ReduceOp.SUM, group)  # collective 3: stacked per-token partials
            vt = valid_tgt[c0:c1]
            zero = part.new_zeros(())
            lse[0, c0:c1] = m[0] + log_se[0]
            outs[0, c0:c1] = torch.where(vt, part[0] - log_se[0], zero)  # logp
            outs[1, c0:c1] = log_se[0] - part[1]  # entropy
            if has_teacher:
                lse[1, c0:c1] = m[1] + log_se[1]
                outs[2, c0:c1] = torch.where(vt, part[2] - log_se[1], zero)  # teacher logp
                outs[3, c0:c1] = part[1] - part[3] - log_se[0] + log_se[1]  # KL(S||T)
                outs[4, c0:c1] = part[5] - part[4] - log_se[1] + log_se[0]  # KL(T||S)

        if check_finite and T > 0:
            raise_if_nonfinite(outs, has_teacher, targets, vocab_size, student, teacher, width, temp, cdtype, chunk,
                               group)

        ctx.save_for_backward(student, teacher if has_teacher else None, tgt_local, has_tgt, valid_tgt, lse, outs)
        ctx.meta = (width, temp, chunk, cdtype, compile, has_teacher)
        return function_outputs(ctx, outs, has_teacher)

    @staticmethod
    def backward(ctx, g_lp, g_h, *rest):
        student, teacher, tgt_local, has_tgt, valid_tgt, lse, outs = ctx.saved_tensors
        width, temp, chunk, cdtype, compile, has_teacher = ctx.meta
        nones = (None,) * 9
        if not ctx.needs_input_grad[0]:
            return (None,) + nones
        c_logp, c_logq, c_const, g_fkl, g_y, use_teacher = grad_coefficients(
            outs, valid_tgt, has_tgt, has_teacher, g_lp, g_h, rest, cdtype)
        T, v_local = student.shape

        k = _kernels(compile)
        grad = torch.empty_like(student)
        if width < v_local:
            grad[:, width:] = 0  # padded vocabulary columns
        if width > 0:
            for c0 in range(0, T, chunk):
                c1 = min(T, c0 + chunk)
                t = teacher[c0:c1, :width] if use_teacher else None
                grad[c0:c1, :width] = k["grad"](
                    student[c0:c1, :width], t, lse[:, c0:c1], c_logp[c0:c1], c_logq[c0:c1], c_const[c0:c1],
                    g_fkl[c0:c1], g_y[c0:c1], tgt_local[c0:c1], temp, cdtype, student.dtype,
                )
        return (grad,) + nones


def torch_token_stats(student, teacher, targets, group, vocab_start: int, vocab_size: int, temperature: float,
                      chunk_size: Optional[int], check_finite: bool, compile: bool) -> tuple:
    """The torch path of `vocab_parallel_token_stats` (arguments already validated there): a tuple
    (logp, entropy) or (logp, entropy, teacher_logp, kl, forward_kl). `chunk_size` None: `default_chunk_size`."""
    return TorchTokenStats.apply(student, teacher, targets.long(), group, int(vocab_start), int(vocab_size),
                                 float(temperature), chunk_size, bool(check_finite), bool(compile))
