"""Which implementation of the fused ops runs (`model.fused_kernels`), and the dispatch to it.

`resolve_fused_kernels(requested, device)` turns the config value into 'torch' or 'triton' for this process's
device. `rms_norm`, `swiglu` and `apply_rope` take that resolved backend and call the op's Triton kernel
(`rmsnorm.py`, `swiglu.py`, `rope.py`) or its torch fallback (today's unfused arithmetic, bit for bit).

Triton path details:
- inputs the kernels do not cover run the torch fallback silently: float64, a hidden size above `MAX_BLOCK`,
  RoPE tables whose dtype differs from `t`'s or that do not reshape to `[T, rot_dim]`;
- non-CUDA tensors run only under Triton's interpreter (TRITON_INTERPRET=1 set before this package is first
  imported: `INTERPRETED` records the mode the kernels were built in); otherwise a RuntimeError says so;
- a Triton compilation failure (`CompilationError`, `OutOfResources`, `PTXASError`) of an op's forward or backward
  kernel is logged once, with the error text, and that op runs its torch path from then on in this process (a failed
  backward kernel recomputes that call's gradient through the torch fallback).
"""

from __future__ import annotations

import torch

from dasd_megatron.errors import config_error

from .common import DISABLED, HAS_TRITON, INTERPRETED, guarded, interpret_env
from .rmsnorm import rms_norm_supported, rms_norm_torch, rms_norm_triton
from .rope import apply_rope_torch, apply_rope_triton, rope_supported
from .swiglu import swiglu_supported, swiglu_torch, swiglu_triton

# ----------------------------------------------------------------------------------------------- backend choice


def resolve_fused_kernels(requested: str, device) -> str:
    """`model.fused_kernels` for a process computing on `device`: 'torch' or 'triton'.

    'auto': 'triton' on a CUDA device when Triton imports, else 'torch'. 'triton': needs Triton and a CUDA device,
    or kernels built for Triton's interpreter (TRITON_INTERPRET=1 before this package was imported; tests);
    anything else raises a ConfigError (a ValueError) naming the field and the fix."""
    field = "model.fused_kernels"
    if requested not in ("auto", "torch", "triton"):
        raise config_error(field, requested, "unknown choice", "use auto, torch or triton")
    if requested == "torch":
        return "torch"
    dev = torch.device(device)
    if requested == "auto":
        return "triton" if dev.type == "cuda" and HAS_TRITON else "torch"
    if not HAS_TRITON:
        raise config_error(field, requested, "the triton package does not import in this environment",
                           "pip install triton (Linux), or use model.fused_kernels=auto or torch")
    if dev.type != "cuda" and not INTERPRETED:
        late = (" (TRITON_INTERPRET is set, but only after dasd_megatron.kernels was imported)"
                if interpret_env() else "")
        raise config_error(field, requested, f"Triton kernels need a CUDA device and this process computes on "
                           f"{dev}{late}", "use model.fused_kernels=auto (triton on CUDA, torch elsewhere) or torch; "
                           "to run the kernels on CPU in Triton's slow interpreter, set TRITON_INTERPRET=1 before "
                           "starting Python")
    return "triton"


def _use_triton(backend: str, t: torch.Tensor, op: str) -> bool:
    """True: run the Triton kernel of `op` on `t`; False: the torch fallback."""
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and (t.is_cuda or INTERPRETED) and op not in DISABLED
    if backend != "triton":
        raise ValueError(f"fused-kernel backend must be 'torch', 'triton' or 'auto', got {backend!r}")
    if op in DISABLED:
        return False
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' but triton does not import. Fix: pip install triton, or use "
                           "model.fused_kernels=torch")
    if not t.is_cuda and not INTERPRETED:
        raise RuntimeError(f"{op}: backend='triton' on a {t.device} tensor. Fix: move it to a CUDA device, set "
                           "TRITON_INTERPRET=1 before importing dasd_megatron.kernels (Triton's CPU interpreter), or "
                           "use model.fused_kernels=torch")
    return True


# ----------------------------------------------------------------------------------------------------- dispatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch") -> torch.Tensor:
    """`weight * (x / sqrt(mean(x^2, -1) + eps)).to(x.dtype)` (fp32 inside): `rmsnorm.rms_norm_triton` or
    `rmsnorm.rms_norm_torch` by `backend` ('torch', 'triton' or 'auto')."""
    if rms_norm_supported(x, weight) and _use_triton(backend, x, "rms_norm"):
        return guarded("rms_norm", lambda: rms_norm_triton(x, weight, eps), lambda: rms_norm_torch(x, weight, eps))
    return rms_norm_torch(x, weight, eps)


def swiglu(x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """`silu(a) * b` with `a, b = chunk(x, 2, -1)`: `swiglu.swiglu_triton` or `swiglu.swiglu_torch`."""
    if swiglu_supported(x) and _use_triton(backend, x, "swiglu"):
        return guarded("swiglu", lambda: swiglu_triton(x), lambda: swiglu_torch(x))
    return swiglu_torch(x)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """`t * cos + rotate_half(t) * sin` over the first `cos.shape[-1]` channels, the rest passed through:
    `rope.apply_rope_triton` or `rope.apply_rope_torch`."""
    if rope_supported(t, cos, sin) and _use_triton(backend, t, "apply_rope"):
        return guarded("apply_rope", lambda: apply_rope_triton(t, cos, sin), lambda: apply_rope_torch(t, cos, sin))
    return apply_rope_torch(t, cos, sin)




class FusedSwiGLU(torch.nn.Module):
    """megatron MLP activation (`MLPSubmodules.activation_func`, applied to the whole fc1 output when
    `TransformerConfig.use_te_activation_func` is set): `swiglu` with the config's `dasd_fused_kernels`
    backend ('triton' when the config does not say), read at each call like our RMSNorm."""

    def __init__(self, config=None, **kwargs):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, backend=getattr(self.config, "dasd_fused_kernels", None) or "triton")


__all__ = ["FusedSwiGLU", "apply_rope", "resolve_fused_kernels", "rms_norm", "swiglu"]
