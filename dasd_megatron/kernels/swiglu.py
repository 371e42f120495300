"""SwiGLU: one Triton kernel for the forward, one for the backward (Liger-Kernel's layout), and the torch fallback.

megatron's gated-linear-unit activation on the fc1 output x `[..., 2f]` (`x_glu, x_lin = chunk(x, 2, -1)`):

    a = x[..., :f]      b = x[..., f:]      s = sigmoid(a)      y = c(c(a s) b)

in fp32 on the input values, c() the cast to x's dtype: torch's `F.silu(a) * b` rounds silu(a) and then the
product. Backward (recomputes s from x, the only saved tensor):

    da = dy b s (1 + a (1 - s))        db = dy c(a s)                 dx = [da, db]  (one `[..., 2f]` buffer)

(d silu/da = s + a s (1 - s); c(a s) is the value that multiplied b). Both rounded to x's dtype.

Kernels: grid (rows, column blocks of BLOCK <= 1024 of f); purely elementwise. Traffic: forward reads x, writes y
(3 f elements a row); backward reads x and dy, writes dx (5 f).
`FusedSwiGLU` is the module megatron's MLP builds as its activation (`use_te_activation_func`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (HAS_TRITON, INTERPRETED, as_rows, dtype_kind, guarded, launch_warps, next_pow2,
                     rounded, tl, torch_grads, triton)

__all__ = ["FusedSwiGLU", "TritonSwiGLU", "swiglu_supported", "swiglu_torch", "swiglu_triton"]


def swiglu_torch(x: torch.Tensor) -> torch.Tensor:
    """megatron's SwiGLU (`chunk`, `silu`, `*`), bit for bit."""
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * b


if HAS_TRITON:

    @triton.jit
    def swiglu_fwd_kernel(x_ptr, y_ptr, n_cols, stride_x, KIND: tl.constexpr, BLOCK: tl.constexpr):
        """Row pid(0), columns [pid(1) * BLOCK, +BLOCK) of y `[rows, n_cols]` (contiguous) from x `[rows,
        2 n_cols]` (row stride `stride_x`)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        src = x_ptr + row * stride_x + cols
        a = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(src + n_cols, mask=mask, other=0.0).to(tl.float32)
        y = rounded(rounded(a * tl.sigmoid(a), KIND) * b, KIND)
        tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n_cols, stride_dy, stride_x, KIND: tl.constexpr,
                          BLOCK: tl.constexpr):
        """dx `[rows, 2 n_cols]` (contiguous): da in the first n_cols columns, db in the last (module docstring)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        src = x_ptr + row * stride_x + cols
        a = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(src + n_cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        da = rounded(dy * b * s * (1.0 + a * (1.0 - s)), KIND)
        db = rounded(dy * rounded(a * s, KIND), KIND)
        dst = dx_ptr + row * (2 * n_cols) + cols
        tl.store(dst, da.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + n_cols, db.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(f: int):
    """(BLOCK, num_warps). Interpreter (tests): 16 columns, so f = 48 spans 3 column blocks and f = 20 masks."""
    if INTERPRETED:
        return 16, 1
    block = min(1024, next_pow2(f))
    return block, launch_warps(block)


def swiglu_supported(x: torch.Tensor) -> bool:
    """The Triton path covers these inputs (else the dispatch runs `swiglu_torch`)."""
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.dim() >= 1 and x.shape[-1] % 2 == 0


class TritonSwiGLU(torch.autograd.Function):
    """`swiglu_triton`'s autograd function: saves only x (as `[rows, 2f]`)."""

    @staticmethod
    def forward(ctx, x):
        two_f = x.shape[-1]
        f = two_f // 2
        x2 = as_rows(x, two_f)
        rows = x2.shape[0]
        y = torch.empty(rows, f, dtype=x.dtype, device=x.device)
        block, warps = _launch(f)
        if rows and f:
            swiglu_fwd_kernel[(rows, triton.cdiv(f, block))](x2, y, f, x2.stride(0), KIND=dtype_kind(x.dtype),
                                                             BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        rows, two_f = x2.shape
        f = two_f // 2

        def launch():
            dy2 = as_rows(dy, f)
            dx = torch.empty(rows, two_f, dtype=x2.dtype, device=x2.device)
            block, warps = _launch(f)
            if rows and f:
                swiglu_bwd_kernel[(rows, triton.cdiv(f, block))](dy2, x2, dx, f, dy2.stride(0), x2.stride(0),
                                                                 KIND=dtype_kind(x2.dtype), BLOCK=block,
                                                                 num_warps=warps)
            return dx

        def fallback():
            return torch_grads(swiglu_torch, (x2,), (True,), dy.reshape(rows, f))[0]

        return guarded("swiglu", launch, fallback).view(ctx.shape)


def swiglu_triton(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of `x` `[..., 2f]` -> `[..., f]` (any leading dims and strides; fp32/bf16/fp16) by the Triton kernels
    of the module docstring; the values of `swiglu_torch` up to fp32 rounding (and the exp)."""
    return TritonSwiGLU.apply(x)
