"""Vocab-parallel kernels vs the float64 reference: values, gradients, TP=1/2/3 with uneven and padded vocabularies,
gradcheck, chunk invariance, collectives per chunk, saved memory, no in-place writes, NaN/inf and empty inputs."""

import pytest
import torch
import torch.distributed as dist

from dasd_megatron.loss import NonFiniteLogitsError, vocab_parallel_token_stats
from dasd_megatron.testing.distributed import run_distributed

try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from loss_reference import ref_token_stats
except ImportError:  # tests/ imported as a package
    from tests.loss_reference import ref_token_stats

# Tolerances, per input dtype. The kernels do their math in fp32 (fp64 for fp64 inputs) on inputs that are exact in
# fp32, so value errors are fp32 rounding of log-sum-exps and dot products over V ~ 500 terms of magnitude <~ 10:
# a few ulps of 10 (1 ulp = 1e-6) -> atol 2e-5. Gradients are O(1/V) elementwise and computed in fp32 -> atol 1e-6
# relative to their max; bf16 inputs get bf16 gradients (round-to-nearest, relative error <= 2**-9) -> rtol 2**-8.
VAL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0**-8}
KEYS = ("logp", "entropy", "teacher_logp", "kl", "forward_kl")
GRAD_KEYS = ("logp", "entropy", "kl", "forward_kl")


