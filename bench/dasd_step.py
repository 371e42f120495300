"""One DASD training step (packing, teacher forward, routed loss through megatron's schedule, optimizer) on synthetic
rollouts: seconds per step and trained tokens/s, for the `full` and `sampled` estimators, each as the single pass
`run` does at PP=1 (`train_single_pass`) and as the two-pass baseline (`score` over student and teacher first, then
`train_after_scoring`; `DASDStep.score_first`), and the `sampled` estimator with two PPO updates per batch
(`train.updates_per_batch=2`: the scoring pass plus two optimizer steps), all in the same run; the ratios show what
the single pass saves, what the full-vocabulary KL costs and what a second update per batch costs. Per variant it
also reports the model FLOPs of the step, the achieved FLOP/s and the MFU, and the aten op count of one step.

    python bench/dasd_step.py                      # GPU: Qwen3-0.6B shape, 64 rollouts of 256 + 768 tokens
    python bench/dasd_step.py --tiny               # CPU smoke
    python bench/dasd_step.py --rollouts 32 --baseline --profile --json out.json    # the GPU check

Options:
  --variants A,B        run only these variants (default: all five: full/single_pass, full/two_pass,
                        sampled/single_pass, sampled/two_pass, sampled/two_pass_two_updates)
  --baseline            also run the landed path in the same process (`dasd_megatron.model.packed.set_fast_path(False)`,
                        `model.fused_kernels=torch`, `loss.kernel_backend=torch`) for `--baseline-variants` (default
                        full/single_pass) as `baseline/<variant>`, and report `speedup_vs_baseline_<estimator>` (the
                        baseline's step time over the default path's; `speedup_vs_baseline` holds all of them). A
                        switch that does not exist yet is reported in `baseline_switches` as missing.
  --profile             one extra step per variant under torch.profiler (CPU + CUDA activities): kernel launches
                        (cudaLaunchKernel, cuLaunchKernel, ...), host syncs (cudaStreamSynchronize,
                        cudaDeviceSynchronize, cudaEventSynchronize), cudaMemcpyAsync calls, kernels and their summed
                        time, `gpu_busy_fraction` (union of the kernels' busy intervals over the profiled step's wall
                        time; also over the unprofiled step time), the top 10 ops by device time (each kernel charged
                        to the aten op that launched it) and by launches, and the top 10 kernels. On CPU the CUDA
                        numbers are None and the top ops are by self CPU time.
  --no-aten-count       skip the aten op count (by default one extra step per variant runs under a TorchDispatchMode
                        counter: `aten_ops_per_step`, and the most frequent ops; works on CPU; torch.compile'd regions
                        count the ops their compiled code dispatches, where the torch version supports that)
  --json PATH           also write the RESULT dict to PATH
  --peak-tflops X       the device's dense bf16 peak for the MFU (default: from the device name, see PEAK_BF16_FLOPS)

Model FLOPs per step (`step_flops`; the usual MFU accounting: matmul FLOPs only, 2 per multiply-add, on the real
tokens of the packs, no padding, the unpadded vocabulary; norms, biases, embedding lookups, RoPE, the optimizer and
the loss's softmax over the vocabulary are not counted; activation recomputation is not counted either):

    h hidden size, f FFN size, n_L layers, H query heads, G key/value heads, d head dim, V vocabulary
    N_eff = n_L * (h*H*d + 2*h*G*d + H*d*h + 3*h*f) + h*V       (q, k, v, o; SwiGLU gate, up, down; LM head)
    attn(docs) = n_L * sum over documents of  2 matmuls * 2 FLOPs * len^2/2 * H*d   (causal forward: QK^T and PV)
    S = sum over rollouts of len(prompt) + len(response)           (student tokens)
    T = sum over rollouts of len(teacher_prompt) + len(response)   (teacher tokens)

    student forward+backward  = 6 * N_eff * S + 3 * attn(student docs)
    student forward           = 2 * N_eff * S + 1 * attn(student docs)
    teacher forward           = 2 * N_eff * T + 1 * attn(teacher docs)

    step = student forward+backward
         + teacher forward               if the teacher term is on and (no scoring pass or estimator == full)
         + student forward               if scoring pass
         + teacher forward               if scoring pass and the teacher term is on

`scoring pass` = the two-pass variants and every variant with updates > 1 (`DASDStep.run`: `score` then
`train_after_scoring`); `teacher term on` = `cfg.loss.teacher_term_on` (beta != 0 and the router not the constant
0). This follows `DASDStep`: the single pass runs the teacher forward inside each micro-batch when the teacher term
is on; the scoring pass runs the student and (teacher term on) the teacher forward; training after scoring runs the
teacher forward again only for the `full` estimator (it needs the teacher's whole distribution). With more than one
update the training forward+backward still sees every token once (the updates split the batch).
`achieved_tflops` = model FLOPs / step time; `mfu` = achieved / the device's dense bf16 peak (None on CPU or an
unknown device).

Prints one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gc
import json
import os
import random
import sys
import tempfile
import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.model import QWEN3_0_6B  # noqa: E402

VARIANTS = {  # name -> (estimator, single pass, updates per batch)
    "full/single_pass": ("full", True, 1),
    "full/two_pass": ("full", False, 1),
    "sampled/single_pass": ("sampled", True, 1),
    "sampled/two_pass": ("sampled", False, 1),
    "sampled/two_pass_two_updates": ("sampled", False, 2),
}

# Dense (no sparsity) bf16 tensor-core peak in FLOP/s, by a substring of torch.cuda.get_device_name(); first match
# wins (the PCIe / NVL H100s before the SXM one). Other devices: --peak-tflops.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12))


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    """The dense bf16 peak of a CUDA device by its name; None for the CPU or an unknown device."""
    if not device_name or device_name == "cpu":
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


# ---------------------------------------------------------------------------------------------------- model FLOPs


def _dims(arch_shape) -> dict:
    """(hidden, ffn, layers, heads, kv heads, head dim, vocab) of an HF config dict or an `HFArchitecture`."""
    if isinstance(arch_shape, dict):
        h, heads = arch_shape["hidden_size"], arch_shape["num_attention_heads"]
        return dict(h=h, f=arch_shape["intermediate_size"], layers=arch_shape["num_hidden_layers"], heads=heads,
                    kv=arch_shape.get("num_key_value_heads") or heads,
                    d=arch_shape.get("head_dim") or h // heads, vocab=arch_shape["vocab_size"])
    a = arch_shape
    return dict(h=a.hidden_size, f=a.ffn_hidden_size, layers=a.num_layers, heads=a.num_attention_heads,
                kv=a.num_query_groups or a.num_attention_heads, d=a.kv_channels, vocab=a.vocab_size)


def effective_params(arch_shape) -> int:
    """N_eff: the matmul weights a token goes through (q, k, v, o, SwiGLU gate/up/down per layer, the LM head)."""
    m = _dims(arch_shape)
    h, d = m["h"], m["d"]
    per_layer = h * m["heads"] * d + 2 * h * m["kv"] * d + m["heads"] * d * h + 3 * h * m["f"]
    return m["layers"] * per_layer + h * m["vocab"]


def _doc_lengths(rollouts) -> tuple[list[int], list[int]]:
    """Student and teacher document lengths: from `Rollout`s, or from (student_len, teacher_len) pairs."""
    s, t = [], []
    for r in rollouts:
        if isinstance(r, (tuple, list)):
            s.append(int(r[0]))
            t.append(int(r[1]))
        else:
            s.append(len(r.prompt_ids) + len(r.response_ids))
            t.append(len(r.teacher_prompt_ids) + len(r.response_ids))
    return s, t


def step_flops(arch_shape, rollouts, estimator: str, two_pass: bool, updates: int = 1, *,
               teacher_term_on: bool = True, breakdown: bool = False):
    """Model FLOPs of one `DASDStep.run` over `rollouts` (module docstring for the formula).

    `arch_shape`: an HF config dict (as `bench.model.QWEN3_0_6B`) or an `HFArchitecture`; `rollouts`: `Rollout`s or
    (student length, teacher length) pairs; `estimator`: 'full' or 'sampled'; `two_pass`: score first even for one
    update; `updates`: optimizer steps per batch (> 1 implies the scoring pass); `teacher_term_on`:
    `cfg.loss.teacher_term_on`. Returns the total (float), or with `breakdown` a dict of the terms and the total."""
    if estimator not in ("full", "sampled"):
        raise ValueError(f"estimator must be 'full' or 'sampled', got {estimator!r}")
    if updates < 1:
        raise ValueError(f"updates must be >= 1, got {updates}")
    m = _dims(arch_shape)
    n_eff = effective_params(arch_shape)
    s_lens, t_lens = _doc_lengths(rollouts)
    S, T = sum(s_lens), sum(t_lens)

    def attn(lens):  # causal forward over each document: 2 matmuls * 2 FLOPs * L^2/2 * H*d, per layer
        return m["layers"] * sum(2 * 2 * (L * L / 2) * m["heads"] * m["d"] for L in lens)

    student_fwd = 2.0 * n_eff * S + attn(s_lens)
    student_fwd_bwd = 6.0 * n_eff * S + 3 * attn(s_lens)
    teacher_fwd = 2.0 * n_eff * T + attn(t_lens)
    scoring = two_pass or updates > 1
    teacher_in_training = teacher_term_on and (not scoring or estimator == "full")
    terms = {
        "student_fwd_bwd": student_fwd_bwd,
        "teacher_fwd": teacher_fwd if teacher_in_training else 0.0,
        "scoring_student_fwd": student_fwd if scoring else 0.0,
        "scoring_teacher_fwd": teacher_fwd if scoring and teacher_term_on else 0.0,
    }
    total = sum(terms.values())
    if not breakdown:
        return total
    return {**terms, "total": total, "n_eff": n_eff, "student_tokens": S, "teacher_tokens": T,
            "attention_fwd_student": attn(s_lens), "attention_fwd_teacher": attn(t_lens)}


# ------------------------------------------------------------------------------------------------------ profiling

LAUNCH_PREFIXES = ("cudaLaunch", "cuLaunch")  # cudaLaunchKernel(ExC), cuLaunchKernel(Ex), cudaLaunchCooperative...
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


class Ev(NamedTuple):
    """One profiler event: `kind` is kineto's activity type ('cpu_op', 'cuda_runtime', 'cuda_driver', 'kernel',
    'gpu_memcpy', 'gpu_memset', ...); `corr` its correlation id; `linked` the correlation id of the CPU op that
    launched it (device and runtime events; 0 for CPU ops)."""

    name: str
    kind: str
    start_ns: int
    end_ns: int
    corr: int = 0
    linked: int = 0


def _union_ns(intervals) -> int:
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def summarise_profile(events: Sequence[Ev], wall_s: float, step_s: Optional[float] = None, top: int = 10) -> dict:
    """Launch / sync / copy counts, kernel time, GPU busy fraction and the top ops of one profiled CUDA step."""
    base = lambda n: n.split("_v")[0]  # noqa: E731 - CUPTI names may carry an API version suffix
    runtime_launches = sum(1 for e in events if e.kind == "cuda_runtime" and e.name.startswith(LAUNCH_PREFIXES))
    driver_launches = sum(1 for e in events if e.kind == "cuda_driver" and e.name.startswith(LAUNCH_PREFIXES))
    syncs = {n: sum(1 for e in events if base(e.name) == n) for n in SYNC_NAMES}
    memcpy_async = sum(1 for e in events if base(e.name) == "cudaMemcpyAsync")
    kernels = [e for e in events if e.kind == "kernel"]
    copies = [e for e in events if e.kind in ("gpu_memcpy", "gpu_memset")]
    kernel_ns = sum(e.end_ns - e.start_ns for e in kernels)
    busy_ns = _union_ns((e.start_ns, e.end_ns) for e in kernels)
    op_name = {e.corr: e.name for e in events if e.kind == "cpu_op"}
    by_op_time: collections.Counter = collections.Counter()
    by_op_kernels: collections.Counter = collections.Counter()
    by_kernel: collections.Counter = collections.Counter()
    by_kernel_n: collections.Counter = collections.Counter()
    for e in kernels + copies:
        op = op_name.get(e.linked, "(no op) " + e.name[:80])
        by_op_time[op] += e.end_ns - e.start_ns
        by_op_kernels[op] += 1
        by_kernel[e.name[:120]] += e.end_ns - e.start_ns
        by_kernel_n[e.name[:120]] += 1
    by_op_launches = collections.Counter(op_name.get(e.linked, "(no op)") for e in events
                                         if e.kind in ("cuda_runtime", "cuda_driver")
                                         and e.name.startswith(LAUNCH_PREFIXES))
    return {
        "profiled_step_s": wall_s,
        "kernel_launches": runtime_launches + driver_launches,
        "runtime_launches": runtime_launches,
        "driver_launches": driver_launches,
        "kernels": len(kernels),
        "host_syncs": sum(syncs.values()),
        "cuda_stream_synchronize": syncs["cudaStreamSynchronize"],
        "cuda_device_synchronize": syncs["cudaDeviceSynchronize"],
        "cuda_event_synchronize": syncs["cudaEventSynchronize"],
        "cuda_memcpy_async": memcpy_async,
        "kernel_time_s": kernel_ns / 1e9,
        "memcpy_memset_time_s": sum(e.end_ns - e.start_ns for e in copies) / 1e9,
        "gpu_busy_s": busy_ns / 1e9,
        "gpu_busy_fraction": busy_ns / 1e9 / wall_s if wall_s > 0 else None,
        "gpu_busy_fraction_vs_unprofiled_step": busy_ns / 1e9 / step_s if step_s else None,
        "top_ops_by_device_time": [{"op": k, "device_time_s": v / 1e9, "kernels": by_op_kernels[k]}
                                   for k, v in by_op_time.most_common(top)],
        "top_ops_by_launches": [{"op": k, "launches": v} for k, v in by_op_launches.most_common(top)],
        "top_kernels": [{"kernel": k, "time_s": v / 1e9, "count": by_kernel_n[k]}
                        for k, v in by_kernel.most_common(top)],
    }


KINDS = ("cpu_op", "cuda_runtime", "cuda_driver", "kernel", "gpu_memcpy", "gpu_memset", "user_annotation",
         "gpu_user_annotation", "python_function", "overhead", "cuda_sync", "cpu_instant_event")


def _kind(activity_type, device_type: str, name: str) -> str:
    """kineto's activity type, or one inferred from the device and the name where it is missing or unknown."""
    if isinstance(activity_type, str) and activity_type in KINDS:
        return activity_type
    if device_type == "CUDA":
        return "gpu_memset" if name.startswith("Memset") else "gpu_memcpy" if name.startswith("Memcpy") else "kernel"
    return "cuda_runtime" if name.startswith(("cuda", "cu")) and not name.startswith("cudnn") else "cpu_op"


