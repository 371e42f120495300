#!/usr/bin/env python
"""Benchmark the fused-kernel ops (`dasd_megatron.kernels`): eager torch vs torch.compile vs Triton, forward+backward.

For each op (RMSNorm, SwiGLU, RoPE) and each implementation, one step is `y = op(inputs); y.backward(dy)`:

  * eager:   the torch fallback (`rms_norm_torch`, `swiglu_torch`, `apply_rope_torch`): today's unfused ops;
  * compile: `torch.compile(<the torch fallback>, dynamic=True)` (Inductor fuses it, forward and backward);
  * triton:  our Triton kernels (`rms_norm_triton`, ...), CUDA only (on CPU Triton only runs in its interpreter).

Default shape: a Qwen3-0.6B layer over 16384 tokens in bf16: RMSNorm x [16384, 1024]; SwiGLU x [16384, 6144]
(ffn 3072, the fc1 output holds gate and up); RoPE q [16384, 16, 128] with [16384, 1, 128] cos/sin tables.

Bandwidth floor: the bytes an ideal forward + backward must move, e e-byte elements:
  RMSNorm 5 R N e (fwd: read x, write y; bwd: read x and dy, write dx), SwiGLU 8 R f e (fwd: read 2f, write f; bwd:
  read 2f and f, write 2f), RoPE 4 T H D e (fwd: read t, write out; bwd: read dy, write dt) (+ the small weight and
  tables), divided by (a) the device's peak bandwidth (H100 SXM 3.35 TB/s, ... from the device name; --bandwidth-tbs
  overrides) and (b) the copy bandwidth measured in this run (`y.copy_(x)` of a 1 GiB buffer: 2 GiB moved).

Timing: CUDA events around each step after --warmup untimed steps; the median of --repeats. Each line prints the
time in ms, the speedup over eager, and the multiple of the floor; max |difference| to eager is printed as a sanity
check (bf16: ~ one bf16 ulp of the outputs and gradients). The last line is `RESULT {json}` with all numbers.

    python bench/fused_kernels.py                 # CUDA, the Qwen3-0.6B shape
    python bench/fused_kernels.py --cpu           # tiny shapes, eager vs compile only (a smoke test; CPU times say
                                            # nothing about the GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dasd_megatron.kernels import (apply_rope_torch, apply_rope_triton, rms_norm_torch,  # noqa: E402
                                   rms_norm_triton, swiglu_torch, swiglu_triton)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Peak memory bandwidth (TB/s) by a substring of torch.cuda.get_device_name, first match wins (as bench/loss.py)
PEAK_TBS = (("GH200", 4.0), ("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35))
OPS = ("rms_norm", "swiglu", "rope")
EPS = 1e-6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on CPU, eager vs compile only")
    p.add_argument("--tokens", type=int, default=None, help="rows (default 16384; --cpu 256)")
    p.add_argument("--hidden", type=int, default=None, help="RMSNorm width (default 1024; --cpu 96)")
    p.add_argument("--ffn", type=int, default=None, help="SwiGLU f: x is [tokens, 2 f] (default 3072; --cpu 176)")
    p.add_argument("--heads", type=int, default=None, help="RoPE heads (default 16; --cpu 4)")
    p.add_argument("--head-dim", type=int, default=None, help="RoPE head dim = rot dim (default 128; --cpu 32)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (--cpu: fp32)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--impls", default="eager,compile,triton", help="comma-separated subset of eager,compile,triton")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --cpu 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps, the median reported (default 50; --cpu 5)")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="peak bandwidth for the floor (TB/s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cpu = args.cpu
    for name, gpu, small in (("tokens", 16384, 256), ("hidden", 1024, 96), ("ffn", 3072, 176), ("heads", 16, 4),
                             ("head_dim", 128, 32), ("warmup", 5, 2), ("repeats", 50, 5)):
        if getattr(args, name) is None:
            setattr(args, name, small if cpu else gpu)
    if args.dtype is None:
        args.dtype = "fp32" if cpu else "bf16"
    return args


# ------------------------------------------------------------------------------------------------------ workloads


def make_case(op, args, dtype, device):
    """(torch fallback, triton function, inputs (the first requires grad), upstream gradient, ideal bytes moved)."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    e = torch.empty((), dtype=dtype).element_size()
    T = args.tokens

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    if op == "rms_norm":
        N = args.hidden
        x, w = randn(T, N, scale=2.0), (1 + 0.1 * torch.randn(N, generator=g, device=device)).to(dtype)
        return (lambda a, b: rms_norm_torch(a, b, EPS), lambda a, b: rms_norm_triton(a, b, EPS), [x, w],
                randn(T, N), 5 * T * N * e)
    if op == "swiglu":
        f = args.ffn
        return swiglu_torch, swiglu_triton, [randn(T, 2 * f, scale=2.0)], randn(T, f), 8 * T * f * e
    if op == "rope":
        H, D = args.heads, args.head_dim
        pos = torch.arange(T, device=device, dtype=torch.float32) % 4096  # packed documents of 4096 tokens
        inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
        theta = pos[:, None] * inv[None, :]
        freqs = torch.cat([theta, theta], dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
        return (lambda t: apply_rope_torch(t, cos, sin), lambda t: apply_rope_triton(t, cos, sin), [randn(T, H, D)],
                randn(T, H, D), 4 * T * H * D * e)
    raise ValueError(op)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(fn, inputs, dy, warmup, repeats, device):
    """Median seconds of one forward + backward, and its outputs (y, grads) from the last step."""
    leaves = [v.detach().clone().requires_grad_(True) for v in inputs]

    def step():
        for v in leaves:
            v.grad = None
        y = fn(*leaves)
        y.backward(dy)
        return y

    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            y = step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), (y.detach(), [v.grad for v in leaves])


