"""Triton kernels of the vocab-parallel token statistics (`kernel_backend="triton"`) vs the float64 reference and the
torch path: values and gradients at TP=1 and TP=2 (gloo), uneven and padded shards, a shard holding only padding,
temperature, ignored targets, no teacher, fp32 and bf16, non-finite logits, collectives per call, saved memory.

On CPU the kernels run under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before the kernels
are built, i.e. before `dasd_megatron.loss.triton_kernels` is first imported. This pytest process never builds them
in that mode: every interpreted run happens in fresh worker processes (`run_distributed`) started with the variable
set, so that other tests here (and real GPU kernels in `gpu` tests) are unaffected. The sizes are small: the
interpreter executes each program in Python (the interpreter uses 64-column blocks and two column splits per row, so
every case runs the online rescaling across blocks and the split merge).
"""

import os
from importlib.metadata import version
from importlib.util import find_spec

import pytest
import torch
import torch.distributed as dist

from dasd_megatron.config import ConfigError
from dasd_megatron.loss import DASDLossConfig, NonFiniteLogitsError, vocab_parallel_token_stats
from dasd_megatron.testing.distributed import run_distributed

try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from loss_reference import ref_token_stats
except ImportError:  # tests/ imported as a package
    from tests.loss_reference import ref_token_stats

needs_triton = pytest.mark.skipif(find_spec("triton") is None,
                                  reason="triton is not installed (pip install triton; Linux only)")


def _triton_version() -> tuple:
    return tuple(int(p) for p in version("triton").split(".")[:2]) if find_spec("triton") else (0, 0)


# The interpreter of Triton < 3.7 passes scalar kernel arguments as 1-element arrays, which cannot bound a loop
# (TypeError in `range`); the compiled kernels do not have that limit (test_kernels_compile_for_sm90).
needs_interpreter = pytest.mark.skipif(
    _triton_version() < (3, 7),
    reason="needs triton >= 3.7 to interpret the kernels on CPU (pip install 'triton>=3.7'; Linux only)")

KEYS = ("logp", "entropy", "teacher_logp", "kl", "forward_kl")
GRAD_KEYS = ("logp", "entropy", "kl", "forward_kl")

# Tolerances against the float64 reference, per input dtype. Both backends do their math in fp32 on inputs exact in
# fp32, so values carry fp32 rounding of log-sum-exps and sums over V ~ 500 terms of magnitude <~ 10: a few ulps of
# 10 (1 ulp = 1e-6) -> atol 2e-5. Gradients: fp32 elementwise, compared relative to their max -> rtol 1e-5; bf16
# inputs get bf16 gradients rounded to nearest (relative error <= 2**-9, fp32 errors far below) -> rtol 2**-8.
VAL_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8}
# Triton vs the torch path on the same inputs: the same fp32 formulas summed in another order (and another exp), so
# values agree to fp32 ulps of the O(10) sums -> atol 1e-5. fp32 gradients to ulps -> rtol 1e-5 of the max. bf16
# gradients: both round to nearest, but fp32 values an ulp apart can round to neighbouring bf16 values -> one bf16
# ulp, <= 2**-7 relative.
VS_TORCH_VAL = 1e-5
VS_TORCH_GRAD = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


