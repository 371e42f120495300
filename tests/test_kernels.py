"""Fused RMSNorm / SwiGLU / RoPE kernels (`dasd_megatron.kernels`): the Triton kernels forward and backward against
independent float64 references, the torch fallbacks against today's code bit for bit, the backend choice, the
compile-failure fallback, and the compiled (sm_90) form of every kernel.

On CPU the kernels run under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before the kernels
are built, i.e. before `dasd_megatron.kernels` is first imported. This pytest process never builds them in that mode:
the interpreted runs happen in one fresh worker process (`run_distributed`, spawned with the variable set). Sizes are
tiny and odd (hidden 40 and 96, f = 20 and 48, T = 7 tokens, 3 heads, D = 16 with rot_dim 16 or 8): the interpreter
uses 2-row blocks and 2 backward programs (RMSNorm), 16-column blocks (SwiGLU) and 2-head blocks (RoPE), so every
case has masked rows, columns or heads and several programs.
"""

import logging
import os
from importlib.metadata import version
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dasd_megatron.kernels import (FusedSwiGLU, apply_rope, apply_rope_torch, resolve_fused_kernels, rms_norm,
                                   rms_norm_torch, swiglu, swiglu_torch)
from dasd_megatron.testing.distributed import run_distributed


def _triton_version() -> tuple:
    return tuple(int(p) for p in version("triton").split(".")[:2]) if find_spec("triton") else (0, 0)


needs_triton = pytest.mark.skipif(find_spec("triton") is None,
                                  reason="triton is not installed (pip install triton; Linux only)")
# The interpreter of Triton < 3.7 passes scalar kernel arguments as 1-element arrays, which cannot bound a loop (the
# RMSNorm backward's row loop); the compiled kernels do not have that limit (test_kernels_compile_for_sm90).
needs_interpreter = pytest.mark.skipif(
    _triton_version() < (3, 7),
    reason="needs triton >= 3.7 to interpret the kernels on CPU (pip install 'triton>=3.7'; Linux only)")
compiled_mode = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                   reason="checks the compiled (non-interpreted) mode")

EPS = 1e-6

# Tolerances against the float64 references: |got - ref| <= rtol |ref| + atol max|ref| + mtol mag, elementwise, where
# `mag` is the magnitude of the terms that are rounded before a final sum (see each reference), per input dtype.
# fp32: the kernels compute in fp32 on inputs exact in fp32; errors are fp32 roundings of sums over <= 96 terms (in
# another order than torch), rsqrt, exp and a few products: ~1e-6 relative -> rtol 1e-5; where terms cancel (RMSNorm's
# dx, dw and RoPE's sums) they are ~1e-7 of the terms' magnitude -> atol 1e-5 of the max and mtol 1e-6.
# bf16: every bf16 rounding (to nearest: relative error <= 2**-8, half a bf16 ulp) is made where torch makes it: the
# output and one intermediate of a product (RMSNorm's c(x_hat) before `* w`, SwiGLU's silu(a) before `* b` and in db)
# -> two roundings, rtol 2**-7; a rounding of each term before a sum (dw's c(x_hat) terms over rows, RoPE's two
# products) adds 2**-8 of the terms' magnitude -> mtol 2**-8; the fp32 errors stay in atol (1e-5 of the max).
TOL = {torch.float32: (1e-5, 1e-5, 1e-6), torch.bfloat16: (2.0**-7, 1e-5, 2.0**-8)}


def _close(got, ref, tol, msg="", mag=None):
    rtol, atol, mtol = tol
    got = got.double()
    assert got.shape == ref.shape, f"{msg}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    bound = rtol * ref.abs() + atol * ref.abs().max() + 1e-30
    if mag is not None:
        bound = bound + mtol * mag
    ratio = (got - ref).abs() / bound
    assert ratio.max().item() <= 1.0, (f"{msg}: error up to {ratio.max().item():.3g}x the tolerance "
                                       f"(max |got - ref| {(got - ref).abs().max().item():.3g})")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------- the cases