def copy_bandwidth(device, nbytes=1 << 30, repeats=10):
    """Measured bytes/s of `y.copy_(x)` over an `nbytes` buffer (read + write: 2 nbytes moved)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    x.fill_(1.0)
    for _ in range(3):
        y.copy_(x)
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times)


def _max_diff(a, b):
    ya, ga = a
    yb, gb = b
    d = [(ya.float() - yb.float()).abs().max().item()]
    d += [(x.float() - y.float()).abs().max().item() for x, y in zip(ga, gb) if x is not None and y is not None]
    return max(d)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise SystemExit("no CUDA device: run with --cpu (tiny shapes, eager vs compile only)")
    dtype = DTYPES[args.dtype]
    impls = [i for i in args.impls.split(",") if i]
    if device.type != "cuda" and "triton" in impls:
        impls.remove("triton")  # Triton runs on CPU only in its interpreter: nothing to time
    ops = [o for o in args.ops.split(",") if o]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {"device": name, "dtype": args.dtype, "tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn,
           "heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats, "impls": impls, "ops": {}}
    tbs = args.bandwidth_tbs
    if tbs is None:
        tbs = next((v for k, v in PEAK_TBS if k in name), None)
    copy_bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    res["peak_tbs"] = tbs
    res["copy_bandwidth_tbs"] = copy_bw / 1e12
    print(f"device={name} dtype={args.dtype} tokens={args.tokens}; peak {tbs or '?'} TB/s, measured copy "
          f"{copy_bw / 1e12:.3f} TB/s; fwd+bwd, median of {args.repeats}")
    for op in ops:
        torch_fn, triton_fn, inputs, dy, nbytes = make_case(op, args, dtype, device)
        fns = {"eager": torch_fn, "compile": torch.compile(torch_fn, dynamic=True), "triton": triton_fn}
        r = {"shape": [list(v.shape) for v in inputs], "bytes": nbytes, "floor_copy_ms": nbytes / copy_bw * 1e3}
        if tbs:
            r["floor_peak_ms"] = nbytes / (tbs * 1e12) * 1e3
        outs = {}
        for impl in impls:
            t0 = time.perf_counter()
            sec, outs[impl] = time_step(fns[impl], inputs, dy, args.warmup, args.repeats, device)
            r[f"{impl}_ms"] = sec * 1e3
            r[f"{impl}_first_s"] = time.perf_counter() - t0  # warm-up (and compilation) included
        floor = r.get("floor_peak_ms", r["floor_copy_ms"])
        at_copy = f"{r['floor_copy_ms']:.3f} ms at the measured copy bandwidth"
        print(f"{op}: inputs {r['shape']}, {nbytes / 2**20:.1f} MiB moved; floor "
              + (f"{floor:.3f} ms at peak bandwidth ({at_copy})" if tbs else at_copy))
        for impl in impls:
            ms = r[f"{impl}_ms"]
            line = f"  {impl:>7}: {ms:9.3f} ms"
            if "eager_ms" in r:
                r[f"{impl}_speedup"] = r["eager_ms"] / ms
                line += f"   {r[f'{impl}_speedup']:5.2f}x eager"
            r[f"{impl}_over_floor"] = ms / floor
            line += f"   {ms / floor:6.2f}x floor"
            if impl != "eager" and "eager" in outs:
                r[f"{impl}_max_diff_vs_eager"] = _max_diff(outs[impl], outs["eager"])
                line += f"   max|diff| vs eager {r[f'{impl}_max_diff_vs_eager']:.2e}"
            print(line, flush=True)
        res["ops"][op] = r
    print("RESULT " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
