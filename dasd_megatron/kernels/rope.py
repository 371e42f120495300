"""Rotary position embedding (megatron's non-interleaved layout): one Triton kernel for forward and backward, and
the torch fallback.

t `[T, heads, D]`, cos and sin `[T, 1, R]` in t's dtype (megatron: `cos(freqs).to(dtype)` with
freqs = cat(theta, theta)), R = rot_dim <= D, h = R / 2. On the first R channels (t1 = t[..., :h], t2 = t[..., h:R],
c1, c2, s1, s2 the halves of cos and sin):

    out = t * cos + rotate_half(t) * sin,   rotate_half(x) = cat(-x2, x1)
        i.e. out1 = t1 c1 - t2 s1,   out2 = t2 c2 + t1 s2

and out[..., R:] = t[..., R:] (megatron's `t_pass`). Backward (grad wrt t only; the tables get none):

    dt = dy * cos + rotate_half^T(dy * sin),   rotate_half^T(z) = cat(z2, -z1)
        i.e. dt1 = dy1 c1 + dy2 s2,   dt2 = dy2 c2 - dy1 s1,   dt[..., R:] = dy[..., R:]

The kernel rounds every product and the sum to t's dtype exactly as torch's separate ops do (`t * cos`, `. * sin`,
`+`), so in bf16/fp16 its result equals the torch path bit for bit (the products of two bf16 values are exact in
fp32); in fp32 the GPU compiler may fuse a product and the sum into an FMA (one rounding fewer).

Kernel: grid (T, head blocks): a program loads its token's cos/sin row once and rotates BLOCK_H heads (all heads
of the token on a GPU when heads * h <= 2048 elements). Traffic: read t, write out (and the tables, T R elements).
"""

from __future__ import annotations

import torch

from .common import (HAS_TRITON, INTERPRETED, dtype_kind, guarded, launch_warps, next_pow2, rounded, tl,
                     torch_grads, triton)

__all__ = ["TritonRoPE", "apply_rope_torch", "apply_rope_triton", "rope_supported"]


