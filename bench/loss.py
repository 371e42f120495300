#!/usr/bin/env python
"""Benchmark the fused vocab-parallel token statistics (torch and Triton kernels) against a naive implementation.

Both paths compute, for the same inputs, the per-token student log-prob, entropy, teacher log-prob, KL(S||T) and
KL(T||S) at a temperature, and backpropagate `sum_t (a_t logp_t + b_t H_t + c_t KL_t + d_t FKL_t)` (random per-token
weights) to the student logits: exactly what the DASD 'full' estimator needs. The naive path is plain eager torch
that materialises fp32 log-softmaxes and softmaxes of the whole `[T, V]` (autograd saves them for backward); the
fused path is `vocab_parallel_token_stats` with `kernel_backend="torch"` (chunked torch kernels, `--compile` to
torch.compile them); the triton path is the same call with `kernel_backend="triton"` (one streaming pass over the
logits per direction), measured only on CUDA (on CPU Triton runs only in its slow interpreter). TP = 1 here: the
per-shard work is the same under TP.

Memory-bandwidth floor: an ideal forward + backward reads the student and teacher logits once in the forward, once
more in the backward, and writes the logits gradient once: 5 T V e bytes (e bytes per logit), divided by the
device's peak memory bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s, ... from the device name; `--bandwidth-tbs`
overrides, and gives a floor on CPU too). Each variant's time is printed as a multiple of it.

Each implementation runs in its own subprocess so its peak memory is measured cleanly:
  * CUDA: `torch.cuda.max_memory_allocated()` minus the memory allocated before the run (inputs), so "extra peak"
    counts everything the step allocates, including the bf16 gradient of the logits (`[T, V]`, which any
    implementation must produce); "extra peak beyond the logits gradient" subtracts it.
  * CPU: the process's resident-set high-water mark (`resource.getrusage(...).ru_maxrss`, warm-up included) minus
    the resident set after the inputs were created and before the warm-up (`/proc/self/statm`). This is an RSS measurement, not tracemalloc (tracemalloc
    cannot see torch's C++ allocations); it includes allocator caching and is coarser than the CUDA number.
Timing: wall clock of one forward + backward after `--warmup` untimed runs (default 1), with
`torch.cuda.synchronize()` around it on CUDA; `--repeats` timed runs, the minimum reported.
If the naive path runs out of memory, it is re-run on T/2, T/4, ... tokens and its time and memory are scaled up
linearly in T, flagged `naive_extrapolated` in the output.

The last line printed is one JSON object with all numbers (for scripts).

    python bench/loss.py                                   # CPU-sized default: T=2048, V=32000, bf16
    python bench/loss.py --device cuda --tokens 16384 --vocab 151936 --dtype bf16 --compile   # + triton
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from importlib.util import find_spec

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Peak memory bandwidth (TB/s) by a substring of torch.cuda.get_device_name, first match wins (GH200 before H200,
# the PCIe/NVL H100s before the SXM one). Other devices: pass --bandwidth-tbs.
PEAK_TBS = (("GH200", 4.0), ("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", "-T", type=int, default=2048)
    p.add_argument("--vocab", "-V", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk of the fused path (default: auto)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--compile", action="store_true", help="torch.compile the fused per-chunk math (CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs (the minimum is reported)")
    p.add_argument("--impl", choices=["all", "fused", "triton", "naive"], default="all",
                   help="all: fused, naive, and triton where the device is CUDA")
    p.add_argument("--bandwidth-tbs", type=float, default=None,
                   help="peak memory bandwidth in TB/s for the floor (default: from the CUDA device name)")
    p.add_argument("--check-tokens", type=int, default=256,
                   help="compare fused vs naive gradients elementwise on this many tokens (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["fused", "triton", "naive"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- the workloads


def make_inputs(T, V, dtype, device, seed):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)  # same inputs for both subprocesses on one device
    s = torch.empty(T, V, dtype=dtype, device=device)
    t = torch.empty(T, V, dtype=dtype, device=device)
    rows = max(1, (1 << 24) // max(V, 1))  # fill in row blocks: no [T, V] fp32 temporary at setup
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        a = torch.randn(r1 - r0, V, generator=g, device=device) * 2.0
        s[r0:r1] = a.to(dtype)
        t[r0:r1] = (a + torch.randn(r1 - r0, V, generator=g, device=device)).to(dtype)
    y = torch.randint(0, V, (T,), generator=g, device=device)
    w = torch.randn(4, T, generator=g, device=device)
    return s.requires_grad_(True), t, y, w


def fused_step(s, t, y, w, args, backend="torch"):
    from dasd_megatron.loss import vocab_parallel_token_stats  # imported before timing by run_worker

    o = vocab_parallel_token_stats(s, t, y, temperature=args.temperature, chunk_size=args.chunk_size,
                                   compile=args.compile, kernel_backend=backend)
    loss = (w[0] * o.logp + w[1] * o.entropy + w[2] * o.kl + w[3] * o.forward_kl).sum()
    loss.backward()
    return loss.detach()


def triton_step(s, t, y, w, args):
    return fused_step(s, t, y, w, args, backend="triton")


def naive_step(s, t, y, w, args):
    import torch

    ls = torch.log_softmax(s.float() / args.temperature, dim=-1)
    p = ls.exp()
    H = -(p * ls).sum(-1)
    with torch.no_grad():
        lt = torch.log_softmax(t.float() / args.temperature, dim=-1)
        q = lt.exp()
    kl = (p * (ls - lt)).sum(-1)
    fkl = (q * (lt - ls)).sum(-1)
    logp = ls.gather(-1, y[:, None]).squeeze(-1)
    loss = (w[0] * logp + w[1] * H + w[2] * kl + w[3] * fkl).sum()
    loss.backward()
    return loss.detach()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no procfs: fall back to the high-water mark itself (then the delta under-reports)
        return _maxrss_bytes()


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def run_worker(args) -> dict:
    import torch

    import dasd_megatron.loss  # noqa: F401 - import outside the timed region

    dtype = getattr(torch, DTYPES[args.dtype])
    cuda = args.device.startswith("cuda")
    dev = torch.device(args.device)
    step = {"fused": fused_step, "triton": triton_step, "naive": naive_step}[args.worker]
    s, t, y, w = make_inputs(args.tokens, args.vocab, dtype, dev, args.seed)
    warmup = 1 if args.warmup is None else args.warmup
    out = {"impl": args.worker, "tokens": args.tokens}

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    try:
        # CPU: the high-water mark covers the warm-up too (the same computation), so the baseline is the resident set
        # before it; glibc keeps freed blocks resident, so a baseline taken after the warm-up would under-report.
        rss_base = None if cuda else _rss_bytes()
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(s, t, y, w, args)
            s.grad = None
        sync()
        out["warmup_s"] = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        else:
            base = rss_base
        times = []
        for _ in range(args.repeats):
            s.grad = None
            sync()
            t0 = time.perf_counter()
            loss = step(s, t, y, w, args)
            sync()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(dev) if cuda else _maxrss_bytes()) - base
        grad = s.grad.float()
        out.update(time_s=min(times), times_s=times, peak_extra_bytes=int(peak),
                   grad_bytes=s.grad.numel() * s.grad.element_size(), loss=float(loss),
                   grad_l2=float(grad.norm()), memory_method="cuda.max_memory_allocated" if cuda else "rss_high_water")
        if args.worker != "naive" and args.check_tokens > 0:
            n = min(args.check_tokens, args.tokens)
            ss = s.detach()[:n].clone().requires_grad_(True)
            naive_step(ss, t[:n], y[:n], w[:, :n], args)
            g_naive = ss.grad.float()
            ref = g_naive.abs().max().clamp(min=1e-30)
            out["check_grad_max_err_rel"] = float((grad[:n] - g_naive).abs().max() / ref)
    except torch.OutOfMemoryError as e:  # noqa: F841 - reported, the parent extrapolates
        out["oom"] = True
    return out


# ------------------------------------------------------------------------------------------------------ driver


def _spawn(args, impl, tokens) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--tokens", str(tokens), "--vocab",
           str(args.vocab), "--dtype", args.dtype, "--device", args.device, "--temperature", str(args.temperature),
           "--repeats", str(args.repeats), "--seed", str(args.seed), "--check-tokens", str(args.check_tokens)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.compile:
        cmd += ["--compile"]
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        if "OutOfMemory" in proc.stderr or "out of memory" in proc.stderr.lower():
            return {"impl": impl, "tokens": tokens, "oom": True}
        raise RuntimeError(f"{impl} worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def _gib(b):
    return b / 2**30


def _peak_bandwidth_tbs(args, device_name):
    """Peak memory bandwidth in TB/s: --bandwidth-tbs, else from the CUDA device name (None when unknown)."""
    if args.bandwidth_tbs is not None:
        return args.bandwidth_tbs
    for key, tbs in PEAK_TBS:
        if device_name and key in device_name:
            return tbs
    return None


def _fused_summary(res, name, run, naive):
    """Ratios of one fused variant against the naive baseline, into `res` (keys prefixed by `name`)."""
    res.update({f"{name}_{k}": v for k, v in run.items() if k not in ("impl", "tokens")})
    if naive is None:
        return
    pre = "" if name == "fused" else f"{name}_"  # the torch variant keeps the original key names
    res[f"{pre}speedup"] = res["naive_time_s"] / run["time_s"]
    res[f"{pre}memory_ratio"] = res["naive_peak_extra_bytes"] / max(run["peak_extra_bytes"], 1)
    res[f"{name}_peak_extra_beyond_grad_bytes"] = run["peak_extra_bytes"] - run["grad_bytes"]
    if "naive_loss" in res:
        res[f"{pre}loss_rel_diff"] = abs(run["loss"] - res["naive_loss"]) / max(abs(res["naive_loss"]), 1e-30)
        res[f"{pre}grad_l2_rel_diff"] = abs(run["grad_l2"] - res["naive_grad_l2"]) / max(res["naive_grad_l2"], 1e-30)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
        return None
    cuda = args.device.startswith("cuda")
    res = {"tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype, "device": args.device,
           "chunk_size": args.chunk_size, "compile": args.compile, "temperature": args.temperature}
    if cuda:
        import torch

        res["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    if args.impl == "triton" and not cuda:
        raise SystemExit("--impl triton needs --device cuda (on CPU Triton only runs in its interpreter)")
    with_triton = cuda and args.impl in ("all", "triton") and find_spec("triton") is not None
    fused = naive = tri = None
    if args.impl in ("all", "fused"):
        fused = _spawn(args, "fused", args.tokens)
        if fused.get("oom"):
            raise SystemExit("the fused path ran out of memory")
    if with_triton:
        tri = _spawn(args, "triton", args.tokens)
        if tri.get("oom"):
            raise SystemExit("the triton path ran out of memory")
    if args.impl in ("all", "naive"):
        tokens, naive = args.tokens, _spawn(args, "naive", args.tokens)
        while naive.get("oom") and tokens > 1:
            tokens //= 2
            naive = _spawn(args, "naive", tokens)
        scale = args.tokens / tokens
        res["naive_extrapolated"] = tokens != args.tokens
        res["naive_tokens_run"] = tokens
        res["naive_time_s"] = naive["time_s"] * scale
        res["naive_peak_extra_bytes"] = int(naive["peak_extra_bytes"] * scale)
        if tokens == args.tokens:
            res["naive_loss"] = naive["loss"]
            res["naive_grad_l2"] = naive["grad_l2"]
    variants = [(name, run) for name, run in (("fused", fused), ("triton", tri)) if run]
    for name, run in variants:
        _fused_summary(res, name, run, naive)
    if fused and tri:
        res["triton_vs_fused_speedup"] = fused["time_s"] / tri["time_s"]

    # the floor: read student + teacher in the forward, again in the backward, write the gradient once
    elt = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    res["floor_bytes"] = 5 * args.tokens * args.vocab * elt
    tbs = _peak_bandwidth_tbs(args, res.get("device_name"))
    if tbs:
        res["bandwidth_tbs"] = tbs
        res["floor_time_s"] = res["floor_bytes"] / (tbs * 1e12)
        times = [(name, run["time_s"]) for name, run in variants] + ([("naive", res["naive_time_s"])] if naive else [])
        for name, t in times:
            res[f"{name}_over_floor"] = t / res["floor_time_s"]

    mem = "CUDA max_memory_allocated" if cuda else "RSS high-water mark (not tracemalloc)"
    print(f"T={args.tokens} V={args.vocab} dtype={args.dtype} device={res.get('device_name', args.device)} "
          f"chunk={args.chunk_size or 'auto'} compile={args.compile}; memory: {mem}")
    if tbs:
        print(f"  floor: {res['floor_time_s'] * 1e3:9.1f} ms   ({_gib(res['floor_bytes']):.2f} GiB moved at "
              f"{tbs:g} TB/s: logits read twice, gradient written once)")

    def vs_floor(name):
        return f"   {res[f'{name}_over_floor']:6.2f}x the floor" if tbs else ""

    for name, run in variants:
        print(f"  {name:>6}: {run['time_s'] * 1e3:9.1f} ms   extra peak {_gib(run['peak_extra_bytes']):7.3f} "
              f"GiB (of which logits grad {_gib(run['grad_bytes']):.3f} GiB){vs_floor(name)}")
        if "check_grad_max_err_rel" in run:
            print(f"          grad vs naive on {min(args.check_tokens, args.tokens)} tokens: max err "
                  f"{run['check_grad_max_err_rel']:.2e} (relative to max |grad|)")
    if naive:
        ex = ""
        if res["naive_extrapolated"]:
            ex = f" (extrapolated from T={res['naive_tokens_run']}: naive OOM at full size)"
        print(f"   naive: {res['naive_time_s'] * 1e3:9.1f} ms   extra peak "
              f"{_gib(res['naive_peak_extra_bytes']):7.3f} GiB{ex}{vs_floor('naive')}")
    for name, run in variants:
        if naive:
            pre = "" if name == "fused" else f"{name}_"
            print(f"  ratio: {name} is {res[pre + 'speedup']:.2f}x faster, uses {res[pre + 'memory_ratio']:.2f}x less "
                  "extra peak memory"
                  + (f"; loss rel diff {res[pre + 'loss_rel_diff']:.1e}" if pre + "loss_rel_diff" in res else ""))
    if fused and tri:
        print(f"  ratio: triton is {res['triton_vs_fused_speedup']:.2f}x faster than fused")
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
