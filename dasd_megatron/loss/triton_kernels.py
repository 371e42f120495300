"""Triton kernels behind `vocab_parallel_token_stats(..., kernel_backend="triton")`: one streaming pass over the
logits in the forward, one in the backward.

Same inputs, outputs, `TokenStats` and errors as the torch path (`torch_kernels.py`; the per-token math is in
`vocab_parallel.py`'s docstring); only the traversal of the shard and the collectives differ. All arithmetic is
fp32, with z = logits * (1 / tau) (a multiply: the torch path divides, so z may differ from it by an ulp). float64
inputs never come here.

Forward. One program per (token row, column split) streams its columns of the local student (and teacher) shard in
blocks of BLOCK columns, reading every logit once. It keeps the running maxima m_S, m_T of z_S, z_T and sums
relative to them (w = z - m; an online softmax):

    se_S = sum e^{w_S}     a_SS = sum e^{w_S} w_S     a_ST = sum e^{w_S} w_T     y_S = z_S[target]
    se_T = sum e^{w_T}     a_TT = sum e^{w_T} w_T     a_TS = sum e^{w_T} w_S     y_T = z_T[target]

(y only in the split holding the target, 0 elsewhere). When a block raises a maximum from m to m' (d = m - m' <= 0),
the sums are moved to the new reference exactly, then the block's own terms are added:

    se' = e^{d_S} se_S      a_SS' = e^{d_S} (a_SS + d_S se_S)      a_ST' = e^{d_S} (a_ST + d_T se_S)

(a_TT, a_TS alike with S and T swapped). Keeping the sums relative to the running maximum keeps their terms as small
as the spread of the logits, not their magnitude. The same identity merges the partials of the column splits and
of the TP ranks, in torch on `[k, T]` tensors: all_reduce(MAX) of the maxima, every partial moved to the global
maxima M_S, M_T, all_reduce(SUM). Two collectives per call whatever T (the torch path: three per chunk); a shard
whose valid width is 0, or an empty split, holds m = -inf and zero sums and contributes exactly nothing. With the
global sums (capitals: over the whole vocabulary, relative to M):

    lse_S = M_S + log SE_S      logp = Y_S - M_S - log SE_S      H = log SE_S - A_SS / SE_S
    KL  = (A_SS - A_ST) / SE_S - log SE_S + log SE_T             teacher_logp = Y_T - M_T - log SE_T
    FKL = (A_TT - A_TS) / SE_T - log SE_T + log SE_S

Backward (no collective). One program per (token row, block of columns) reads z_S and z_T once and writes, in the
logits dtype,

    d/dlogits = [p (c_logp log p + c_logq log q + c_const) - c_q q + g_y onehot] / tau,   log p = z_S - lse_S,
                                                                                          log q = z_T - lse_T

with the per-token coefficients of `kernel_common.grad_coefficients` (the expansion of g_logp (onehot - p)
+ g_H (-p (log p + H)) + g_KL p (log p - log q - KL) + g_FKL (p - q)), and 0 in the padded columns past vocab_size.
When no KL gradient comes back, the teacher is not read (q terms vanish).
bf16 gradients are rounded to nearest-even explicitly (the GPU's conversion; Triton's interpreter would truncate).

Memory traffic per call for a `[T, V_local]` shard of e-byte logits: the forward reads student and teacher once
(2 T V e), the backward reads them once more and writes the gradient once (3 T V e); everything else is O(T)
(bench/loss.py divides these 5 T V e bytes by the device's peak bandwidth for a floor).
Transient memory: the `[k, splits, T]` fp32 partials. `chunk_size` and `compile` do not apply here.

Non-CUDA tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 before this module is first imported
(`INTERPRETED` records the mode its kernels were built in).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .kernel_common import (default_chunk_size, function_outputs, grad_coefficients, group_all_reduce, group_size,
                            raise_if_nonfinite)

__all__ = ["GPU_LAUNCH", "INTERPRETED", "INTERPRETER_LAUNCH", "TritonTokenStats", "stats_bwd_kernel",
           "stats_fwd_kernel", "triton_token_stats"]

# Rows of the forward partials `[NP, splits, T]`; the teacher rows exist only with a teacher.
_M_S, _SE_S, _A_SS, _Y_S, _M_T, _SE_T, _A_TT, _A_ST, _A_TS, _Y_T = range(10)


@triton.jit
def _moved(a, d_scale, d_shift, se):
    """A sum `a` of terms e^{w} x moved to new references: e^{d_scale} (a + d_shift se). Before the first block
    se = 0 and d = -inf, and (-inf) * 0 would be NaN: the shift is 0 then (a NaN se still propagates)."""
    return tl.exp(d_scale) * (a + tl.where(se == 0.0, 0.0, d_shift) * se)


@triton.jit
def stats_fwd_kernel(s_ptr, t_ptr, tgt_ptr, part_ptr, n_rows, stride_s, stride_t, width, split_cols, inv_temp,
                     HAS_TEACHER: tl.constexpr, BLOCK: tl.constexpr):
    """The forward partials of one (token row, column split), grid (T, splits): writes m, se, a and y of the module
    docstring into the `[NP, splits, T]` fp32 `part_ptr` (rows `_M_S` ... `_Y_T`). `tgt_ptr`: the target's local
    column, -1 when it is not on this shard."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    c0 = split * split_cols
    c1 = tl.minimum(c0 + split_cols, width)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK)
    m_s = float("-inf")
    se_s = 0.0
    a_ss = 0.0
    m_t = float("-inf")
    se_t = 0.0
    a_tt = 0.0
    a_st = 0.0
    a_ts = 0.0
    for start in range(c0, c1, BLOCK):
        cols = start + offs
        mask = cols < c1
        zs = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        new_s = tl.maximum(m_s, tl.max(zs, axis=0))
        d_s = m_s - new_s
        ws = tl.where(mask, zs - new_s, 0.0)  # masked columns: w = 0, e^w = 0, so every product below is 0
        es = tl.where(mask, tl.exp(ws), 0.0)
        if HAS_TEACHER:
            zt = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            new_t = tl.maximum(m_t, tl.max(zt, axis=0))
            d_t = m_t - new_t
            wt = tl.where(mask, zt - new_t, 0.0)
            et = tl.where(mask, tl.exp(wt), 0.0)
            a_st = _moved(a_st, d_s, d_t, se_s) + tl.sum(es * wt, axis=0)
            a_ts = _moved(a_ts, d_t, d_s, se_t) + tl.sum(et * ws, axis=0)
            a_tt = _moved(a_tt, d_t, d_t, se_t) + tl.sum(et * wt, axis=0)
            se_t = tl.exp(d_t) * se_t + tl.sum(et, axis=0)
            m_t = new_t
        a_ss = _moved(a_ss, d_s, d_s, se_s) + tl.sum(es * ws, axis=0)
        se_s = tl.exp(d_s) * se_s + tl.sum(es, axis=0)
        m_s = new_s

    tgt = tl.load(tgt_ptr + row)  # local column of the target, -1 when it is not on this shard
    hit = (tgt >= c0) & (tgt < c1)
    out = part_ptr + split * n_rows + row
    plane = tl.num_programs(1).to(tl.int64) * n_rows
    tl.store(out + 0 * plane, m_s)
    tl.store(out + 1 * plane, se_s)
    tl.store(out + 2 * plane, a_ss)
    y_s = tl.load(s_row + tgt, mask=hit, other=0.0).to(tl.float32) * inv_temp
    tl.store(out + 3 * plane, tl.where(hit, y_s, 0.0))
    if HAS_TEACHER:
        tl.store(out + 4 * plane, m_t)
        tl.store(out + 5 * plane, se_t)
        tl.store(out + 6 * plane, a_tt)
        tl.store(out + 7 * plane, a_st)
        tl.store(out + 8 * plane, a_ts)
        y_t = tl.load(t_row + tgt, mask=hit, other=0.0).to(tl.float32) * inv_temp
        tl.store(out + 9 * plane, tl.where(hit, y_t, 0.0))


