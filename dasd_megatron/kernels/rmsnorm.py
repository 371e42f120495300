"""RMSNorm: one Triton kernel for the forward, one for the backward (Liger-Kernel's layout), and the torch fallback.

Over the last dimension (N = hidden), per row, in fp32 on the input values:

    rstd = 1 / sqrt(mean(x^2) + eps)        x_hat = x * rstd        y = w * c(x_hat)

where c() is the cast to x's dtype (today's `RMSNorm.forward`: `weight * y.to(x.dtype)`), so y is rounded twice,
as torch does: x_hat to x's dtype, then `w * .` to the output dtype (torch's promotion of w's and x's dtypes).

Backward, with the cast treated as the identity (torch's autograd does the same: the gradient of `.to()` is a cast
back), g = w * dy (fp32):

    dx = rstd * (g - x_hat * mean(g * x_hat))           (d x_hat_j / d x_i = rstd (delta_ij - x_hat_i x_hat_j / N))
    dw = sum over rows of dy * c(x_hat)                  (fp32 accumulation; c(x_hat) is what multiplied w)

dx is rounded to x's dtype, dw to w's dtype.

Kernels. Forward: one program per block of BLOCK_R rows, each row held whole in registers (BLOCK = next power of 2
>= N, at most `MAX_BLOCK`); it writes y and rstd `[rows]` fp32 (saved for the backward with x and w: no x_hat is
kept). Backward: a fixed number of programs (a few per SM) stride over the row blocks, each writing dx and keeping
a running fp32 dw partial in registers; the `[programs, N]` partials are summed by torch. Memory traffic: forward
reads x once and writes y once; backward reads x and dy once and writes dx once (plus O(rows + programs * N)).
"""

from __future__ import annotations

import torch

from .common import (HAS_TRITON, INTERPRETED, MAX_BLOCK, as_rows, dtype_kind, guarded, launch_warps,
                     next_pow2, rounded, sm_count, tl, torch_grads, triton)

__all__ = ["TritonRMSNorm", "rms_norm_supported", "rms_norm_torch", "rms_norm_triton"]


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Today's RMSNorm math (`dasd_megatron.model.norm.RMSNorm.forward`), bit for bit."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, stride_x, eps,
                            X_KIND: tl.constexpr, Y_KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
        """Rows [pid * BLOCK_R, +BLOCK_R) of the `[n_rows, n_cols]` x (row stride `stride_x`): y (contiguous) and
        rstd (fp32) of the module docstring."""
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        rmask = rows < n_rows
        cmask = cols < n_cols
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = rounded(w[None, :] * rounded(x * rstd[:, None], X_KIND), Y_KIND)
        tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, stride_dy, stride_x,
                            X_KIND: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK: tl.constexpr):
        """Row blocks pid, pid + programs, ...: dx (contiguous, x's dtype) of the module docstring, and this
        program's fp32 dw partial in row `pid` of the `[programs, n_cols]` dw_ptr (when COMPUTE_DW)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cmask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for rb in range(pid, tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
            rows = (rb * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
            rmask = rows < n_rows
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            x_hat = x * rstd[:, None]
            g = dy * w[None, :]
            c = tl.sum(g * x_hat, axis=1) / n_cols
            dx = rounded((g - x_hat * c[:, None]) * rstd[:, None], X_KIND)
            tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += tl.sum(dy * rounded(x_hat, X_KIND), axis=0)
        if COMPUTE_DW:
            tl.store(dw_ptr + pid * n_cols + cols, dw, mask=cmask)


def _launch(n_cols: int, device: torch.device):
    """(BLOCK, BLOCK_R, num_warps, backward programs cap). GPU: tiles of about 4096 elements; interpreter (tests):
    2 rows per block and 2 backward programs, so odd row counts leave a masked row and the dw partials are summed."""
    block = next_pow2(n_cols)
    if INTERPRETED:
        return block, 2, 1, 2
    block_r = max(1, min(16, 4096 // block))
    return block, block_r, launch_warps(block * block_r), 4 * sm_count(device)


def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton path covers these inputs (else the dispatch runs `rms_norm_torch`)."""
    n = x.shape[-1] if x.dim() else 0
    return (x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and x.dim() >= 1 and weight.dim() == 1 and weight.shape[0] == n and 0 < n and next_pow2(n) <= MAX_BLOCK
            and weight.device == x.device)


class TritonRMSNorm(torch.autograd.Function):
    """`rms_norm_triton`'s autograd function: saves x (as `[rows, N]`), w and rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        x2 = as_rows(x, n)
        w = weight.contiguous()
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        rows = x2.shape[0]
        y = torch.empty(rows, n, dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block, block_r, warps, _ = _launch(n, x.device)
        if rows:
            rms_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
                x2, w, y, rstd, rows, n, x2.stride(0), float(eps), X_KIND=dtype_kind(x.dtype),
                Y_KIND=dtype_kind(out_dtype), BLOCK_R=block_r, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = x.shape
        ctx.eps = eps
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        rows, n = x2.shape
        need_dw = ctx.needs_input_grad[1]

        def launch():
            dy2 = as_rows(dy, n)
            dx = torch.empty(rows, n, dtype=x2.dtype, device=x2.device)
            block, block_r, warps, cap = _launch(n, x2.device)
            progs = max(1, min(cap, triton.cdiv(rows, block_r)))
            part = torch.zeros(progs, n, dtype=torch.float32, device=x2.device) if need_dw else dx
            if rows:
                rms_norm_bwd_kernel[(progs,)](
                    dy2, x2, w, rstd, dx, part, rows, n, dy2.stride(0), x2.stride(0), X_KIND=dtype_kind(x2.dtype),
                    COMPUTE_DW=need_dw, BLOCK_R=block_r, BLOCK=block, num_warps=warps)
            dw = part.sum(0).to(w.dtype) if need_dw else None
            return dx.view(ctx.shape), dw

        def fallback():
            dx, dw = torch_grads(lambda a, b: rms_norm_torch(a, b, ctx.eps), (x2, w), (True, need_dw),
                                 dy.reshape(rows, n))
            return dx.view(ctx.shape), dw

        dx, dw = guarded("rms_norm", launch, fallback)
        return dx, dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of `x` (any leading dims, any strides; fp32/bf16/fp16) with a `[N]` weight, by the
    Triton kernels of the module docstring; same values and dtype as `rms_norm_torch` up to fp32 rounding."""
    return TritonRMSNorm.apply(x, weight, eps)