# name: (shape of x, dtype of x, dtype of w, make x non-contiguous, seed); hidden 40 and 96 (not powers of 2)
RMS_CASES = {
    "fp32_3d_h40": ((3, 7, 40), torch.float32, torch.float32, False, 1),
    "bf16_h96": ((7, 96), torch.bfloat16, torch.bfloat16, False, 2),
    "bf16_noncontig_h40": ((5, 40), torch.bfloat16, torch.bfloat16, True, 3),
    "bf16_x_fp32_w": ((7, 40), torch.bfloat16, torch.float32, False, 4),  # promotes to an fp32 output, as torch
}
# name: (shape of x, dtype, non-contiguous, seed); f = 48 and 20
SWIGLU_CASES = {
    "fp32_f48": ((3, 2, 96), torch.float32, False, 5),
    "bf16_f48": ((7, 96), torch.bfloat16, False, 6),
    "bf16_noncontig_f20": ((7, 40), torch.bfloat16, True, 7),
}
# name: (T, heads, D, rot_dim, dtype, strided t, seed)
ROPE_CASES = {
    "fp32_rot16": (7, 3, 16, 16, torch.float32, False, 8),
    "fp32_rot8_partial": (7, 3, 16, 8, torch.float32, False, 9),
    "bf16_rot16_strided": (7, 3, 16, 16, torch.bfloat16, True, 10),  # t a head slice of a wider qkv tensor
    "bf16_rot8_partial": (7, 3, 16, 8, torch.bfloat16, False, 11),
}


def _noncontig(shape, dtype, g):
    """A transposed view: values `[rows, n]` whose column stride is not 1."""
    return (torch.randn(shape[::-1], generator=g, dtype=torch.float64) * 2).to(dtype).t()


def rms_inputs(shape, xdt, wdt, noncontig, seed):
    g = _gen(seed)
    x = _noncontig(shape, xdt, g) if noncontig else (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(xdt)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g, dtype=torch.float64)).to(wdt)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(torch.promote_types(xdt, wdt))
    return x, w, dy


def swiglu_inputs(shape, dt, noncontig, seed):
    g = _gen(seed)
    x = _noncontig(shape, dt, g) if noncontig else (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dt)
    dy = torch.randn(*shape[:-1], shape[-1] // 2, generator=g, dtype=torch.float64).to(dt)
    return x, dy


def rope_freqs(T, rot, seed):
    """`[T, 1, 1, rot]` megatron-style frequencies at packed positions (two documents), fp32."""
    pos = torch.cat([torch.arange(4), torch.arange(T - 4)]).float() + seed
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    theta = pos[:, None] * inv[None, :]
    return torch.cat([theta, theta], dim=-1)[:, None, None, :]


def rope_inputs(T, H, D, rot, dt, strided, seed):
    g = _gen(seed)
    if strided:
        t = torch.randn(T, H + 2, D, generator=g, dtype=torch.float64).to(dt)[:, 1:H + 1]
    else:
        t = torch.randn(T, H, D, generator=g, dtype=torch.float64).to(dt)
    freqs = rope_freqs(T, rot, seed)[:, 0]  # [T, 1, rot]
    cos, sin = torch.cos(freqs).to(dt), torch.sin(freqs).to(dt)
    dy = torch.randn(T, H, D, generator=g, dtype=torch.float64).to(dt)
    return t, cos, sin, dy


# ------------------------------------------------------------------------------------ float64 references (the math)


def ref_rms(x, w, dy):
    """y, dx, dw, and the magnitude sum_rows |dy x_hat| of dw's terms."""
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    x_hat = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + EPS)
    y = w64 * x_hat
    y.backward(dy.double())
    n = x.shape[-1]
    mag_dw = (dy.double().abs() * x_hat.detach().abs()).reshape(-1, n).sum(0)
    return y.detach(), x64.grad, w64.grad, mag_dw


def ref_swiglu(x, dy):
    x64 = x.double().requires_grad_(True)
    f = x.shape[-1] // 2
    a, b = x64[..., :f], x64[..., f:]
    y = a / (1 + torch.exp(-a)) * b
    y.backward(dy.double())
    return y.detach(), x64.grad


def _rope64(t, c, s, sign):
    """RoPE (sign 1) or its transpose (sign -1) in float64, and the magnitude of the two summed products."""
    rot = c.shape[-1]
    h = rot // 2
    t1, t2, tp = t[..., :h], t[..., h:rot], t[..., rot:]
    c1, c2, s1, s2 = c[..., :h], c[..., h:], s[..., :h], s[..., h:]
    if sign > 0:
        p = (t1 * c1, -t2 * s1, t2 * c2, t1 * s2)
    else:
        p = (t1 * c1, t2 * s2, t2 * c2, -t1 * s1)
    out = torch.cat([p[0] + p[1], p[2] + p[3], tp], dim=-1)
    mag = torch.cat([p[0].abs() + p[1].abs(), p[2].abs() + p[3].abs(), torch.zeros_like(tp)], dim=-1)
    return out, mag


