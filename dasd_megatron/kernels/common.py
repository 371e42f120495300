"""What the Triton kernels of this package share (a leaf module: the kernels and `select.py` import it).

Whether Triton imports (`HAS_TRITON`) and in which mode the kernels were built (`INTERPRETED`: TRITON_INTERPRET=1 set
before this package was first imported); `rounded` (round-to-nearest-even to the output precision) and
`dtype_kind`; the compile-failure bookkeeping (`disable`, `disabled_ops`, `guarded`); launch helpers.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch


log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # not installed (e.g. macOS): only the torch fallbacks exist
    triton = tl = InterpretedFunction = None

HAS_TRITON = triton is not None
"""Triton imports in this process."""

MAX_BLOCK = 65536
"""Largest power-of-2 row block (elements) the kernels hold in registers; wider rows take the torch path."""

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_kind(dtype: torch.dtype) -> int:
    """The `rounded` code of a dtype the kernels support (fp32 0, bf16 1, fp16 2)."""
    return _KIND[dtype]


if HAS_TRITON:

    @triton.jit
    def rounded(x, KIND: tl.constexpr):
        """fp32 `x` rounded to nearest (ties to even) to the precision of KIND (0 fp32: unchanged, 1 bf16,
        2 fp16), returned as fp32, so that a later store in that dtype is exact. This is torch's cast (and the
        GPU's); the bf16 case is done on the bits because the interpreter's own fp32 -> bf16 conversion truncates.
        NaN stays NaN, overflow goes to inf."""
        if KIND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            y = tl.where(x != x, x, r.to(tl.float32, bitcast=True))
        elif KIND == 2:
            y = x.to(tl.float16).to(tl.float32)
        else:
            y = x
        return y

    INTERPRETED = isinstance(rounded, InterpretedFunction)
else:
    rounded = None
    INTERPRETED = False


def compile_errors() -> tuple:
    """The exception types that mean "this Triton kernel does not build here" (not bugs in the inputs)."""
    if not HAS_TRITON:
        return ()
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors as rt_errors

    return tuple(e for e in (CompilationError, getattr(rt_errors, "OutOfResources", None),
                             getattr(rt_errors, "PTXASError", None)) if e is not None)


COMPILE_ERRORS = compile_errors()
DISABLED: dict = {}  # op name -> the error text that switched it to its torch path


def disabled_ops() -> dict:
    """{op: error text} of the ops whose Triton kernels failed to compile in this process (a copy)."""
    return dict(DISABLED)


def disable(op: str, err: BaseException) -> None:
    """Switch `op` to its torch path for the rest of this process; logs one warning with the error text."""
    if op in DISABLED:
        return
    DISABLED[op] = f"{type(err).__name__}: {err}"
    log.warning("fused kernel %s: the Triton kernel failed to compile, using the torch path from now on "
                "(set model.fused_kernels=torch to skip the attempt). Error: %s", op, DISABLED[op])


def reset_fallbacks() -> None:
    """Forget the ops switched to torch by `disable` (tests)."""
    DISABLED.clear()


def torch_grads(fn: Callable, inputs: Sequence[torch.Tensor], needs: Sequence[bool], grad_out: torch.Tensor):
    """Gradients of `fn(*inputs)` for the inputs flagged in `needs` (None for the others), through torch autograd:
    the backward of an autograd Function whose Triton backward kernel failed to compile."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n) and t.is_floating_point()) for t, n in zip(inputs, needs)]
        out = fn(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        got = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
    return tuple(next(got) if t.requires_grad else None for t in leaves)


def guarded(op: str, launch: Callable, fallback: Callable):
    """`launch()` (an op's Triton forward, or its backward kernel), or on a compilation error `disable(op)` and
    `fallback()` (the torch path)."""
    try:
        return launch()
    except COMPILE_ERRORS as e:
        disable(op, e)
        return fallback()


def launch_warps(tile: int) -> int:
    """Warps per program for a tile of `tile` elements (about 8-16 elements per thread on a GPU; 1 under the
    interpreter, where warps mean nothing)."""
    if INTERPRETED:
        return 1
    return 4 if tile <= 2048 else 8 if tile <= 8192 else 16 if tile <= 32768 else 32


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 2 under the interpreter."""
    if device.type != "cuda":
        return 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def as_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` as `[rows, n]` with unit column stride (a view when possible, else a contiguous copy)."""
    x2 = x.reshape(-1, n)
    return x2 if (x2.stride(-1) == 1 or n <= 1) else x2.contiguous()




def interpret_env() -> bool:
    """TRITON_INTERPRET is set in this process's environment."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