def make_case(T, V, seed, pad=0, scale=3.0):
    """float64 student, a correlated teacher (both [T, V + pad], garbage in the padded columns), targets with an
    ignored position, and upstream gradient weights."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(T, V, generator=g, dtype=torch.float64) * scale
    t = s + torch.randn(T, V, generator=g, dtype=torch.float64) * 0.5 * scale
    y = torch.randint(0, V, (T,), generator=g)
    w = torch.randn(len(GRAD_KEYS), T, generator=g, dtype=torch.float64)
    if T > 3:
        y[3] = -1
    if pad:
        s = torch.cat([s, torch.full((T, pad), float("nan"), dtype=torch.float64)], 1)  # must never be read
        t = torch.cat([t, torch.full((T, pad), 1e4, dtype=torch.float64)], 1)
    return s, t, y, w


def weighted(out, w, keys=GRAD_KEYS):
    return sum((w[i] * getattr(out, k).double()).sum() for i, k in enumerate(GRAD_KEYS) if k in keys)


def reference(s, t, y, w, V, temperature, dtype, teacher=True, keys=GRAD_KEYS):
    """float64 reference on exactly the values the kernels see (inputs rounded to `dtype`, padding dropped)."""
    s64 = s[:, :V].to(dtype).double().requires_grad_(True)
    ref = ref_token_stats(s64, t[:, :V].to(dtype).double() if teacher else None, y, temperature)
    sum((w[i] * ref[k]).sum() for i, k in enumerate(GRAD_KEYS) if k in keys and k in ref).backward()
    return {k: v.detach() for k, v in ref.items()}, s64.grad


# -------------------------------------------------------------------------------------- TP = 1, interpreted workers

# name: (T, V, pad, dtype, temperature, teacher, upstream gradients, seed)
CASES_1 = {
    "fp32_tau0.7": (24, 257, 0, torch.float32, 0.7, True, GRAD_KEYS, 1),
    "bf16_tau1": (24, 257, 0, torch.bfloat16, 1.0, True, GRAD_KEYS, 2),
    "no_teacher": (16, 101, 0, torch.float32, 0.8, False, ("logp", "entropy"), 3),
    "padded_507": (8, 507, 5, torch.float32, 0.6, True, GRAD_KEYS, 4),  # 507 of 512 columns, NaN in the padding
    "teacher_without_kl_grad": (12, 130, 0, torch.float32, 1.3, True, ("logp", "entropy"), 5),  # bwd skips teacher
}


def _tp1_worker(rank, world, cases):
    from dasd_megatron.loss import triton_kernels

    assert triton_kernels.INTERPRETED  # the worker was started with TRITON_INTERPRET=1
    res = {}
    for name, (T, V, pad, dtype, temperature, teacher, keys, seed) in cases.items():
        s, t, y, w = make_case(T, V, seed, pad)
        got = {}
        for backend in ("triton", "torch"):
            x = s.to(dtype).requires_grad_(True)
            tt = t.to(dtype) if teacher else None
            out = vocab_parallel_token_stats(x, tt, y, vocab_size=V, temperature=temperature, kernel_backend=backend)
            if backend == "triton":
                got["fn"] = type(out.logp.grad_fn).__name__
                saved = [v for v in out.logp.grad_fn.saved_tensors if v is not None]
                big = {v.data_ptr() for v in saved if v.numel() >= T * (V + pad)}
                got["saved_big_is_inputs"] = big == ({x.data_ptr(), tt.data_ptr()} if teacher else {x.data_ptr()})
                got["saved_small_max"] = max(v.numel() for v in saved if v.numel() < T * (V + pad))
            weighted(out, w, keys).backward()
            got[backend] = ({k: getattr(out, k).detach().double() for k in KEYS if getattr(out, k) is not None},
                            x.grad.double())
        res[name] = got

    # block size and column splits change only the fp32 summation order
    s, t, y, w = make_case(20, 300, seed=6)
    sweep = []
    for block, splits in ((16, 1), (64, 3), (128, 5), (512, 1)):
        x = s.float().requires_grad_(True)
        out = triton_kernels.triton_token_stats(x, t.float(), y, None, 0, 300, 0.9, True, block=block,
                                                num_splits=splits)
        sweep.append(_stack_and_grad(out, x, w))
    res["sweep"] = sweep

    # strided inputs: a column slice of wider rows (row stride > width) and a transposed view (column stride != 1,
    # copied first) give the results of contiguous inputs
    s, t, y, w = make_case(6, 100, seed=10)
    layouts = []
    for make in (lambda a: a.float().contiguous(), lambda a: torch.cat([a, a[:, :9]], 1).float()[:, :100],
                 lambda a: a.float().t().contiguous().t()):
        base = make(s).detach().requires_grad_(True)
        out = triton_kernels.triton_token_stats(base, make(t), y, None, 0, 100, 1.0, True)
        layouts.append(_stack_and_grad(out, base, w))
    res["layouts"] = layouts

    # non-finite logits: the same error as the torch path (name and count over all tokens)
    errors = []
    for where, value in (("student", float("nan")), ("teacher", float("inf")), ("student", float("-inf"))):
        s, t, y, _ = make_case(10, 30, seed=7)
        s, t = s.float(), t.float()
        bad = s if where == "student" else t
        bad[1, 2] = bad[4, 0] = bad[9, 29] = value
        msgs = []
        for backend in ("triton", "torch"):
            try:
                vocab_parallel_token_stats(s.clone().requires_grad_(True), t, y, kernel_backend=backend)
            except NonFiniteLogitsError as e:
                msgs.append(str(e))
            else:
                msgs.append(f"{backend}: no error")
        errors.append(msgs)
    res["errors"] = errors

    x = torch.zeros(0, 30, requires_grad=True)
    out = vocab_parallel_token_stats(x, torch.zeros(0, 30), torch.zeros(0, dtype=torch.long), kernel_backend="triton")
    (out.logp.sum() + out.kl.sum() + out.entropy.sum()).backward()
    res["empty"] = (tuple(out.logp.shape), tuple(x.grad.shape))
    return res


def _stack_and_grad(out, x, w):
    from dasd_megatron.loss import TokenStats

    out = TokenStats(*out)
    weighted(out, w).backward()
    return torch.stack([getattr(out, k).detach() for k in KEYS]), x.grad.clone()


@pytest.fixture(scope="module")
def tp1():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned worker
        return run_distributed(_tp1_worker, 1, CASES_1)[0]


def _assert_grad(g, g_ref, rtol, msg=""):
    torch.testing.assert_close(g, g_ref, rtol=rtol, atol=rtol * g_ref.abs().max().item() + 1e-30, msg=msg)


def _assert_same_rounding(g, g_torch, dtype):
    """bf16: both paths round the same fp32 values (equal to a few fp32 ulps) to nearest, so they differ only where
    those straddle a rounding boundary, about 2**-14 of the elements; truncation would change about half of them."""
    if dtype == torch.bfloat16:
        assert (g != g_torch).double().mean().item() < 0.01


@needs_interpreter
@pytest.mark.parametrize("name", list(CASES_1))
def test_tp1_matches_reference_and_torch_path(tp1, name):
    T, V, pad, dtype, temperature, teacher, keys, seed = CASES_1[name]
    s, t, y, w = make_case(T, V, seed, pad)
    ref, g_ref = reference(s, t, y, w, V, temperature, dtype, teacher, keys)
    (vals, grad), (tvals, tgrad) = tp1[name]["triton"], tp1[name]["torch"]
    assert tp1[name]["fn"] == "TritonTokenStatsBackward"
    assert set(vals) == set(tvals) == set(KEYS if teacher else ("logp", "entropy"))
    for k in vals:
        torch.testing.assert_close(vals[k], ref[k], rtol=0, atol=VAL_TOL[dtype], msg=f"{name} {k} vs reference")
        torch.testing.assert_close(vals[k], tvals[k], rtol=0, atol=VS_TORCH_VAL, msg=f"{name} {k} vs torch")
    assert torch.all(grad[:, V:] == 0)  # padded columns: zero gradient, never read (NaN there)
    _assert_grad(grad[:, :V], g_ref, GRAD_RTOL[dtype], f"{name} grad vs reference")
    _assert_grad(grad, tgrad, VS_TORCH_GRAD[dtype], f"{name} grad vs torch")
    _assert_same_rounding(grad, tgrad, dtype)
    # only the input logits are saved at [T, V] (by reference); the rest is per-token
    assert tp1[name]["saved_big_is_inputs"] and tp1[name]["saved_small_max"] <= 5 * T


@needs_interpreter
def test_block_and_split_invariance(tp1):
    # values to fp32 ulps of the O(10) sums; gradients inherit the ulp-level change of lse -> rtol 1e-5 of the max
    (v0, g0), *rest = tp1["sweep"]
    for v, g in rest:
        torch.testing.assert_close(v, v0, rtol=0, atol=VS_TORCH_VAL)
        _assert_grad(g, g0, VS_TORCH_GRAD[torch.float32])


@needs_interpreter
def test_strided_inputs(tp1):
    (v0, g0), *rest = tp1["layouts"]
    for v, g in rest:
        torch.testing.assert_close(v, v0, rtol=0, atol=0)
        torch.testing.assert_close(g, g0, rtol=0, atol=0)


@needs_interpreter
def test_nonfinite_logits_raise_like_torch_path(tp1):
    for (tri, tor), name in zip(tp1["errors"], ("student_logits", "teacher_logits", "student_logits")):
        assert tri == tor and f"{name} has 3 non-finite values" in tri


@needs_interpreter
def test_empty_batch(tp1):
    assert tp1["empty"] == ((0,), (0, 30))


# -------------------------------------------------------------------------------------- TP = 2, interpreted workers

# (T, shard widths, true vocab, dtype, temperature, seed)
CASES_2 = [
    (16, (254, 253), 507, torch.float32, 1.0, 11),  # uneven split, no padding
    (16, (256, 256), 507, torch.bfloat16, 0.7, 12),  # 507 padded to 512 (rank 1: 251 valid columns)
    (8, (256, 256), 250, torch.float32, 0.9, 13),  # rank 1 holds only padding (valid width 0)
]


def _tp2_worker(rank, world, cases):
    calls = {"n": 0}
    orig = dist.all_reduce

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    dist.all_reduce = counting  # spawned process: counts this rank's collectives
    group = dist.new_group(list(range(world)))
    results = []
    for T, widths, V, dtype, temperature, seed in cases:
        s, t, y, w = make_case(T, V, seed, pad=sum(widths) - V)
        start = sum(widths[:rank])
        sl = slice(start, start + widths[rank])
        got = {}
        for backend in ("triton", "torch"):
            x = s[:, sl].to(dtype).requires_grad_(True)
            calls["n"] = 0
            out = vocab_parallel_token_stats(x, t[:, sl].to(dtype), y, group, vocab_start=start, vocab_size=V,
                                             temperature=temperature, kernel_backend=backend)
            fwd = calls["n"]
            weighted(out, w).backward()
            got[backend] = {"vals": {k: getattr(out, k).detach().double() for k in KEYS}, "grad": x.grad.double(),
                            "fwd_calls": fwd, "bwd_calls": calls["n"] - fwd}
        results.append(got)
    return results


@pytest.fixture(scope="module")
def tp2():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        return run_distributed(_tp2_worker, 2, CASES_2)


@needs_interpreter
@pytest.mark.parametrize("ci", range(len(CASES_2)))
def test_tp2_uneven_and_padded(tp2, ci):
    T, widths, V, dtype, temperature, seed = CASES_2[ci]
    s, t, y, w = make_case(T, V, seed, pad=sum(widths) - V)
    ref, g_ref = reference(s, t, y, w, V, temperature, dtype)
    start = 0
    for r in range(2):
        got, tor = tp2[r][ci]["triton"], tp2[r][ci]["torch"]
        for k in KEYS:  # every rank returns the global values
            torch.testing.assert_close(got["vals"][k], ref[k], rtol=0, atol=VAL_TOL[dtype], msg=f"r{r} {k}")
            torch.testing.assert_close(got["vals"][k], tor["vals"][k], rtol=0, atol=VS_TORCH_VAL, msg=f"r{r} {k}")
        # one MAX and one SUM per call, nothing in backward (the torch path: 3 per chunk, one chunk here)
        assert (got["fwd_calls"], got["bwd_calls"]) == (2, 0) and (tor["fwd_calls"], tor["bwd_calls"]) == (3, 0)
        valid = max(0, min(V - start, widths[r]))
        g = got["grad"]
        assert g.shape == (T, widths[r]) and torch.all(g[:, valid:] == 0)
        if valid:
            gr = g_ref[:, start : start + valid]
            atol = GRAD_RTOL[dtype] * g_ref.abs().max().item()
            torch.testing.assert_close(g[:, :valid], gr, rtol=GRAD_RTOL[dtype], atol=atol, msg=f"r{r} grad")
        _assert_grad(g, tor["grad"], VS_TORCH_GRAD[dtype], f"r{r} grad vs torch")
        _assert_same_rounding(g, tor["grad"], dtype)
        start += widths[r]


# ---------------------------------------------------------------------------------------- this process, no kernels


def test_backend_dispatch_and_validation():
    s, t, y, _ = make_case(6, 20, seed=8)
    x = s.float().requires_grad_(True)
    auto = vocab_parallel_token_stats(x, t.float(), y)  # CPU logits: 'auto' is the torch path
    assert type(auto.logp.grad_fn).__name__ == "TorchTokenStatsBackward"
    x64 = s.clone().requires_grad_(True)  # float64 always takes the torch path, even when triton is asked for
    f64 = vocab_parallel_token_stats(x64, t, y, kernel_backend="triton")
    assert type(f64.logp.grad_fn).__name__ == "TorchTokenStatsBackward"
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        vocab_parallel_token_stats(x, t.float(), y, kernel_backend="cuda")


def test_config_kernel_backend():
    assert DASDLossConfig().kernel_kwargs["kernel_backend"] == "auto"
    assert DASDLossConfig(kernel_backend="triton").kernel_kwargs["kernel_backend"] == "triton"
    with pytest.raises(ConfigError, match=r"loss.kernel_backend='cuda': must be 'auto' .* Fix: use "
                                          r"loss.kernel_backend=auto"):
        DASDLossConfig(kernel_backend="cuda")


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="checks the compiled mode")
def test_triton_on_cpu_without_interpreter_raises():
    s, t, y, _ = make_case(4, 20, seed=9)
    with pytest.raises(RuntimeError, match="Fix: move the logits to a CUDA device, set TRITON_INTERPRET=1"):
        vocab_parallel_token_stats(s.float(), t.float(), y, kernel_backend="triton")


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="checks the compiled mode")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")  # Triton 3.9's notice about a default
@pytest.mark.parametrize("teacher,dtype", [(True, "bf16"), (False, "fp32")])
def test_kernels_compile_for_sm90(teacher, dtype):
    """The GPU compiler (not the interpreter) accepts both kernels: Triton -> PTX -> cubin for an H100 (sm_90), with
    Triton's bundled ptxas; no GPU needed. Catches typing errors the interpreter lets through."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    from dasd_megatron.loss import triton_kernels as tk

    target = GPUTarget("cuda", 90, 32)
    ptr = f"*{dtype}"
    fwd = ASTSource(tk.stats_fwd_kernel, signature={
        "s_ptr": ptr, "t_ptr": ptr, "tgt_ptr": "*i64", "part_ptr": "*fp32", "n_rows": "i32", "stride_s": "i32",
        "stride_t": "i32", "width": "i32", "split_cols": "i32", "inv_temp": "fp32", "HAS_TEACHER": "constexpr",
        "BLOCK": "constexpr"}, constexprs={"HAS_TEACHER": teacher, "BLOCK": tk.GPU_LAUNCH["fwd_block"]})
    bwd = ASTSource(tk.stats_bwd_kernel, signature={
        "s_ptr": ptr, "t_ptr": ptr, "tgt_ptr": "*i64", "coef_ptr": "*fp32", "g_ptr": ptr, "n_rows": "i32",
        "stride_s": "i32", "stride_t": "i32", "width": "i32", "v_local": "i32", "inv_temp": "fp32",
        "HAS_TEACHER": "constexpr", "BF16_OUT": "constexpr", "BLOCK": "constexpr"},
        constexprs={"HAS_TEACHER": teacher, "BF16_OUT": dtype == "bf16", "BLOCK": tk.GPU_LAUNCH["bwd_block"]})
    for src in (fwd, bwd):
        kernel = triton_compile(src, target=target, options={"num_warps": tk.GPU_LAUNCH["num_warps"]})
        assert kernel.asm["cubin"] and ".visible .entry" in kernel.asm["ptx"]


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_reference_and_torch_path(dtype):
    # V = 5000 (padded to 5003): fp32 accumulation order on the GPU differs from the CPU's -> atol 5e-5 on values
    T, V = 300, 5000
    s, t, y, w = make_case(T, V, seed=31, pad=3)
    ref, g_ref = reference(s, t, y, w, V, 0.7, dtype)
    res = {}
    for backend in ("triton", "torch"):
        x = s.to(device="cuda", dtype=dtype).requires_grad_(True)
        out = vocab_parallel_token_stats(x, t.to(device="cuda", dtype=dtype), y.cuda(), vocab_size=V,
                                         temperature=0.7, kernel_backend=backend)
        weighted(out, w.cuda()).backward()
        res[backend] = ({k: getattr(out, k).detach().double().cpu() for k in KEYS}, x.grad.double().cpu())
    (vals, grad), (tvals, tgrad) = res["triton"], res["torch"]
    for k in KEYS:
        torch.testing.assert_close(vals[k], ref[k], rtol=0, atol=5e-5, msg=k)
        torch.testing.assert_close(vals[k], tvals[k], rtol=0, atol=5e-5, msg=k)
    assert torch.all(grad[:, V:] == 0)
    _assert_grad(grad[:, :V], g_ref, GRAD_RTOL[dtype])
    _assert_grad(grad, tgrad, VS_TORCH_GRAD[dtype])
    _assert_same_rounding(grad, tgrad, dtype)
