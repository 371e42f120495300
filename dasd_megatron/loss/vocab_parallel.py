"""Vocab-parallel per-token statistics of the student and the (detached) teacher, over TP-sharded logits.

Each tensor-parallel rank holds a vocabulary shard of the logits, `[T, V_local]` (bf16, fp16 or fp32; float64 is
kept in float64 for `gradcheck`). Global column `vocab_start + j` is local column `j`; only the first
`width = clamp(vocab_size - vocab_start, 0, V_local)` local columns are real vocabulary: columns past the true
`vocab_size` (Megatron pads the vocabulary to a multiple of `tp * make_vocab_size_divisible_by`, padding at the
end) are ignored and get a zero gradient. Shards may be uneven (each rank passes its own `vocab_start`).

Math (fp32, per token t; `tau` is the rollout temperature, `z = logits / tau`, `w = z - m` with m the global max):

    lse_S = m_S + log sum_v exp(w_S)          p = softmax(z_S)     q = softmax(z_T)
    logp_t   = z_S[y_t] - lse_S                                    (student log-prob of the target)
    H_t      = lse_S - sum_v p z_S = log se_S - sum_v p w_S        (student entropy)
    tlogp_t  = z_T[y_t] - lse_T                                    (teacher log-prob, detached)
    KL_t     = sum_v p (log p - log q) = sum_v p (w_S - w_T) - log se_S + log se_T      KL(S || T)
    FKL_t    = sum_v q (log q - log p) = sum_v q (w_T - w_S) - log se_T + log se_S      KL(T || S)

Collectives, per chunk of tokens, all over `tp_group` (none when it is None or has one rank):

    1. all_reduce(MAX) of the stacked local maxima       [m_S; m_T]                         shape [2, C]
    2. all_reduce(SUM) of the stacked local sum-exps     [se_S; se_T]                       shape [2, C]
    3. all_reduce(SUM) of the stacked per-token partials [w_S[y], sum p w_S, w_T[y], sum p w_T, sum q w_S,
                                                          sum q w_T]                          shape [6, C]

(without a teacher the stacks have 1, 1 and 2 rows). Backward needs no collective: with the global per-token
scalars every term is shard-local (upstream gradients g_*, onehot = the target's indicator on this shard):

    d logp / dz_S = onehot - p
    d H    / dz_S = -p (log p + H)
    d KL   / dz_S = p (log p - log q - KL)
    d FKL  / dz_S = p - q
    d / d logits  = (d / dz_S) / tau

Memory: forward saves the input logits (by reference, no copy) and per-token scalars (lse_S, lse_T, H, KL), never a
softmax; backward recomputes p and q chunk by chunk. Transient memory is a few fp32 `[chunk, width]` buffers; the
default chunk size keeps one at about 2**24 values (64 MiB) on CUDA, 2**20 on CPU. Inputs are never modified in place.

Non-finite logits (NaN or +-inf in the valid columns, after temperature) make the per-token results non-finite on
every TP rank alike (NaN propagates through the SUM all-reduces); the forward checks its outputs once (one host sync)
and raises `NonFiniteLogitsError` naming the tensor and the count of bad values summed over the TP group.
Targets must lie in [0, vocab_size) or be negative (ignored position: logp = tlogp = 0, no gradient).

Optional `compile=True` wraps the per-chunk math in `torch.compile` (meant for CUDA, where it fuses each pass into
one kernel and no fp32 chunk temporaries exist); the eager path is the reference that the CPU tests run. Measured on
an H200 (bench/loss.py, T=16384, V=151936, bf16, forward+backward of logp, H, KL, FKL): naive fp32 194 ms and
74 GiB extra; eager chunked 314 ms; compiled 43 ms and 0.75 GiB extra beyond the bf16 logits gradient. Use the
compiled path on CUDA; the eager path is for CPUs and for checking.

`kernel_backend` picks the implementation: 'torch' is this module (the reference); 'triton' is
`triton_kernels.py`, the same outputs from one streaming pass over the logits in each direction with two
collectives per call (CUDA, or CPU under TRITON_INTERPRET=1); 'auto' (the default) is the torch path for now: the
Triton kernels are tested on CPU in Triton's interpreter and compiled for sm_90, but have not yet run on a GPU, so
they are opt-in (`loss.kernel_backend=triton`) until a GPU check and benchmark make them the CUDA default. float64 inputs always take the torch path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

__all__ = ["KERNEL_BACKENDS", "TokenStats", "NonFiniteLogitsError", "vocab_parallel_token_stats",
           "default_chunk_size"]

KERNEL_BACKENDS = ("auto", "torch", "triton")

# Values in one fp32 chunk temporary for the automatic chunk size. CUDA: 2**24 (64 MiB; the caching allocator reuses
# the blocks). CPU: 2**20 (4 MiB): larger blocks are mmap'd and page-faulted afresh by glibc on every allocation,
# which made a T=2048, V=32000 step 6x slower at 2**24 than at 2**20 on a 2-core machine.
# Compiled (CUDA): the per-chunk math is fused, no fp32 [chunk, width] temporary exists, so chunks are larger (2**27
# values, ~880 tokens at V=152k): fewer, fuller kernels. On an H200, T=16384, V=151936, bf16: 1024-token chunks ran
# 42 ms vs 167 ms with 110-token chunks.
_CHUNK_VALUES = {"cuda": 1 << 24, "cpu": 1 << 20, "compiled": 1 << 27}


class NonFiniteLogitsError(ValueError):
    """Raised when the logits given to the vocab-parallel kernels hold NaN or +-inf values."""


class TokenStats(NamedTuple):
    """Per-token outputs of `vocab_parallel_token_stats`, each of shape [T] in fp32 (fp64 for fp64 inputs).

    logp, entropy, kl and forward_kl carry autograd to the student logits; teacher_logp is detached. Teacher fields
    are None when no teacher logits were given.
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    teacher_logp: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    forward_kl: Optional[torch.Tensor] = None