def make_case(T, V, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(T, V, generator=g, dtype=torch.float64) * scale
    t = s + torch.randn(T, V, generator=g, dtype=torch.float64) * 0.5 * scale  # a correlated teacher
    y = torch.randint(0, V, (T,), generator=g)
    w = torch.randn(len(GRAD_KEYS), T, generator=g, dtype=torch.float64)  # upstream gradients
    if T > 3:
        y[3] = -1  # an ignored position
    return s, t, y, w


def weighted(out, w):
    return sum((w[i] * getattr(out, k).double()).sum() if not isinstance(out, dict) else (w[i] * out[k]).sum()
               for i, k in enumerate(GRAD_KEYS))


def reference(s, t, y, w, temperature, dtype):
    """Reference on exactly the values the kernel sees (inputs rounded to `dtype` first)."""
    s64 = s.to(dtype).double().requires_grad_(True)
    ref = ref_token_stats(s64, t.to(dtype).double(), y, temperature)
    weighted(ref, w).backward()
    return {k: v.detach() for k, v in ref.items()}, s64.grad


def assert_close_grad(g, g_ref, dtype):
    g = g.double()
    atol = GRAD_RTOL[dtype] * g_ref.abs().max().item() + 1e-30
    torch.testing.assert_close(g, g_ref, rtol=GRAD_RTOL[dtype], atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_single_process_matches_reference(dtype, temperature):
    s, t, y, w = make_case(40, 257, seed=1)
    ref, g_ref = reference(s, t, y, w, temperature, dtype)
    x = s.to(dtype).requires_grad_(True)
    out = vocab_parallel_token_stats(x, t.to(dtype), y, temperature=temperature, chunk_size=16)
    for k in KEYS:
        torch.testing.assert_close(getattr(out, k).double(), ref[k], rtol=0, atol=VAL_TOL[dtype], msg=k)
    assert out.teacher_logp.requires_grad is False
    weighted(out, w).backward()
    assert x.grad.dtype == dtype
    assert_close_grad(x.grad, g_ref, dtype)


def test_student_only_matches_reference():
    s, _, y, w = make_case(20, 101, seed=2)
    s64 = s.clone().requires_grad_(True)
    ref = ref_token_stats(s64, None, y, 0.8)
    (w[0] * ref["logp"] + w[1] * ref["entropy"]).sum().backward()
    x = s.float().requires_grad_(True)
    out = vocab_parallel_token_stats(x, None, y, temperature=0.8, chunk_size=7)
    assert out.teacher_logp is None and out.kl is None and out.forward_kl is None
    torch.testing.assert_close(out.entropy.double(), ref["entropy"].detach(), rtol=0, atol=VAL_TOL[torch.float32])
    (w[0] * out.logp + w[1] * out.entropy).sum().backward()
    assert_close_grad(x.grad, s64.grad, torch.float32)


def test_gradcheck_float64():
    s, t, y, _ = make_case(7, 13, seed=3)
    t_pad = torch.cat([t, torch.full((7, 3), 1e3, dtype=torch.float64)], 1)  # padded columns, must be ignored
    x = torch.cat([s, torch.randn(7, 3, dtype=torch.float64)], 1).requires_grad_(True)

    def f(x):
        o = vocab_parallel_token_stats(x, t_pad, y, vocab_size=13, temperature=0.7, chunk_size=3)
        return o.logp, o.entropy, o.kl, o.forward_kl

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


def test_chunk_size_invariance():
    s, t, y, w = make_case(37, 200, seed=4)
    results = []
    for chunk in (1, 5, 16, 37, 1000, None):
        x = s.float().requires_grad_(True)
        out = vocab_parallel_token_stats(x, t.float(), y, temperature=0.9, chunk_size=chunk)
        weighted(out, w).backward()
        results.append((torch.stack([getattr(out, k) for k in KEYS]), x.grad))
    # Per-token math does not depend on the chunking; only the reduction order of row sums may (fp32 ulps).
    for vals, grad in results[1:]:
        torch.testing.assert_close(vals, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-9)


def test_padded_vocab_columns_ignored_and_zero_grad():
    s, t, y, w = make_case(12, 50, seed=5)
    ref, g_ref = reference(s, t, y, w, 1.0, torch.float32)
    pad_s = torch.cat([s, torch.full((12, 6), float("nan"), dtype=torch.float64)], 1).float()  # garbage padding
    pad_t = torch.cat([t, torch.full((12, 6), 50.0, dtype=torch.float64)], 1).float()
    x = pad_s.clone().requires_grad_(True)
    out = vocab_parallel_token_stats(x, pad_t, y, vocab_size=50, chunk_size=5)
    for k in KEYS:
        torch.testing.assert_close(getattr(out, k).double(), ref[k], rtol=0, atol=VAL_TOL[torch.float32], msg=k)
    weighted(out, w).backward()
    assert torch.all(x.grad[:, 50:] == 0)
    assert_close_grad(x.grad[:, :50], g_ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_not_modified_and_only_scalars_saved(dtype):
    s, t, y, w = make_case(16, 64, seed=6)
    x = s.to(dtype).requires_grad_(True)
    tt = t.to(dtype)
    x0, t0, y0 = x.detach().clone(), tt.clone(), y.clone()
    out = vocab_parallel_token_stats(x, tt, y, temperature=0.7, chunk_size=4)
    saved = out.logp.grad_fn.saved_tensors
    big = [v for v in saved if v is not None and v.numel() >= 16 * 64]
    # Only the input logits themselves (by reference) are saved at [T, V]; everything else is per-token.
    assert len(big) == 2 and {v.data_ptr() for v in big} == {x.data_ptr(), tt.data_ptr()}
    assert all(v.numel() <= 5 * 16 for v in saved if v is not None and v.numel() < 16 * 64)
    weighted(out, w).backward()
    assert torch.equal(x.detach(), x0) and torch.equal(tt, t0) and torch.equal(y, y0)


@pytest.mark.parametrize(
    "where,value,name,count",
    [("student", float("nan"), "student_logits", 3), ("teacher", float("inf"), "teacher_logits", 3),
     ("student", float("-inf"), "student_logits", 3)],
)
def test_nonfinite_logits_raise_with_name_and_count(where, value, name, count):
    s, t, y, _ = make_case(10, 30, seed=7)
    s, t = s.float(), t.float()
    bad = s if where == "student" else t
    bad[1, 2] = bad[4, 0] = bad[9, 29] = value
    with pytest.raises(NonFiniteLogitsError, match=f"{name} has {count} non-finite values"):
        vocab_parallel_token_stats(s.requires_grad_(True), t, y, chunk_size=4)


def test_bad_targets_raise():
    s, t, y, _ = make_case(5, 30, seed=8)
    y[0] = 30
    with pytest.raises(ValueError, match="targets has 1 ids >= vocab_size=30"):
        vocab_parallel_token_stats(s, t, y)


def test_empty_batch():
    x = torch.zeros(0, 30, requires_grad=True)
    out = vocab_parallel_token_stats(x, torch.zeros(0, 30), torch.zeros(0, dtype=torch.long))
    assert all(getattr(out, k).shape == (0,) for k in KEYS)
    (out.logp.sum() + out.kl.sum() + out.entropy.sum()).backward()
    assert x.grad.shape == (0, 30)


def _check_device(device, compile):
    # padded vocabulary (5000 of 5003 columns) so the per-chunk functions see non-contiguous slices
    s, t, y, w = make_case(300, 5000, seed=31)
    ref, g_ref = reference(s, t, y, w, 0.7, torch.bfloat16)
    pad = torch.randn(300, 3, dtype=torch.float64)
    x = torch.cat([s, pad], 1).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    tt = torch.cat([t, pad], 1).to(device=device, dtype=torch.bfloat16)
    out = vocab_parallel_token_stats(x, tt, y.to(device), vocab_size=5000, temperature=0.7, chunk_size=64,
                                     compile=compile)
    for k in KEYS:
        torch.testing.assert_close(getattr(out, k).double().cpu(), ref[k], rtol=0, atol=5e-5, msg=k)
    weighted(out, w.to(device)).backward()
    assert torch.all(x.grad[:, 5000:] == 0)
    assert_close_grad(x.grad[:, :5000].cpu(), g_ref, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit deprecation noise from inside inductor
def test_compiled_path_matches_reference_cpu():
    # torch.compile of the per-chunk math (inductor, C++ on CPU): about 30 s of compilation on 2 cores
    _check_device("cpu", compile=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_matches_reference(compile):
    # V = 5000 sums: fp32 accumulation order on the GPU differs from the CPU's -> atol 5e-5 on values
    _check_device("cuda", compile)


# ---------------------------------------------------------------------------------------------- gloo, TP = 2 and 3


def _tp_worker(rank, world, cases):
    """Each case: (T, V, widths, vocab_size, dtype, temperature, chunk). Returns per case values and grad slice."""
    calls = {"n": 0}
    orig = dist.all_reduce

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    dist.all_reduce = counting  # spawned process: counts collectives of this rank only
    group = dist.new_group(list(range(world)))
    results = []
    for T, V, widths, vocab_size, dtype, temperature, chunk, seed in cases:
        s, t, y, w = make_case(T, vocab_size, seed)
        padded = sum(widths)
        s = torch.cat([s, torch.randn(T, padded - vocab_size, dtype=torch.float64)], 1)
        t = torch.cat([t, torch.randn(T, padded - vocab_size, dtype=torch.float64)], 1)
        start = sum(widths[:rank])
        x = s[:, start : start + widths[rank]].to(dtype).requires_grad_(True)
        calls["n"] = 0
        out = vocab_parallel_token_stats(
            x, t[:, start : start + widths[rank]].to(dtype), y, group, vocab_start=start, vocab_size=vocab_size,
            temperature=temperature, chunk_size=chunk,
        )
        fwd_calls = calls["n"]
        weighted(out, w).backward()
        results.append(
            {"vals": {k: getattr(out, k).detach().double() for k in KEYS}, "grad": x.grad.double(),
             "fwd_calls": fwd_calls, "bwd_calls": calls["n"] - fwd_calls}
        )
    return results


def _check_tp(world, cases):
    res = run_distributed(_tp_worker, world, cases)
    for ci, (T, V, widths, vocab_size, dtype, temperature, chunk, seed) in enumerate(cases):
        s, t, y, w = make_case(T, vocab_size, seed)
        ref, g_ref = reference(s, t, y, w, temperature, dtype)
        n_chunks = -(-T // chunk)
        start = 0
        for r in range(world):
            got = res[r][ci]
            for k in KEYS:
                torch.testing.assert_close(got["vals"][k], ref[k], rtol=0, atol=VAL_TOL[dtype], msg=f"case {ci} {k}")
            # One MAX, one SUM of sum-exps, one SUM of partials per chunk; backward is collective-free.
            assert got["fwd_calls"] == 3 * n_chunks and got["bwd_calls"] == 0, (got["fwd_calls"], got["bwd_calls"])
            valid = max(0, min(vocab_size - start, widths[r]))
            g = got["grad"]
            assert g.shape == (T, widths[r])
            assert torch.all(g[:, valid:] == 0)
            if valid:
                gr = g_ref[:, start : start + valid]
                atol = GRAD_RTOL[dtype] * g_ref.abs().max().item()
                torch.testing.assert_close(g[:, :valid], gr, rtol=GRAD_RTOL[dtype], atol=atol, msg=f"case {ci} r{r}")
            start += widths[r]


def test_tp2_uneven_vocab_507():
    # (T, V, shard widths, true vocab, dtype, temperature, chunk, seed)
    _check_tp(2, [
        (24, 507, (254, 253), 507, torch.float32, 1.0, 10, 11),  # uneven split, no padding
        (24, 507, (256, 256), 507, torch.bfloat16, 0.7, 24, 12),  # 507 padded to 512 (rank 1: 251 valid)
        (9, 507, (254, 253), 507, torch.float64, 0.6, 4, 13),
    ])


def test_tp3_uneven_and_padded_vocab():
    _check_tp(3, [
        (20, 507, (200, 150, 157), 507, torch.float32, 0.8, 6, 21),  # arbitrary uneven split
        (20, 507, (170, 170, 170), 507, torch.bfloat16, 1.0, 20, 22),  # padded to 510 (rank 2: 167 valid)
        (10, 250, (128, 128, 128), 250, torch.float32, 1.0, 3, 23),  # rank 2 holds only padding
    ])
