#!/usr/bin/env python
"""Benchmark the fused vocab-parallel token statistics against a naive full-vocabulary implementation.

Both paths compute, for the same inputs, the per-token student log-prob, entropy, teacher log-prob, KL(S||T) and
KL(T||S) at a temperature, and backpropagate `sum_t (a_t logp_t + b_t H_t + c_t KL_t + d_t FKL_t)` (random per-token
weights) to the student logits: exactly what the DASD 'full' estimator needs. The naive path is plain eager torch
that materialises fp32 log-softmaxes and softmaxes of the whole `[T, V]` (autograd saves them for backward); the
fused path is `vocab_parallel_token_stats` (TP = 1 here: the per-shard work is the same under TP).

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
    python bench/loss.py --device cuda --tokens 16384 --vocab 151936 --dtype bf16 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
    p.add_argument("--impl", choices=["both", "fused", "naive"], default="both")
    p.add_argument("--check-tokens", type=int, default=256,
                   help="compare fused vs naive gradients elementwise on this many tokens (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["fused", "naive"], help=argparse.SUPPRESS)
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


def fused_step(s, t, y, w, args):
    from dasd_megatron.loss import vocab_parallel_token_stats  # imported before timing by run_worker

    o = vocab_parallel_token_stats(s, t, y, temperature=args.temperature, chunk_size=args.chunk_size,
                                   compile=args.compile)
    loss = (w[0] * o.logp + w[1] * o.entropy + w[2] * o.kl + w[3] * o.forward_kl).sum()
    loss.backward()
    return loss.detach()


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
    step = fused_step if args.worker == "fused" else naive_step
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
        if args.worker == "fused" and args.check_tokens > 0:
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


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
        return None
    res = {"tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype, "device": args.device,
           "chunk_size": args.chunk_size, "compile": args.compile, "temperature": args.temperature}
    if args.device.startswith("cuda"):
        import torch

        res["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    fused = naive = None
    if args.impl in ("both", "fused"):
        fused = _spawn(args, "fused", args.tokens)
        if fused.get("oom"):
            raise SystemExit("the fused path ran out of memory")
        res.update({f"fused_{k}": v for k, v in fused.items() if k not in ("impl", "tokens")})
    if args.impl in ("both", "naive"):
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
    if fused and naive:
        res["speedup"] = res["naive_time_s"] / fused["time_s"]
        res["memory_ratio"] = res["naive_peak_extra_bytes"] / max(fused["peak_extra_bytes"], 1)
        res["fused_peak_extra_beyond_grad_bytes"] = fused["peak_extra_bytes"] - fused["grad_bytes"]
        if "naive_loss" in res:
            res["loss_rel_diff"] = abs(fused["loss"] - res["naive_loss"]) / max(abs(res["naive_loss"]), 1e-30)
            res["grad_l2_rel_diff"] = abs(fused["grad_l2"] - res["naive_grad_l2"]) / max(res["naive_grad_l2"], 1e-30)

    mem = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "RSS high-water mark (not tracemalloc)"
    print(f"T={args.tokens} V={args.vocab} dtype={args.dtype} device={res.get('device_name', args.device)} "
          f"chunk={args.chunk_size or 'auto'} compile={args.compile}; memory: {mem}")
    if fused:
        print(f"  fused: {fused['time_s'] * 1e3:9.1f} ms   extra peak {_gib(fused['peak_extra_bytes']):7.3f} GiB "
              f"(of which logits grad {_gib(fused['grad_bytes']):.3f} GiB)")
        if "check_grad_max_err_rel" in fused:
            print(f"         grad vs naive on {min(args.check_tokens, args.tokens)} tokens: max err "
                  f"{fused['check_grad_max_err_rel']:.2e} (relative to max |grad|)")
    if naive:
        ex = ""
        if res["naive_extrapolated"]:
            ex = f" (extrapolated from T={res['naive_tokens_run']}: naive OOM at full size)"
        print(f"  naive: {res['naive_time_s'] * 1e3:9.1f} ms   extra peak "
              f"{_gib(res['naive_peak_extra_bytes']):7.3f} GiB{ex}")
    if fused and naive:
        print(f"  ratio: fused is {res['speedup']:.2f}x faster, uses {res['memory_ratio']:.2f}x less extra peak memory"
              + (f"; loss rel diff {res['loss_rel_diff']:.1e}" if "loss_rel_diff" in res else ""))
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