def default_chunk_size(width: int, device: "torch.device | str" = "cuda", compiled: bool = False) -> int:
    """Tokens per chunk so that one fp32 `[chunk, width]` temporary holds about 2**24 values on CUDA (2**20 on
    CPU; 2**27 when the chunk math is compiled and fused). `width` must be the same on every TP rank (the forward
    passes ceil(vocab_size / tp))."""
    if torch.device(device).type == "cpu":
        values = _CHUNK_VALUES["cpu"]
    else:
        values = _CHUNK_VALUES["compiled" if compiled else "cuda"]
    return max(1, values // max(int(width), 1))


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
    """d/dlogits of sum_t [g_lp logp + g_H H + g_KL KL + g_F FKL] for one chunk.

    Expanding the four shard-local gradients:  dz = p * (c_logp log p + c_logq log q + c_const) - c_q q + g_y onehot
    with c_logp = g_KL - g_H, c_logq = -g_KL, c_const = -g_H H - g_KL KL - g_lp + g_F, c_q = g_F, g_y = g_lp on
    the shard holding the target (0 elsewhere). Then d/dlogits = dz / temp.
    """
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


def _world(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _count_nonfinite(x: torch.Tensor, width: int, temp: float, cdtype, chunk: int) -> torch.Tensor:
    """Number of values of x[:, :width] / temp that are NaN or +-inf (chunked; error path only)."""
    n = torch.zeros((), dtype=torch.int64, device=x.device)
    for c0 in range(0, x.shape[0], chunk):
        n = n + (~torch.isfinite(x[c0 : c0 + chunk, :width].to(cdtype) / temp)).sum()
    return n


def _raise_if_nonfinite(outs, has_teacher, targets, vocab_size, student, teacher, width, temp, cdtype, chunk, group):
    """The forward's output check (one host sync): raise ValueError on targets >= vocab_size, and
    `NonFiniteLogitsError` with the counts of bad logits over the TP group when an output is not finite."""
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
                _count_nonfinite(student, width, temp, cdtype, chunk),
                _count_nonfinite(teacher, width, temp, cdtype, chunk)
                if has_teacher
                else torch.zeros((), dtype=torch.int64, device=dev),
            ]
        )
        _all_reduce(counts, dist.ReduceOp.SUM, group)
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


