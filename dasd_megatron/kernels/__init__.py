"""Fused Triton kernels for the transformer layer's elementwise ops (Liger-Kernel's habit), with torch fallbacks.

Each op has a torch fallback that is today's unfused arithmetic bit for bit, and a Triton path (one kernel for the
forward, one for the backward, in a `torch.autograd.Function`); the math is in each module's docstring.

    rmsnorm.py   rms_norm_torch / rms_norm_triton (x, weight, eps)      y = w * c(x / rms(x))
    swiglu.py    swiglu_torch / swiglu_triton (x)                        y = silu(a) * b, [a, b] = x
    rope.py      apply_rope_torch / apply_rope_triton (t, cos, sin)      y = t cos + rotate_half(t) sin (+ pass-through)
    select.py    resolve_fused_kernels(requested, device)                `model.fused_kernels` -> 'torch' | 'triton'
                 rms_norm, swiglu, apply_rope (..., backend)             dispatch, with the compile-failure fallback
                 FusedSwiGLU                                             the MLP activation module (model/specs.py)
    common.py    what the kernels share: Triton import state, rounding, launch helpers, compile-failure record

Non-CUDA tensors run the Triton kernels only under Triton's interpreter: TRITON_INTERPRET=1 before this package is
first imported (`INTERPRETED`). Benchmark: `bench/fused_kernels.py`; tests: `tests/test_kernels.py`.
"""

# The submodules first: importing `.swiglu` binds the package attribute `swiglu` to the module, and the dispatch
# function of the same name must be bound after it (a later `from .swiglu import ...` does not rebind it).
from .rmsnorm import rms_norm_torch, rms_norm_triton
from .rope import apply_rope_torch, apply_rope_triton
from .swiglu import swiglu_torch, swiglu_triton
from .common import HAS_TRITON, INTERPRETED, disabled_ops
from .select import FusedSwiGLU, apply_rope, resolve_fused_kernels, rms_norm, swiglu

__all__ = ["FusedSwiGLU", "HAS_TRITON", "INTERPRETED", "apply_rope", "apply_rope_torch", "apply_rope_triton",
           "disabled_ops", "resolve_fused_kernels", "rms_norm", "rms_norm_torch", "rms_norm_triton", "swiglu",
           "swiglu_torch", "swiglu_triton"]
