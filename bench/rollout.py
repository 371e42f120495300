#!/usr/bin/env python
"""Benchmark the rollout path on CPU: built-in server generation throughput, and exporter + weight sync speed.

1. Generation: `--prompts` x `--samples` sequences of `--new-tokens` tokens (EOS ignored, so every sequence has
   exactly that many) through `RolloutClient` -> HTTP -> the built-in server (batched, KV-cached), in tokens/s.
   Baseline in the same run: transformers' `generate` on the same model, one sequence at a time (KV-cached,
   sampling), on a subset of the sequences. Ratio = server tokens/s / baseline tokens/s.
2. Weight sync: a megatron GPTModel (TP=1, one gloo process) streams its weights through
   `dasd_megatron.model.export.iter_hf_weights` into `WeightSync` for each transport (disk, tensor,
   distributed/gloo) to a built-in server serving the same architecture; seconds per GB of HF weights, measured
   from the first exported tensor to the last server answer (pause/flush/continue included). Baseline: plain
   `torch.save` of the same tensors (already in memory) to the same temporary folder. Ratio = sync s / save s.

The model shape is a Qwen3-style config (`--hidden`, `--layers`, `--vocab`, ...); the default (~58M parameters,
~230 MB fp32) fits a laptop. The last printed line is one JSON object with all numbers.

    python bench/rollout.py                 # CPU default
    python bench/rollout.py --quick         # seconds: tiny shapes (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import warnings  # noqa: E402

import torch  # noqa: E402

# megatron-core on a CPU-only install warns at import about missing Apex/TE; not news in a benchmark
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="G samples per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--baseline-seqs", type=int, default=4, help="sequences generated one at a time (baseline)")
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--transports", default="disk,tensor,distributed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shapes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 64, 128, 2, 4, 2, 509
        args.prompts, args.samples, args.prompt_len, args.new_tokens, args.baseline_seqs = 2, 2, 8, 8, 1
        args.bucket_mb = 0.05
    return args


def make_model(path: str, args) -> str:
    from sglang_rollout.testing import make_tiny_hf_model

    return make_tiny_hf_model(path, seed=0, init_scale=0.05, hidden_size=args.hidden,
                              intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                              num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                              head_dim=args.hidden // args.heads, vocab_size=args.vocab,
                              max_position_embeddings=max(512, args.prompt_len + args.new_tokens + 8))


def bench_generation(model_dir: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    from sglang_rollout.builtin_server import BuiltinServer, ServerArgs
    from sglang_rollout.rollout_client import ClientConfig, RolloutClient, SamplingConfig

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    with BuiltinServer(ServerArgs(model_path=model_dir, port=0, max_batch_size=256)) as server:
        client = RolloutClient([server.url], ClientConfig(samples_per_request=args.samples,
                                                          max_inflight_per_server=args.prompts))
        client.generate(prompts[:1], n=1, sampling=SamplingConfig(max_new_tokens=2))  # warm-up
        t0 = time.perf_counter()
        out = client.generate(prompts, n=args.samples, sampling=sampling)
        dt = time.perf_counter() - t0
        stats = dict(server.api.scheduler.stats)
    tokens = sum(len(s.output_ids) for grp in out for s in grp)
    assert tokens == args.prompts * args.samples * args.new_tokens

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=True)  # warm-up
        t0 = time.perf_counter()
        base_tokens = 0
        for i in range(args.baseline_seqs):
            ids = torch.tensor([prompts[i % len(prompts)]])
            res = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=True, top_k=0, pad_token_id=0)
            base_tokens += res.shape[1] - ids.shape[1]
        base_dt = time.perf_counter() - t0
    return {
        "sequences": args.prompts * args.samples, "generated_tokens": tokens, "server_s": dt,
        "server_tokens_per_s": tokens / dt, "max_batch": stats["max_batch"], "batches": stats["batches"],
        "baseline_tokens": base_tokens, "baseline_s": base_dt, "baseline_tokens_per_s": base_tokens / base_dt,
        "throughput_ratio": (tokens / dt) / (base_tokens / base_dt),
    }


def _sync_worker(rank, world_size, hf_dir, url, transports, bucket_bytes, root, master_port):
    """Build a megatron model at TP=1 from the HF folder; export + sync it once per transport."""
    import inspect

    from dasd_megatron.config import ModelConfig, ParallelConfig, RunConfig
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.export import iter_hf_weights
    from dasd_megatron.model.hf_config import load_hf_architecture, padded_vocab_size
    from dasd_megatron.model.hf_import import load_hf_weights, open_hf_checkpoint
    from dasd_megatron.parallel import initialize_parallel
    from sglang_rollout.http_client import HttpClient
    from sglang_rollout.server_client import ServerClient
    from sglang_rollout.weight_sync import DiskTransport, DistributedTransport, TensorTransport, WeightSync

    cfg = RunConfig(model=ModelConfig(hf_config=hf_dir, seq_length=16, attention_backend="sdpa"),
                    parallel=ParallelConfig(tensor=1))
    arch = load_hf_architecture(hf_dir)
    initialize_parallel(cfg.parallel)
    model = build_model(cfg, arch)
    extra = ({"padded_vocab": padded_vocab_size(arch.vocab_size, 128, 1)}
             if "padded_vocab" in inspect.signature(load_hf_weights).parameters else {})
    load_hf_weights(model, open_hf_checkpoint(hf_dir), **extra)
    make = {
        "disk": lambda: DiskTransport(os.path.join(root, "sync"), base_model_path=hf_dir, keep=1),
        "tensor": lambda: TensorTransport(),
        "distributed": lambda: DistributedTransport(master_address="127.0.0.1", master_port=master_port,
                                                    backend="gloo", timeout_s=600),
    }
    out = {}
    server = ServerClient(url, HttpClient(), timeout_s=600)
    for name in transports:
        sync = WeightSync([server], make[name](), bucket_bytes=bucket_bytes)
        sync.connect()  # group setup is once per run, not per step: keep it out of the timing
        for rep_i in range(2):  # the second sync follows the recorded plan (the steady state): report it
            t0 = time.perf_counter()
            rep = sync.sync(iter_hf_weights(model, arch, bucket_bytes=bucket_bytes, dtype=torch.float32),
                            version=f"{name}-{rep_i}")
            dt = time.perf_counter() - t0
        sync.close()
        out[name] = {"s": dt, "bytes": rep.bytes, "buckets": rep.buckets, "timing": rep.timing}
    # baseline: torch.save of the same tensors, already gathered in memory
    tensors = {n: t.clone() for n, t in iter_hf_weights(model, arch, bucket_bytes=bucket_bytes, dtype=torch.float32)}
    path = os.path.join(root, "baseline.pt")
    t0 = time.perf_counter()
    torch.save(tensors, path)
    out["torch_save"] = {"s": time.perf_counter() - t0, "bytes": sum(t.numel() * t.element_size()
                                                                      for t in tensors.values())}
    os.remove(path)
    return out


def bench_sync(model_dir: str, args, root: str) -> dict:
    from dasd_megatron.testing.distributed import free_port, run_distributed
    from sglang_rollout.builtin_server import BuiltinServer, ServerArgs

    transports = [t for t in args.transports.split(",") if t]
    with BuiltinServer(ServerArgs(model_path=model_dir, port=0)) as server:
        res = run_distributed(_sync_worker, 1, model_dir, server.url, transports,
                              int(args.bucket_mb * (1 << 20)), root, free_port())[0]
    base = res["torch_save"]
    out = {"torch_save_s_per_gb": base["s"] / (base["bytes"] / 1e9), "bytes": base["bytes"]}
    for name in transports:
        r = res[name]
        assert r["bytes"] == base["bytes"], (name, r["bytes"], base["bytes"])
        out[name] = {"s": r["s"], "s_per_gb": r["s"] / (r["bytes"] / 1e9), "buckets": r["buckets"],
                     "ratio_vs_torch_save": r["s"] / base["s"],
                     "phases_s": {k: round(v, 4) for k, v in r["timing"].items()}}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as root:
        model_dir = make_model(os.path.join(root, "hf"), args)
        n_params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            os.path.join(model_dir, "model.safetensors")).values())
        print(f"model: {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab "
              f"{args.vocab}), torch threads {torch.get_num_threads()}", flush=True)
        gen = bench_generation(model_dir, args)
        print(f"generation: built-in server {gen['server_tokens_per_s']:.0f} tok/s ({gen['sequences']} seqs x "
              f"{args.new_tokens} tokens, max batch {gen['max_batch']}) vs one-at-a-time transformers.generate "
              f"{gen['baseline_tokens_per_s']:.0f} tok/s -> ratio {gen['throughput_ratio']:.2f}x", flush=True)
        sync = bench_sync(model_dir, args, root)
        print(f"weight sync ({sync['bytes'] / 1e6:.0f} MB fp32 HF weights; torch.save baseline "
              f"{sync['torch_save_s_per_gb']:.2f} s/GB):", flush=True)
        for name in [t for t in args.transports.split(",") if t]:
            r = sync[name]
            print(f"  {name:>11}: {r['s_per_gb']:.2f} s/GB ({r['s']:.3f} s, {r['buckets']} buckets) -> ratio vs "
                  f"torch.save {r['ratio_vs_torch_save']:.2f}x", flush=True)
    result = {"params": n_params, "generation": gen, "sync": sync}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