def _function_outputs(ctx, outs: torch.Tensor, has_teacher: bool) -> tuple:
    """The autograd Function's outputs from the `[5, T]` (or `[2, T]`) stack: logp, entropy (and teacher_logp,
    marked non-differentiable, KL, forward KL), as fresh tensors; grads are not materialised for unused outputs."""
    ctx.set_materialize_grads(False)
    if has_teacher:
        tlogp = outs[2].clone()
        ctx.mark_non_differentiable(tlogp)
        return outs[0].clone(), outs[1].clone(), tlogp, outs[3].clone(), outs[4].clone()
    return outs[0].clone(), outs[1].clone()


def _grad_coefficients(outs, valid_tgt, has_tgt, has_teacher, g_lp, g_h, rest, cdtype):
    """Per-token coefficients of the backward (see `_grad_chunk`) from the upstream gradients (None = zero):
    (c_logp, c_logq, c_const, c_q, g_y, use_teacher); use_teacher is False when no KL gradient came back, and the
    teacher logits need not be read."""
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


class _VocabParallelTokenStats(torch.autograd.Function):
    """Autograd function behind `vocab_parallel_token_stats` (see the module docstring for math and collectives).

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
        chunk = chunk or default_chunk_size(-(-vocab_size // _world(group)), dev, compile)

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
            _all_reduce(m, dist.ReduceOp.MAX, group)  # collective 1: stacked maxima
            se = k["sumexp"](s, t, m, temp, cdtype) if width > 0 else torch.zeros(nrow, C, dtype=cdtype, device=dev)
            _all_reduce(se, dist.ReduceOp.SUM, group)  # collective 2: stacked sum-exps
            log_se = torch.log(se)
            if width > 0:
                part = k["partials"](s, t, m, log_se, tgt_local[c0:c1], has_tgt[c0:c1], temp, cdtype)
            else:
                part = torch.zeros(3 * nrow if has_teacher else 2, C, dtype=cdtype, device=dev)
            _all_reduce(part, dist.ReduceOp.SUM, group)  # collective 3: stacked per-token partials
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
            _raise_if_nonfinite(outs, has_teacher, targets, vocab_size, student, teacher, width, temp, cdtype, chunk,
                                group)

        ctx.save_for_backward(student, teacher if has_teacher else None, tgt_local, has_tgt, valid_tgt, lse, outs)
        ctx.meta = (width, temp, chunk, cdtype, compile, has_teacher)
        return _function_outputs(ctx, outs, has_teacher)

    @staticmethod
    def backward(ctx, g_lp, g_h, *rest):
        student, teacher, tgt_local, has_tgt, valid_tgt, lse, outs = ctx.saved_tensors
        width, temp, chunk, cdtype, compile, has_teacher = ctx.meta
        nones = (None,) * 9
        if not ctx.needs_input_grad[0]:
            return (None,) + nones
        c_logp, c_logq, c_const, g_fkl, g_y, use_teacher = _grad_coefficients(
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


@functools.lru_cache(maxsize=None)
def _triton_imports() -> bool:
    """Whether `import triton` works here (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(backend: str, logits: torch.Tensor) -> bool:
    """Resolve `kernel_backend` for these logits; raise when 'triton' cannot run here."""
    if backend == "torch" or logits.dtype == torch.float64:
        return False
    if backend == "auto":  # the torch path until the Triton kernels are measured and checked on a GPU
        return False
    if not _triton_imports():
        raise RuntimeError(
            "kernel_backend='triton': the triton package does not import here. Fix: pip install triton (Linux), "
            "or use kernel_backend='auto' or 'torch'"
        )
    if not logits.is_cuda:
        from .triton_kernels import INTERPRETED

        if not INTERPRETED:
            raise RuntimeError(
                f"kernel_backend='triton' got logits on {logits.device}: the Triton kernels run on CUDA devices, and "
                "elsewhere only under Triton's interpreter. Fix: move the logits to a CUDA device, set "
                "TRITON_INTERPRET=1 before dasd_megatron.loss.triton_kernels is first imported (tests), or use "
                "kernel_backend='auto' or 'torch'"
            )
    return True


def vocab_parallel_token_stats(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    targets: torch.Tensor,
    tp_group: Optional["dist.ProcessGroup"] = None,
    *,
    vocab_start: int = 0,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    check_finite: bool = True,
    compile: bool = False,
    kernel_backend: str = "auto",
) -> TokenStats:
    """Per-token student log-prob, entropy, teacher log-prob, KL(S||T) and KL(T||S) over a TP-sharded vocabulary.

    Args:
        student_logits: `[T, V_local]` this rank's vocabulary shard of the student logits (any float dtype; math in
            fp32). Flatten `[B, S, V_local]` or `[S, B, V_local]` to `[T, V_local]` first. Gradient flows here.
        teacher_logits: `[T, V_local]` the teacher's logits aligned row by row with the student's (same vocabulary
            shard), or None. Treated as constant (stop-gradient); see `cp_align` for context parallelism.
        targets: `[T]` int64 global token ids (the sampled tokens y_t); a negative id marks an ignored position.
        tp_group: the tensor-parallel group the vocabulary is sharded over; None for an unsharded vocabulary.
        vocab_start: global id of this shard's first column (Megatron: `tp_rank * V_local`).
        vocab_size: the true (unpadded) global vocabulary size; columns at ids >= vocab_size are ignored.
            Defaults to `vocab_start + V_local` (only meaningful without TP).
        temperature: the rollout temperature; logits are divided by it before anything else.
        chunk_size: tokens per chunk (None: `default_chunk_size`, ~2**24 fp32 values per temporary on CUDA).
        check_finite: raise `NonFiniteLogitsError` on NaN/inf logits (costs one host sync per call).
        compile: wrap the per-chunk math in `torch.compile` (CUDA; torch backend only).
        kernel_backend: 'torch' (this module's chunked kernels, the reference), 'triton' (`triton_kernels`: one
            streaming pass over the logits per direction, two collectives per call; CUDA, or CPU under
            TRITON_INTERPRET=1), or 'auto' (for now the torch path; see the module docstring). float64
            inputs always take the torch path. `chunk_size` and `compile` apply to the torch backend only.

    Returns:
        `TokenStats(logp, entropy, teacher_logp, kl, forward_kl)`, each `[T]`; teacher fields are None without a
        teacher. Every TP rank returns the same values.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [T, V_local], got shape {tuple(student_logits.shape)}")
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}")
    T, v_local = student_logits.shape
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
                f"{tuple(student_logits.shape)}; align the teacher rows to the student tokens first (cp_align)"
            )
        teacher_logits = teacher_logits.detach()
    if targets.shape != (T,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an int64 tensor of shape [{T}], got {targets.dtype} {tuple(targets.shape)}")
    if vocab_size is None:
        if _world(tp_group) > 1:
            raise ValueError("vocab_size (the true global vocabulary size) is required when tp_group has > 1 rank")
        vocab_size = vocab_start + v_local
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {kernel_backend!r}")
    if _use_triton(kernel_backend, student_logits):
        from .triton_kernels import triton_token_stats

        out = triton_token_stats(student_logits, teacher_logits, targets, tp_group, vocab_start, vocab_size,
                                 temperature, check_finite)
        return TokenStats(*out)
    out = _VocabParallelTokenStats.apply(
        student_logits, teacher_logits, targets.long(), tp_group, int(vocab_start), int(vocab_size),
        float(temperature), chunk_size, bool(check_finite), bool(compile),
    )
    return TokenStats(*out)