def apply_rope_torch(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's `_apply_rotary_pos_emb_bshd` arithmetic (non-interleaved) on precomputed cos/sin, bit for bit."""
    rot_dim = cos.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = torch.chunk(t, 2, dim=-1)
    t = (t * cos) + (torch.cat((-x2, x1), dim=-1) * sin)
    return torch.cat((t, t_pass), dim=-1)


if HAS_TRITON:

    @triton.jit
    def rope_kernel(t_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, half, n_pass, stride_tt, stride_th, stride_ct,
                    stride_st, BACKWARD: tl.constexpr, KIND: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
        """Token pid(0), heads [pid(1) * BLOCK_H, +BLOCK_H): out (contiguous `[T, heads, 2 half + n_pass]`) of the
        module docstring from t (strides stride_tt, stride_th, 1); BACKWARD: t is dy and out is dt."""
        tok = tl.program_id(0).to(tl.int64)
        heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)
        hmask = heads < n_heads
        jmask = j < half
        mask = hmask[:, None] & jmask[None, :]
        c_row = cos_ptr + tok * stride_ct
        s_row = sin_ptr + tok * stride_st
        c1 = tl.load(c_row + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(c_row + half + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(s_row + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(s_row + half + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        src = t_ptr + tok * stride_tt + heads[:, None] * stride_th + j[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = rounded(rounded(x1 * c1, KIND) + rounded(x2 * s2, KIND), KIND)
            o2 = rounded(rounded(x2 * c2, KIND) - rounded(x1 * s1, KIND), KIND)
        else:
            o1 = rounded(rounded(x1 * c1, KIND) - rounded(x2 * s1, KIND), KIND)
            o2 = rounded(rounded(x2 * c2, KIND) + rounded(x1 * s2, KIND), KIND)
        width = 2 * half + n_pass
        dst = out_ptr + (tok * n_heads + heads[:, None]) * width + j[None, :]
        tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, o2.to(out_ptr.dtype.element_ty), mask=mask)
        if BLOCK_PASS > 0:  # channels past rot_dim: copied
            p = tl.arange(0, BLOCK_PASS)
            pmask = hmask[:, None] & (p < n_pass)[None, :]
            v = tl.load(t_ptr + tok * stride_tt + heads[:, None] * stride_th + 2 * half + p[None, :], mask=pmask)
            tl.store(out_ptr + (tok * n_heads + heads[:, None]) * width + 2 * half + p[None, :], v, mask=pmask)


def _launch(n_heads: int, half: int, n_pass: int):
    """(BLOCK_H, BLOCK_HALF, BLOCK_PASS, num_warps). Interpreter (tests): 2 heads a program, so 3 heads span two
    head blocks, the second masked."""
    bh = next_pow2(half)
    bp = next_pow2(n_pass) if n_pass else 0
    if INTERPRETED:
        return 2, bh, bp, 1
    block_h = max(1, min(next_pow2(n_heads), 2048 // bh))
    return block_h, bh, bp, launch_warps(block_h * bh)


def _tables(cos: torch.Tensor, T: int) -> torch.Tensor:
    c = cos.reshape(T, cos.shape[-1])
    return c if c.stride(-1) == 1 else c.contiguous()


def rope_supported(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The Triton path covers these inputs (else the dispatch runs `apply_rope_torch`): t `[T, ..., D]` in
    fp32/bf16/fp16, cos and sin of t's dtype and device with `T * R` elements (`[T, 1, R]`, ...), R even, R <= D."""
    if t.dim() < 2 or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    R = cos.shape[-1] if cos.dim() else 0
    return (cos.dtype == sin.dtype == t.dtype and cos.device == sin.device == t.device and cos.shape == sin.shape
            and 0 < R <= t.shape[-1] and R % 2 == 0 and cos.numel() == t.shape[0] * R
            and (cos.dim() == 1 or cos.shape[0] == t.shape[0]))


class TritonRoPE(torch.autograd.Function):
    """`apply_rope_triton`'s autograd function: saves cos and sin (`[T, R]` views)."""

    @staticmethod
    def _run(x, cos2, sin2, backward):
        T, D = x.shape[0], x.shape[-1]
        x3 = x.reshape(T, -1, D)
        if x3.stride(-1) != 1:
            x3 = x3.contiguous()
        H = x3.shape[1]
        half = cos2.shape[-1] // 2
        n_pass = D - 2 * half
        out = torch.empty(T, H, D, dtype=x.dtype, device=x.device)
        block_h, bh, bp, warps = _launch(H, half, n_pass)
        if T and H:
            rope_kernel[(T, triton.cdiv(H, block_h))](
                x3, cos2, sin2, out, H, half, n_pass, x3.stride(0), x3.stride(1), cos2.stride(0), sin2.stride(0),
                BACKWARD=backward, KIND=dtype_kind(x.dtype), BLOCK_H=block_h, BLOCK_HALF=bh, BLOCK_PASS=bp,
                num_warps=warps)
        return out.view(x.shape)

    @staticmethod
    def forward(ctx, t, cos, sin):
        T = t.shape[0]
        cos2, sin2 = _tables(cos, T), _tables(sin, T)
        ctx.save_for_backward(cos2, sin2)
        ctx.shape = t.shape
        return TritonRoPE._run(t, cos2, sin2, False)

    @staticmethod
    def backward(ctx, dy):
        cos2, sin2 = ctx.saved_tensors
        T, D = ctx.shape[0], ctx.shape[-1]

        def fallback():
            # the map is linear in t: its gradient does not depend on t's values, zeros stand in for them
            dy3 = dy.reshape(T, -1, D)
            c3, s3 = cos2.unsqueeze(1), sin2.unsqueeze(1)
            return torch_grads(lambda a: apply_rope_torch(a, c3, s3), (torch.zeros_like(dy3),), (True,),
                               dy3)[0].reshape(ctx.shape)

        return guarded("apply_rope", lambda: TritonRoPE._run(dy, cos2, sin2, True), fallback), None, None


def apply_rope_triton(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of `t` `[T, heads, D]` (any strides; the middle dims may be several or none) with `[T, 1, R]` cos/sin
    tables (see `rope_supported`) by the Triton kernel of the module docstring; gradient wrt `t` only."""
    return TritonRoPE.apply(t, cos, sin)