def _kineto_events(prof) -> list[Ev]:
    """The profile's raw kineto events (cheap; no FunctionEvent tree); FunctionEvents when that API is missing."""
    try:
        raw = prof.profiler.kineto_results.events()
        return [Ev(e.name(), _kind(e.activity_type(), e.device_type().name, e.name()), e.start_ns(), e.end_ns(),
                   e.correlation_id(), e.linked_correlation_id()) for e in raw]
    except AttributeError:
        out = []
        for e in prof.events():
            kind = _kind(getattr(e, "activity_type", None), e.device_type.name, e.name)
            out.append(Ev(e.name, kind, int(e.time_range.start * 1000), int(e.time_range.end * 1000), e.id,
                          getattr(e, "linked_correlation_id", 0) or 0))
        return out


def profile_step(run_step: Callable[[], object], step_s: Optional[float] = None) -> dict:
    """One `run_step()` under torch.profiler; `summarise_profile` on CUDA, the top ops by self CPU time on CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        run_step()
        _sync()
        wall = time.perf_counter() - t0
    if cuda:
        return summarise_profile(_kineto_events(prof), wall, step_s)
    ka = sorted(prof.key_averages(), key=lambda k: k.self_cpu_time_total, reverse=True)[:10]
    none = dict.fromkeys(k for k in summarise_profile([], wall) if k != "profiled_step_s")  # CUDA-only numbers
    return {"profiled_step_s": wall, **none,
            "top_ops_by_self_cpu_time": [{"op": k.key, "self_cpu_time_s": k.self_cpu_time_total / 1e6,
                                          "calls": k.count} for k in ka]}


def count_aten_ops(run_step: Callable[[], object], top: int = 10) -> dict:
    """One `run_step()` under a TorchDispatchMode that counts the aten (and custom) ops dispatched, backward
    included (the mode travels to autograd's threads)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class Counter(TorchDispatchMode):
        @classmethod
        def ignore_compile_internals(cls):  # off while compiling, on while compiled code runs (newer torch)
            return True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        run_step()
    _sync()
    return {"aten_ops_per_step": sum(counts.values()),
            "aten_top_ops": [{"op": k, "count": v} for k, v in counts.most_common(top)]}


# ------------------------------------------------------------------------------------------------------- the paths


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _has_field(dc, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(dc))


def _packed_module():
    try:
        from dasd_megatron.model import packed
    except ImportError:
        return None
    return packed if hasattr(packed, "set_fast_path") else None


def _fast_path_state(packed) -> Optional[bool]:
    """The fast path's current setting where the module exposes it (a getter or a module flag)."""
    if packed is None:
        return None
    for getter in ("get_fast_path", "fast_path_enabled", "is_fast_path"):
        fn = getattr(packed, getter, None)
        if callable(fn):
            return bool(fn())
    for flag in ("FAST_PATH", "_FAST_PATH", "_fast_path", "fast_path"):
        v = getattr(packed, flag, None)
        if isinstance(v, bool):
            return v
    return None


class Path:
    """The default path (config as given, fast path as the model package sets it) or the landed baseline:
    `set_fast_path(False)`, `model.fused_kernels=torch`, `loss.kernel_backend=torch`."""

    def __init__(self, baseline: bool):
        from dasd_megatron.config import ModelConfig

        self.baseline = baseline
        self.packed = _packed_module()
        self.overrides = ["loss.kernel_backend=torch"] if baseline else []
        self.has_fused = _has_field(ModelConfig, "fused_kernels")
        if baseline and self.has_fused:
            self.overrides.append("model.fused_kernels=torch")
        self._saved: Optional[bool] = None

    def switches(self) -> dict:
        return {"set_fast_path(False)": "applied" if self.packed else "missing (dasd_megatron.model.packed)",
                "model.fused_kernels=torch": "applied" if self.has_fused else "missing (ModelConfig.fused_kernels)",
                "loss.kernel_backend=torch": "applied"}

    def __enter__(self):
        if self.baseline and self.packed is not None:
            self._saved = _fast_path_state(self.packed)
            self.packed.set_fast_path(False)
        return self

    def __exit__(self, *exc):
        if self.baseline and self.packed is not None:
            self.packed.set_fast_path(True if self._saved is None else self._saved)
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rollouts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=768)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--baseline", action="store_true", help="also run the landed path (module docstring)")
    ap.add_argument("--baseline-variants", default="full/single_pass",
                    help="variants the baseline runs with --baseline (comma-separated)")
    ap.add_argument("--profile", action="store_true", help="one extra torch.profiler step per variant")
    ap.add_argument("--no-aten-count", dest="aten_count", action="store_false",
                    help="skip the aten op count step")
    ap.add_argument("--json", help="also write the RESULT dict to this file")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak TFLOP/s for the MFU (default: by device)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.rollouts, args.prompt_len, args.response_len = 8, 16, 24
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    base_names = [v.strip() for v in args.baseline_variants.split(",") if v.strip()] if args.baseline else []
    for v in names + base_names:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")

    from dasd_megatron.config import ModelConfig, PrecisionConfig, RunConfig, apply_overrides
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.parallel import destroy_parallel, initialize_parallel
    from dasd_megatron.loss import grpo_advantages
    from dasd_megatron.train.batch import Rollout
    from dasd_megatron.train.dasd_step import DASDStep
    from dasd_megatron.train.engine import build_optimizer, wrap_ddp

    shape = dict(QWEN3_0_6B)
    if args.tiny:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=1000)
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(shape, f)
    seq = args.prompt_len + 64 + args.response_len
    budget = max(4 * seq, 16384 if not args.tiny else 4 * seq)
    base = RunConfig(model=ModelConfig(hf_config=tmp, seq_length=seq), precision=PrecisionConfig(params_dtype=args.dtype))
    base = apply_overrides(base, [f"train.max_prompt_tokens={args.prompt_len + 64}",
                                  f"train.max_response_tokens={args.response_len}",
                                  f"train.micro_batch_tokens={budget}", "optim.lr=1e-6"])
    arch = load_hf_architecture(tmp)
    rng = random.Random(0)
    rollouts = []
    for i in range(args.rollouts):
        g = i // 8
        prompt = [rng.randrange(arch.vocab_size) for _ in range(args.prompt_len)]
        teacher = prompt + [rng.randrange(arch.vocab_size) for _ in range(64)]
        n = rng.randint(args.response_len // 2, args.response_len)
        resp = [rng.randrange(arch.vocab_size) for _ in range(n)]
        rollouts.append(Rollout(prompt, teacher, resp, [-2.0] * n, reward=float(rng.random() < 0.5), group=g))
    adv = grpo_advantages(torch.tensor([r.reward for r in rollouts]), torch.tensor([r.group for r in rollouts]))
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device_name)
    n_tok = sum(len(r.response_ids) for r in rollouts)
    ctx = initialize_parallel(base.parallel)
    results: dict = {}
    paths = {"default": Path(baseline=False), "baseline": Path(baseline=True)}
    runs = [("default", v) for v in names] + [("baseline", v) for v in base_names]
    try:
        for which, variant in runs:
            est, single, updates = VARIANTS[variant]
            path = paths[which]
            name = variant if which == "default" else f"baseline/{variant}"
            with path:
                cfg = apply_overrides(base, [f"loss.estimator={est}", f"train.updates_per_batch={updates}"]
                                      + path.overrides)
                ddp = wrap_ddp(build_model(cfg, arch))
                step = DASDStep(ddp, build_optimizer(ddp, cfg.optim), cfg, arch, ctx)
                step.score_first = None if updates > 1 else not single
                run_step = functools.partial(step.run, rollouts, list(range(len(rollouts))), adv)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(args.steps + 1):
                    _sync()
                    t0 = time.perf_counter()
                    out = run_step()
                    _sync()
                    times.append(time.perf_counter() - t0)
                dt = sum(times[1:]) / len(times[1:])  # first step compiles / warms up
                fl = step_flops(arch, rollouts, est, two_pass=not single, updates=step.num_updates(len(rollouts)),
                                teacher_term_on=cfg.loss.teacher_term_on, breakdown=True)
                res = {"step_s": dt, "response_tokens_per_s": n_tok / dt, "loss": out["loss/dasd"],
                       "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0,
                       "model_tflops_per_step": fl["total"] / 1e12, "achieved_tflops": fl["total"] / dt / 1e12,
                       "mfu": fl["total"] / dt / peak if peak else None,
                       "flops_breakdown": {k: v for k, v in fl.items() if k not in ("total",)},
                       "fused_kernels": getattr(cfg.model, "fused_kernels", None),
                       "loss_kernel_backend": cfg.loss.kernel_backend,
                       "fast_path": _fast_path_state(path.packed)}
                if args.aten_count:
                    res.update(count_aten_ops(run_step))
                if args.profile:
                    res["profile"] = profile_step(run_step, dt)
            results[name] = res
            if args.json:  # what is done so far, should a later variant fail or the run be cut short
                with open(args.json, "w") as f:
                    json.dump({"partial": True, "device": device_name, "rollouts": args.rollouts,
                               "results": results}, f, indent=2)
            mfu = f", MFU {res['mfu']:.1%}" if res["mfu"] is not None else ""
            print(f"{name:>29}: {dt:.3f} s/step, {n_tok / dt:,.0f} response tokens/s, "
                  f"{res['model_tflops_per_step']:.3g} TFLOP/step, {res['achieved_tflops']:.3g} TFLOP/s{mfu}, "
                  f"loss {out['loss/dasd']:.5f}", flush=True)
            del ddp, step, run_step
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    finally:
        destroy_parallel()

    def ratio(a, b):
        return results[a]["step_s"] / results[b]["step_s"] if a in results and b in results else None

    summary = {"device": device_name, "partial": False, "rollouts": args.rollouts, "dtype": args.dtype,
               "steps": args.steps,
               "peak_flops": peak, "n_eff_params": effective_params(arch), "results": results,
               "single_pass_speedup_full": ratio("full/two_pass", "full/single_pass"),
               "single_pass_speedup_sampled": ratio("sampled/two_pass", "sampled/single_pass"),
               "full_vs_sampled_time_ratio": ratio("full/single_pass", "sampled/single_pass"),
               "two_updates_vs_one_time_ratio_sampled": ratio("sampled/two_pass_two_updates", "sampled/single_pass")}
    headline = results.get("full/single_pass") or (results[names[0]] if names else None)
    if headline:
        summary.update({k: headline[k] for k in ("model_tflops_per_step", "achieved_tflops", "mfu")})
        if "aten_ops_per_step" in headline:
            summary["aten_ops_per_step"] = headline["aten_ops_per_step"]
    if args.baseline:
        summary["baseline_switches"] = paths["baseline"].switches()
        summary["speedup_vs_baseline"] = {v: ratio(f"baseline/{v}", v) for v in base_names}
        for v in base_names:
            est, single, updates = VARIANTS[v]
            key = f"speedup_vs_baseline_{est}" if single else f"speedup_vs_baseline_{v.replace('/', '_')}"
            summary[key] = summary["speedup_vs_baseline"][v]
    _print_table(results)
    print("RESULT " + json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _print_table(results: dict) -> None:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"{'variant':>29} {'s/step':>8} {'TFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6} {'aten ops':>9} "
          f"{'launches':>9} {'syncs':>6} {'memcpy':>7} {'busy':>6}")
    for name, r in results.items():
        p = r.get("profile") or {}
        print(f"{name:>29} {r['step_s']:8.3f} {r['model_tflops_per_step']:10.3g} {r['achieved_tflops']:8.3g} "
              f"{fmt(r['mfu'], '6.1%'):>6} {fmt(r.get('aten_ops_per_step'), 'd'):>9} "
              f"{fmt(p.get('kernel_launches'), 'd'):>9} {fmt(p.get('host_syncs'), 'd'):>6} "
              f"{fmt(p.get('cuda_memcpy_async'), 'd'):>7} {fmt(p.get('gpu_busy_fraction'), '6.1%'):>6}", flush=True)
    for name, r in results.items():
        p = r.get("profile") or {}
        top = p.get("top_ops_by_device_time")
        if top:
            print(f"  {name}: top ops by device time: " + "; ".join(
                f"{t['op']} {t['device_time_s'] * 1e3:.1f} ms ({t['kernels']})" for t in top), flush=True)


if __name__ == "__main__":
    main()
