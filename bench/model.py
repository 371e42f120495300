"""Policy-model throughput: megatron's local attention spec vs our SDPA spec, same model, same process.

Builds a Qwen3-0.6B-shaped GPTModel (from an HF config.json, or the built-in shape), runs forward+backward with
megatron's vocab-parallel cross-entropy on random tokens, and reports tokens/s and peak memory per backend, then the
ratio to the `local` baseline. On a GPU (the reference: H200, S=4096: local 12.9k tok/s, SDPA 30.8k tok/s):

    python bench/model.py --seq 4096 --dtype bfloat16

On a CPU it runs a tiny shape (`--tiny`) as a smoke test; CPU times say nothing about GPU speed.
Prints one JSON line (prefix `RESULT `) with all numbers; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

QWEN3_0_6B = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_backend(backend: str, hf_dir: str, args) -> dict:
    from dasd_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.megatron_compat import device

    cfg = RunConfig(
        model=ModelConfig(hf_config=hf_dir, seq_length=args.seq, attention_backend=backend),
        parallel=ParallelConfig(),
        precision=PrecisionConfig(params_dtype=args.dtype),
    )
    arch = load_hf_architecture(hf_dir)
    dev = device()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, arch)
    weights_bytes = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    labels = torch.roll(tokens, -1, dims=1)
    pos = torch.arange(args.seq, device=dev).unsqueeze(0).expand(args.batch, -1)

    def step():
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    for _ in range(args.warmup):
        step()
    _sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
    res = {
        "backend": model.dasd_backend,
        "step_s": dt,
        "tokens_per_s": args.batch * args.seq / dt,
        "peak_mem_gib": peak / 2**30,
        "activation_peak_gib": (peak - weights_bytes) / 2**30,
        "loss": float(loss.detach()),
    }
    del model, tokens, labels
    gc.collect()
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-config", help="HF model dir or config.json (default: Qwen3-0.6B shape)")
    ap.add_argument("--tiny", action="store_true", help="tiny 2-layer shape for a CPU smoke run")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backends", default="local,sdpa")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from dasd_megatron.parallel import destroy_parallel, initialize_parallel
    from dasd_megatron.config import ParallelConfig

    with tempfile.TemporaryDirectory() as tmp:
        if args.hf_config:
            hf_dir = args.hf_config
        else:
            shape = dict(QWEN3_0_6B)
            if args.tiny:
                shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=1000)
            hf_dir = tmp
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(shape, f)
        initialize_parallel(ParallelConfig())
        results = {}
        for backend in args.backends.split(","):
            try:
                r = run_backend(backend, hf_dir, args)
            except Exception as exc:  # noqa: BLE001 - report and measure the other backends
                import traceback

                traceback.print_exc()
                results[backend] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            results[backend] = r
            print(f"{backend:>6}: {r['tokens_per_s']:>10.0f} tok/s  step {r['step_s'] * 1e3:8.1f} ms  "
                  f"peak {r['peak_mem_gib']:.2f} GiB (activations {r['activation_peak_gib']:.2f})  loss {r['loss']:.4f}",
                  flush=True)
        destroy_parallel()
    base = results.get("local")
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "seq": args.seq, "batch": args.batch, "dtype": args.dtype, "results": results}
    if base and "error" not in base:
        for k, r in results.items():
            if "error" in r:
                continue
            summary[f"speedup_{k}_vs_local"] = r["tokens_per_s"] / base["tokens_per_s"]
            if base["activation_peak_gib"] > 0:
                summary[f"activation_mem_ratio_local_vs_{k}"] = base["activation_peak_gib"] / max(
                    r["activation_peak_gib"], 1e-9)
    print("RESULT " + json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