def ref_rope(t, cos, sin, dy):
    """y, dt (by autograd of the forward), and the magnitudes of their summed products."""
    t64 = t.double().requires_grad_(True)
    c, s = cos.double(), sin.double()
    y, mag_y = _rope64(t64, c, s, 1)
    y.backward(dy.double())
    mag_dt = _rope64(dy.double(), c, s, -1)[1]
    return y.detach(), t64.grad, mag_y.detach(), mag_dt


# ---------------------------------------------------------------------------------------- the interpreted worker


class _Fail:
    """Stands in for a Triton kernel whose compilation fails: `kernel[grid](...)` raises CompilationError."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.compiler.errors import CompilationError

            raise CompilationError(None, None, "simulated: out of registers in fake_kernel")

        return launch


def _run(fn, inputs, dy):
    leaves = [v.clone().requires_grad_(True) if v.is_floating_point() else v for v in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [v.grad for v in leaves], type(y.grad_fn).__name__


def _fallback_checks():
    """A compile failure of the forward kernel, then (fresh state) of the backward kernel: one warning each, with
    the error text, and the torch results."""
    from dasd_megatron.kernels import common, rmsnorm

    records = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Catch(level=logging.WARNING)
    common.log.addHandler(handler)
    out = {}
    x, w, dy = rms_inputs((5, 40), torch.float32, torch.float32, False, 20)
    try:
        real_fwd, real_bwd = rmsnorm.rms_norm_fwd_kernel, rmsnorm.rms_norm_bwd_kernel
        rmsnorm.rms_norm_fwd_kernel = _Fail()
        runs = [_run(lambda a, b: rms_norm(a, b, EPS, backend="triton"), (x, w), dy) for _ in range(2)]
        out["fwd_fail"] = {"runs": runs, "torch": _run(lambda a, b: rms_norm_torch(a, b, EPS), (x, w), dy),
                           "records": list(records), "disabled": common.disabled_ops()}
        rmsnorm.rms_norm_fwd_kernel = real_fwd
        common.reset_fallbacks()
        records.clear()
        rmsnorm.rms_norm_bwd_kernel = _Fail()
        first = _run(lambda a, b: rms_norm(a, b, EPS, backend="triton"), (x, w), dy)
        then = _run(lambda a, b: rms_norm(a, b, EPS, backend="triton"), (x, w), dy)
        out["bwd_fail"] = {"first": first, "then": then, "torch": out["fwd_fail"]["torch"],
                           "records": list(records), "disabled": common.disabled_ops()}
    finally:
        rmsnorm.rms_norm_fwd_kernel, rmsnorm.rms_norm_bwd_kernel = real_fwd, real_bwd
        common.reset_fallbacks()
        common.log.removeHandler(handler)
    return out


def _interpreted_worker(rank, world):
    from dasd_megatron import kernels

    assert kernels.INTERPRETED  # the worker was started with TRITON_INTERPRET=1
    res = {"rms": {}, "swiglu": {}, "rope": {}}
    for name, case in RMS_CASES.items():
        x, w, dy = rms_inputs(*case)
        res["rms"][name] = _run(lambda a, b: kernels.rms_norm(a, b, EPS, backend="triton"), (x, w), dy)
    for name, case in SWIGLU_CASES.items():
        x, dy = swiglu_inputs(*case)
        res["swiglu"][name] = _run(lambda a: kernels.swiglu(a, backend="triton"), (x,), dy)
    for name, case in ROPE_CASES.items():
        t, cos, sin, dy = rope_inputs(*case)
        tri = _run(lambda a: kernels.apply_rope(a, cos, sin, backend="triton"), (t,), dy)
        tor = _run(lambda a: apply_rope_torch(a, cos, sin), (t,), dy)
        res["rope"][name] = (tri, tor)
    # empty inputs: no launch, right shapes
    empty = torch.zeros(0, 40, requires_grad=True)
    w = torch.ones(40, requires_grad=True)
    kernels.rms_norm(empty, w, EPS, backend="triton").sum().backward()
    res["empty"] = (tuple(empty.grad.shape), w.grad.abs().sum().item())
    res["fallback"] = _fallback_checks()
    return res


@pytest.fixture(scope="module")
def interp():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned worker
        return run_distributed(_interpreted_worker, 1)[0]


@needs_interpreter
@pytest.mark.parametrize("name", list(RMS_CASES))
def test_rms_norm_triton_vs_float64(interp, name):
    x, w, dy = rms_inputs(*RMS_CASES[name])
    (y, (dx, dw), fn) = interp["rms"][name]
    assert fn == "TritonRMSNormBackward"
    assert y.dtype == torch.promote_types(x.dtype, w.dtype) and dx.dtype == x.dtype and dw.dtype == w.dtype
    ry, rdx, rdw, mag_dw = ref_rms(x, w, dy)
    tol = TOL[x.dtype]
    _close(y, ry, tol, f"{name} y")
    _close(dx, rdx, tol, f"{name} dx")
    _close(dw, rdw, tol, f"{name} dw", mag_dw)


@needs_interpreter
@pytest.mark.parametrize("name", list(SWIGLU_CASES))
def test_swiglu_triton_vs_float64(interp, name):
    x, dy = swiglu_inputs(*SWIGLU_CASES[name])
    (y, (dx,), fn) = interp["swiglu"][name]
    assert fn == "TritonSwiGLUBackward" and y.dtype == dx.dtype == x.dtype and dx.shape == x.shape
    ry, rdx = ref_swiglu(x, dy)
    _close(y, ry, TOL[x.dtype], f"{name} y")
    _close(dx, rdx, TOL[x.dtype], f"{name} dx")


@needs_interpreter
@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_triton_vs_float64_and_torch(interp, name):
    t, cos, sin, dy = rope_inputs(*ROPE_CASES[name])
    (y, (dt,), fn), (ty, (tdt,), _) = interp["rope"][name]
    assert fn == "TritonRoPEBackward" and y.dtype == dt.dtype == t.dtype
    ry, rdt, mag_y, mag_dt = ref_rope(t, cos, sin, dy)
    _close(y, ry, TOL[t.dtype], f"{name} y", mag_y)
    _close(dt, rdt, TOL[t.dtype], f"{name} dt", mag_dt)
    # the kernel rounds each product and the sum like torch's separate ops; the interpreter has no FMA: equal bits
    assert torch.equal(y, ty) and torch.equal(dt, tdt)
    rot = cos.shape[-1]
    assert torch.equal(y[..., rot:], t[..., rot:]) and torch.equal(dt[..., rot:], dy[..., rot:])


@needs_interpreter
def test_empty_input(interp):
    assert interp["empty"] == ((0, 40), 0.0)


@needs_interpreter
def test_compile_failure_falls_back_to_torch_once(interp):
    fb = interp["fallback"]
    f = fb["fwd_fail"]
    ty, tgrads, _ = f["torch"]
    for y, grads, fn in f["runs"]:  # both calls: the torch path, bit for bit
        assert fn == "MulBackward0" and torch.equal(y, ty) and all(map(torch.equal, grads, tgrads))
    assert len(f["records"]) == 1 and "simulated: out of registers in fake_kernel" in f["records"][0]
    assert "rms_norm" in f["records"][0] and "model.fused_kernels=torch" in f["records"][0]
    assert list(f["disabled"]) == ["rms_norm"]
    # backward kernel fails: that call's gradient is recomputed through torch, later calls run torch entirely
    b = fb["bwd_fail"]
    y, grads, fn = b["first"]
    assert fn == "TritonRMSNormBackward"
    _close(y, ty.double(), TOL[torch.float32])
    assert all(torch.equal(g, tg) for g, tg in zip(grads, tgrads))
    y, grads, fn = b["then"]
    assert fn == "MulBackward0" and torch.equal(y, ty)
    assert len(b["records"]) == 1 and "simulated" in b["records"][0] and list(b["disabled"]) == ["rms_norm"]


# -------------------------------------------------------------------------- this process: torch paths, no kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_torch_is_todays_rmsnorm(dtype):
    from dasd_megatron.model.norm import RMSNorm

    norm = RMSNorm(SimpleNamespace(params_dtype=dtype, sequence_parallel=False), 40, eps=EPS)
    x, w, dy = rms_inputs((2, 5, 40), dtype, dtype, False, 30)
    with torch.no_grad():
        norm.weight.copy_(w)
    assert torch.equal(rms_norm_torch(x, norm.weight, EPS), norm(x))
    assert torch.equal(rms_norm(x, norm.weight, EPS, backend="torch"), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_torch_is_megatrons_glu(dtype):
    x, _ = swiglu_inputs((3, 4, 96), dtype, False, 31)
    x_glu, x_lin = torch.chunk(x, 2, dim=-1)  # megatron MLP's glu with activation_func = F.silu
    expected = F.silu(x_glu) * x_lin
    assert torch.equal(swiglu_torch(x), expected) and torch.equal(swiglu(x, backend="torch"), expected)
    module = FusedSwiGLU(config=SimpleNamespace(dasd_fused_kernels="torch"))
    assert torch.equal(module(x), expected)


@pytest.mark.parametrize("rot", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_torch_is_megatrons(dtype, rot):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    T, H, D = 7, 3, 16
    t = torch.randn(T, H, D, generator=_gen(32), dtype=torch.float64).to(dtype)
    dy = torch.randn(T, H, D, generator=_gen(33), dtype=torch.float64).to(dtype)
    freqs = rope_freqs(T, rot, 3)  # [T, 1, 1, rot]
    cos, sin = torch.cos(freqs).to(dtype)[:, 0], torch.sin(freqs).to(dtype)[:, 0]  # [T, 1, rot]
    a = t.clone().requires_grad_(True)
    b = t.clone().requires_grad_(True)
    ours = apply_rope_torch(a, cos, sin)
    theirs = _apply_rotary_pos_emb_bshd(b.unsqueeze(1), freqs).squeeze(1)
    ours.backward(dy)
    theirs.backward(dy)
    assert torch.equal(ours, theirs) and torch.equal(a.grad, b.grad)
    assert torch.equal(apply_rope(t, cos, sin, backend="torch"), theirs.detach())


def test_resolve_fused_kernels():
    assert resolve_fused_kernels("auto", torch.device("cpu")) == "torch"
    assert resolve_fused_kernels("auto", "cpu") == "torch"
    assert resolve_fused_kernels("torch", torch.device("cuda")) == "torch"
    if find_spec("triton") is not None:  # no GPU needed: the choice looks only at the device type
        assert resolve_fused_kernels("auto", torch.device("cuda", 0)) == "triton"
        assert resolve_fused_kernels("triton", torch.device("cuda", 0)) == "triton"
    with pytest.raises(ValueError, match=r"model.fused_kernels='cuda': unknown choice"):
        resolve_fused_kernels("cuda", "cpu")


@needs_triton
@compiled_mode
def test_triton_on_cpu_without_interpreter_raises():
    with pytest.raises(ValueError, match=r"model.fused_kernels='triton': Triton kernels need a CUDA device .* Fix: "
                                         r"use model.fused_kernels=auto"):
        resolve_fused_kernels("triton", torch.device("cpu"))
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="Fix: move it to a CUDA device"):
        rms_norm(x, torch.ones(8), EPS, backend="triton")


def test_unsupported_inputs_take_the_torch_path():
    # float64 is not a kernel dtype: the dispatch runs the torch fallback even with backend='triton' (before the
    # device check), and so for RoPE tables of another dtype than t
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.ones(8, dtype=torch.float64)
    assert torch.equal(rms_norm(x, w, EPS, backend="triton"), rms_norm_torch(x, w, EPS))
    assert torch.equal(swiglu(x, backend="triton"), swiglu_torch(x))
    t = torch.randn(4, 2, 8)
    cos, sin = torch.randn(4, 1, 8, dtype=torch.float64), torch.randn(4, 1, 8, dtype=torch.float64)
    assert torch.equal(apply_rope(t, cos, sin, backend="triton"), apply_rope_torch(t, cos, sin))


# ------------------------------------------------------------------------------- the GPU compiler, no GPU needed


def _kernel_sources():
    from importlib import import_module

    from dasd_megatron.kernels import rmsnorm, rope

    sw = import_module("dasd_megatron.kernels.swiglu")  # the package attribute `swiglu` is the dispatch function

    bf = "*bf16"
    i32 = "i32"
    c = "constexpr"
    return {
        "rms_norm_fwd": (rmsnorm.rms_norm_fwd_kernel, dict(
            x_ptr=bf, w_ptr=bf, y_ptr=bf, rstd_ptr="*fp32", n_rows=i32, n_cols=i32, stride_x=i32, eps="fp32",
            X_KIND=c, Y_KIND=c, BLOCK_R=c, BLOCK=c), dict(X_KIND=1, Y_KIND=1, BLOCK_R=4, BLOCK=1024), 8),
        "rms_norm_bwd": (rmsnorm.rms_norm_bwd_kernel, dict(
            dy_ptr=bf, x_ptr=bf, w_ptr=bf, rstd_ptr="*fp32", dx_ptr=bf, dw_ptr="*fp32", n_rows=i32, n_cols=i32,
            stride_dy=i32, stride_x=i32, X_KIND=c, COMPUTE_DW=c, BLOCK_R=c, BLOCK=c),
            dict(X_KIND=1, COMPUTE_DW=True, BLOCK_R=4, BLOCK=1024), 8),
        "swiglu_fwd": (sw.swiglu_fwd_kernel, dict(x_ptr=bf, y_ptr=bf, n_cols=i32, stride_x=i32, KIND=c, BLOCK=c),
                       dict(KIND=1, BLOCK=1024), 4),
        "swiglu_bwd": (sw.swiglu_bwd_kernel, dict(dy_ptr=bf, x_ptr=bf, dx_ptr=bf, n_cols=i32, stride_dy=i32,
                                                  stride_x=i32, KIND=c, BLOCK=c), dict(KIND=1, BLOCK=1024), 4),
        "rope_bwd_partial": (rope.rope_kernel, dict(
            t_ptr=bf, cos_ptr=bf, sin_ptr=bf, out_ptr=bf, n_heads=i32, half=i32, n_pass=i32, stride_tt=i32,
            stride_th=i32, stride_ct=i32, stride_st=i32, BACKWARD=c, KIND=c, BLOCK_H=c, BLOCK_HALF=c,
            BLOCK_PASS=c),
            dict(BACKWARD=True, KIND=1, BLOCK_H=16, BLOCK_HALF=32, BLOCK_PASS=64), 4),
    }


@needs_triton
@compiled_mode
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")  # Triton 3.9's notice about a default
@pytest.mark.parametrize("name", ["rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd", "rope_bwd_partial"])
def test_kernels_compile_for_sm90(name):
    """The GPU compiler (not the interpreter) accepts each kernel at a Qwen3-0.6B launch (bf16, hidden 1024, f
    tiles of 1024, 16 heads of 64 + 64 pass-through channels): Triton -> PTX -> cubin for an H100 (sm_90) with
    Triton's bundled ptxas; catches typing errors the interpreter lets through."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    fn, signature, constexprs, warps = _kernel_sources()[name]
    kernel = triton_compile(ASTSource(fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert kernel.asm["cubin"] and ".visible .entry" in kernel.asm["ptx"]


# ------------------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_float64(dtype):
    # hidden 1000, f = 1500, 16 heads of 128 with rot 64: GPU reductions sum in another order (and FMA), within TOL;
    # dw sums 333 rows: its fp32 order error (~333 * 6e-8 of the terms) stays under mtol * mag
    dev = "cuda"
    x, w, dy = rms_inputs((333, 1000), dtype, dtype, False, 40)
    (y, (dx, dw), _) = _run(lambda a, b: rms_norm(a, b, EPS, backend="triton"), (x.to(dev), w.to(dev)), dy.to(dev))
    ry, rdx, rdw, mag_dw = ref_rms(x, w, dy)
    _close(y.cpu(), ry, TOL[dtype])
    _close(dx.cpu(), rdx, TOL[dtype])
    _close(dw.cpu(), rdw, TOL[dtype], "dw", mag_dw)
    x, dy = swiglu_inputs((333, 3000), dtype, False, 41)
    (y, (dx,), _) = _run(lambda a: swiglu(a, backend="triton"), (x.to(dev),), dy.to(dev))
    ry, rdx = ref_swiglu(x, dy)
    _close(y.cpu(), ry, TOL[dtype])
    _close(dx.cpu(), rdx, TOL[dtype])
    t, cos, sin, dy = rope_inputs(9, 16, 128, 64, dtype, False, 42)
    (y, (dt,), _) = _run(lambda a: apply_rope(a, cos.to(dev), sin.to(dev), backend="triton"), (t.to(dev),),
                         dy.to(dev))
    ry, rdt, mag_y, mag_dt = ref_rope(t, cos, sin, dy)
    _close(y.cpu(), ry, TOL[dtype], "rope y", mag_y)
    _close(dt.cpu(), rdt, TOL[dtype], "rope dt", mag_dt)