@triton.jit
def _bf16_rtne(x):
    """fp32 -> bf16 bits, round to nearest, ties to even (NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def stats_bwd_kernel(s_ptr, t_ptr, tgt_ptr, coef_ptr, g_ptr, n_rows, stride_s, stride_t, width, v_local, inv_temp,
                     HAS_TEACHER: tl.constexpr, BF16_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """The logits gradient of one (token row, block of columns), grid (T, cdiv(V_local, BLOCK)): writes d/dlogits of
    the module docstring into the contiguous `[T, V_local]` `g_ptr` (0 in columns >= width), from the `[k, T]`
    per-token rows of `coef_ptr`: lse_S, c_logp, c_const, g_y (, lse_T, c_logq, c_q when HAS_TEACHER)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < width
    # per-token scalars, coef rows: lse_S, c_logp, c_const, g_y (, lse_T, c_logq, c_q)
    lse_s = tl.load(coef_ptr + row)
    c_logp = tl.load(coef_ptr + n_rows + row)
    c_const = tl.load(coef_ptr + 2 * n_rows + row)
    g_y = tl.load(coef_ptr + 3 * n_rows + row)
    tgt = tl.load(tgt_ptr + row)
    logp = tl.load(s_ptr + row * stride_s + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp - lse_s
    p = tl.exp(logp)
    inner = c_logp * logp + c_const
    if HAS_TEACHER:
        lse_t = tl.load(coef_ptr + 4 * n_rows + row)
        c_logq = tl.load(coef_ptr + 5 * n_rows + row)
        c_q = tl.load(coef_ptr + 6 * n_rows + row)
        logq = tl.load(t_ptr + row * stride_t + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp - lse_t
        dz = p * (inner + c_logq * logq) - c_q * tl.exp(logq)
    else:
        dz = p * inner
    dz = tl.where(cols == tgt, dz + g_y, dz)
    g = tl.where(valid, dz * inv_temp, 0.0)
    dst = g_ptr + row * v_local + cols
    if BF16_OUT:
        tl.store(dst, _bf16_rtne(g), mask=cols < v_local)
    else:
        tl.store(dst, g.to(g_ptr.dtype.element_ty), mask=cols < v_local)


INTERPRETED = isinstance(stats_fwd_kernel, InterpretedFunction)
"""True when the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import): they then run on CPU
tensors, slowly; False: compiled for the GPU."""

# Columns per block and warps per program. GPU: 8 warps; forward 2048 columns (a 4096-column forward block needs
# about twice the registers per thread, so fewer programs stay resident per SM), backward 4096; neither spills
# registers on sm_90. Interpreter (tests): 64 columns, so that a few hundred columns already span several blocks and
# two splits per row, and the online rescaling and the split merge run in every test.
GPU_LAUNCH = {"fwd_block": 2048, "bwd_block": 4096, "num_warps": 8}
INTERPRETER_LAUNCH = {"fwd_block": 64, "bwd_block": 64, "num_warps": 1}


def _default_splits(T: int, width: int, block: int, device: torch.device) -> int:
    """Column splits per row: enough (row, split) programs to fill the GPU about 4 times when T is small."""
    if INTERPRETED:
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-4 * sms // max(T, 1)), -(-width // block)))


def _local_partials(student, teacher, tgt_local, width, inv_temp, block, splits, num_warps) -> torch.Tensor:
    """`[NP, splits, T]` fp32 partials of this shard (NP = 10 with a teacher, 4 without); one read of each logit."""
    T = student.shape[0]
    has_teacher = teacher is not None
    n_part = 10 if has_teacher else 4
    if width == 0:  # nothing on this shard: m = -inf, zero sums
        part = torch.zeros(n_part, 1, T, dtype=torch.float32, device=student.device)
        part[_M_S] = float("-inf")
        if has_teacher:
            part[_M_T] = float("-inf")
        return part
    split_cols = -(-(-(-width // splits)) // block) * block  # columns per split, a multiple of the block
    splits = -(-width // split_cols)
    part = torch.empty(n_part, splits, T, dtype=torch.float32, device=student.device)
    t = teacher if has_teacher else student
    stats_fwd_kernel[(T, splits)](
        student, t, tgt_local, part, T, student.stride(0), t.stride(0), width, split_cols, inv_temp,
        HAS_TEACHER=has_teacher, BLOCK=block, num_warps=num_warps,
    )
    return part


def _merge(part, has_teacher, has_tgt, valid_tgt, group):
    """Combine the partials of all splits and TP ranks (2 collectives). Returns lse `[nrow, T]` and the outputs
    `[2 or 5, T]` (logp, H (, teacher_logp, KL, FKL)), in fp32."""
    rows_m = [_M_S, _M_T] if has_teacher else [_M_S]
    m = part[rows_m]  # [nrow, splits, T]
    mg = m.amax(dim=1)
    group_all_reduce(mg, dist.ReduceOp.MAX, group)  # collective 1: the global maxima
    d = m - mg.unsqueeze(1)  # <= 0; -inf for empty splits and shards
    d_s = d[0]
    se_s = part[_SE_S]
    sums = [torch.exp(d_s) * se_s, _moved_torch(part[_A_SS], d_s, d_s, se_s), part[_Y_S]]
    if has_teacher:
        d_t = d[1]
        se_t = part[_SE_T]
        sums += [torch.exp(d_t) * se_t, _moved_torch(part[_A_TT], d_t, d_t, se_t),
                 _moved_torch(part[_A_ST], d_s, d_t, se_s), _moved_torch(part[_A_TS], d_t, d_s, se_t), part[_Y_T]]
    tot = torch.stack(sums).sum(dim=1)  # [k, T]: this rank's sums relative to the global maxima
    zero = tot.new_zeros(())
    tot[2] = torch.where(has_tgt, tot[2] - mg[0], zero)  # z_S[y] - M_S on the rank holding the target
    if has_teacher:
        tot[7] = torch.where(has_tgt, tot[7] - mg[1], zero)
    group_all_reduce(tot, dist.ReduceOp.SUM, group)  # collective 2: the global sums
    log_se_s = torch.log(tot[0])
    ent = log_se_s - tot[1] / tot[0]
    logp = torch.where(valid_tgt, tot[2] - log_se_s, zero)
    if not has_teacher:
        return (mg[0] + log_se_s).unsqueeze(0), torch.stack([logp, ent])
    log_se_t = torch.log(tot[3])
    tlogp = torch.where(valid_tgt, tot[7] - log_se_t, zero)
    kl = tot[1] / tot[0] - tot[5] / tot[0] - log_se_s + log_se_t
    fkl = tot[4] / tot[3] - tot[6] / tot[3] - log_se_t + log_se_s
    return torch.stack([mg[0] + log_se_s, mg[1] + log_se_t]), torch.stack([logp, ent, tlogp, kl, fkl])


def _moved_torch(a, d_scale, d_shift, se):
    """`_moved` on torch tensors (the split and TP merge)."""
    return torch.exp(d_scale) * (a + torch.where(se == 0, 0.0, d_shift) * se)


class TritonTokenStats(torch.autograd.Function):
    """Autograd function of the Triton path; outputs as `torch_kernels.TorchTokenStats`."""

    @staticmethod
    def forward(ctx, student, teacher, targets, group, vocab_start, vocab_size, temp, check_finite, block, splits):
        T, v_local = student.shape
        width = max(0, min(vocab_size - vocab_start, v_local))
        has_teacher = teacher is not None
        cfg = INTERPRETER_LAUNCH if INTERPRETED else GPU_LAUNCH
        inv_temp = 1.0 / temp
        valid_tgt = targets >= 0
        tgt_local = targets - vocab_start
        has_tgt = valid_tgt & (tgt_local >= 0) & (tgt_local < width)
        tgt_local = torch.where(has_tgt, tgt_local, torch.full_like(tgt_local, -1))
        if T > 0:
            fwd_block = block or cfg["fwd_block"]
            splits = splits or _default_splits(T, width, fwd_block, student.device)
            part = _local_partials(student, teacher, tgt_local, width, inv_temp, fwd_block, splits, cfg["num_warps"])
            lse, outs = _merge(part, has_teacher, has_tgt, valid_tgt, group)
        else:  # nothing to do, and no collective (every TP rank holds the same tokens)
            lse = torch.empty(2 if has_teacher else 1, 0, device=student.device)
            outs = torch.empty(5 if has_teacher else 2, 0, device=student.device)
        if check_finite and T > 0:
            chunk = default_chunk_size(-(-vocab_size // group_size(group)), student.device)  # error path only
            raise_if_nonfinite(outs, has_teacher, targets, vocab_size, student, teacher, width, temp,
                               torch.float32, chunk, group)
        ctx.save_for_backward(student, teacher, tgt_local, has_tgt, valid_tgt, lse, outs)
        ctx.meta = (width, inv_temp, has_teacher, block)
        return function_outputs(ctx, outs, has_teacher)

    @staticmethod
    def backward(ctx, g_lp, g_h, *rest):
        student, teacher, tgt_local, has_tgt, valid_tgt, lse, outs = ctx.saved_tensors
        width, inv_temp, has_teacher, block = ctx.meta
        nones = (None,) * 9
        if not ctx.needs_input_grad[0]:
            return (None,) + nones
        c_logp, c_logq, c_const, c_q, g_y, use_teacher = grad_coefficients(
            outs, valid_tgt, has_tgt, has_teacher, g_lp, g_h, rest, torch.float32)
        T, v_local = student.shape
        grad = torch.empty(T, v_local, dtype=student.dtype, device=student.device)
        if T == 0 or v_local == 0:
            return (grad,) + nones
        rows = [lse[0], c_logp, c_const, g_y] + ([lse[1], c_logq, c_q] if use_teacher else [])
        coef = torch.stack(rows).contiguous()
        cfg = INTERPRETER_LAUNCH if INTERPRETED else GPU_LAUNCH
        bwd_block = block or cfg["bwd_block"]
        t = teacher if use_teacher else student
        stats_bwd_kernel[(T, triton.cdiv(v_local, bwd_block))](
            student, t, tgt_local, coef, grad, T, student.stride(0), t.stride(0), width, v_local, inv_temp,
            HAS_TEACHER=use_teacher, BF16_OUT=student.dtype == torch.bfloat16, BLOCK=bwd_block,
            num_warps=cfg["num_warps"],
        )
        return (grad,) + nones


def triton_token_stats(student, teacher, targets, group, vocab_start: int, vocab_size: int, temperature: float,
                       check_finite: bool, *, block: Optional[int] = None, num_splits: Optional[int] = None):
    """The Triton path of `vocab_parallel_token_stats` (arguments already validated there): a tuple
    (logp, entropy) or (logp, entropy, teacher_logp, kl, forward_kl). `block` (columns per block, a power of 2) and
    `num_splits` (column splits per row in the forward) override the defaults; results do not depend on them
    beyond fp32 rounding."""
    if student.stride(-1) != 1:  # the kernels address rows by stride and columns contiguously
        student = student.contiguous()
    if teacher is not None and teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    return TritonTokenStats.apply(student, teacher, targets.long(), group, int(vocab_start), int(vocab_size),
                                  float(temperature), bool(check_finite), block, num_splits)
