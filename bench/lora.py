"""LoRA vs full training on the same shape: trainer state memory, step time and weight-sync bytes, in one process.

    python bench/lora.py                 # GPU: Qwen3-0.6B shape, 32 rollouts of 256 + 512 tokens, bf16
    python bench/lora.py --tiny          # CPU smoke
    python bench/lora.py --shape smollm2 --rollouts 16 --prompt-len 64 --response-len 32    # the CPU main job's shape

Each variant builds the model at the same shape (random base weights: speed and memory do not depend on them),
wraps it in megatron's DDP, builds megatron's optimizer and times `DASDStep.run` (one DASD step: the teacher forward
inside each micro-batch, the routed loss, backward, the optimizer step) over the same synthetic rollouts:

- `full`: every parameter trains.
- `lora`: rank `--rank` adapters on qkv/proj/fc1/fc2 (`model/lora.py`), the base frozen.

Reported per variant: trainable parameters; trainer state bytes by accounting (parameters, megatron's gradient
buffers, the optimizer's state and fp32 master copies: what LoRA removes), on GPU also the peak allocated memory
of the step; seconds per step (mean after one warm-up step); and the bytes one weight sync sends (full: every HF
weight; lora: the adapter in PEFT form). The ratios lora/full are printed at the end (the numbers to quote; on CPU
absolute times mean little).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "qwen3_0p6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", torch_dtype="bfloat16"),
    "smollm2": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, hidden_act="silu", torch_dtype="float32"),
    "tiny": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000,
                 max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 hidden_act="silu", torch_dtype="float32"),
}


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def trainer_state_bytes(ddp, optimizer) -> dict:
    """Bytes of the parameters, megatron's gradient buffers and the optimizer's state (moments, fp32 masters)."""
    params = _tensor_bytes(p for p in ddp.module.parameters())
    grads = _tensor_bytes(b.grad_data for b in getattr(ddp, "buffers", [])) if hasattr(ddp, "buffers") else 0
    opt_tensors = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        for st in inner.state.values():
            opt_tensors += [v for v in st.values() if torch.is_tensor(v)]
        for group in getattr(opt, "shard_fp32_from_float16_groups", []) or getattr(opt, "fp32_from_float16_groups",
                                                                                    []) or []:
            opt_tensors += list(group)
    optim = _tensor_bytes(opt_tensors)
    return {"param_bytes": params, "grad_buffer_bytes": grads, "optimizer_bytes": optim,
            "trainer_state_bytes": params + grads + optim}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3_0p6b")
    ap.add_argument("--rollouts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--json", help="also write the result dict to this file")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape, args.rollouts, args.prompt_len, args.response_len, args.rank = "tiny", 8, 16, 24, 8

    from dasd_megatron.config import ModelConfig, PrecisionConfig, RunConfig, apply_overrides
    from dasd_megatron.loss import grpo_advantages
    from dasd_megatron.model.builder import build_model
    from dasd_megatron.model.export import iter_hf_weight_buckets
    from dasd_megatron.model.hf_config import load_hf_architecture
    from dasd_megatron.model.lora import apply_lora, count_adapter_params, iter_adapter_buckets
    from dasd_megatron.parallel import destroy_parallel, initialize_parallel
    from dasd_megatron.train.batch import Rollout
    from dasd_megatron.train.dasd_step import DASDStep
    from dasd_megatron.train.engine import build_optimizer, wrap_ddp

    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(SHAPES[args.shape], f)
    arch = load_hf_architecture(tmp)
    seq = args.prompt_len + 64 + args.response_len
    budget = max(4 * seq, 8192)
    base = RunConfig(model=ModelConfig(hf_config=tmp, seq_length=seq, attention_backend="sdpa"),
                     precision=PrecisionConfig(params_dtype=args.dtype))
    base = apply_overrides(base, [f"train.max_prompt_tokens={args.prompt_len + 64}",
                                  f"train.max_response_tokens={args.response_len}",
                                  f"train.micro_batch_tokens={budget}", "optim.lr=1e-6"])
    rng = random.Random(0)
    rollouts = []
    for i in range(args.rollouts):
        prompt = [rng.randrange(arch.vocab_size) for _ in range(args.prompt_len)]
        teacher = prompt + [rng.randrange(arch.vocab_size) for _ in range(64)]
        n = rng.randint(args.response_len // 2, args.response_len)
        resp = [rng.randrange(arch.vocab_size) for _ in range(n)]
        rollouts.append(Rollout(prompt, teacher, resp, [-2.0] * n, reward=float(rng.random() < 0.5), group=i // 8))
    adv = grpo_advantages(torch.tensor([r.reward for r in rollouts]), torch.tensor([r.group for r in rollouts]))
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    ctx = initialize_parallel(base.parallel)
    results: dict = {}
    try:
        for variant in ("full", "lora"):
            cfg = base if variant == "full" else apply_overrides(base, [f"model.lora.rank={args.rank}",
                                                                       f"model.lora.alpha={2 * args.rank}"])
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = build_model(cfg, arch)
            if variant == "lora":
                apply_lora(model, cfg.model.lora, seed=0)
            ddp = wrap_ddp(model)
            opt = build_optimizer(ddp, cfg.optim)
            step = DASDStep(ddp, opt, cfg, arch, ctx)
            trainable = (count_adapter_params(ddp) if variant == "lora"
                         else sum(p.numel() for p in ddp.module.parameters()))
            times = []
            for _ in range(args.steps + 1):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = step.run(rollouts, list(range(len(rollouts))), adv)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            stream = iter_adapter_buckets(ddp, arch) if variant == "lora" else iter_hf_weight_buckets(ddp, arch)
            sync_bytes = sum(t.numel() * t.element_size() for bucket in stream for _, t in bucket)
            res = {"trainable_params": trainable, "step_s": sum(times[1:]) / len(times[1:]),
                   "loss": out["loss/dasd"], "sync_bytes": sync_bytes, **trainer_state_bytes(ddp, opt),
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
            results[variant] = res
            print(f"{variant:>5}: {trainable:,} trainable params | trainer state {res['trainer_state_bytes'] / 2**20:,.1f}"
                  f" MiB (params {res['param_bytes'] / 2**20:,.1f}, grad buffers {res['grad_buffer_bytes'] / 2**20:,.1f}"
                  f", optimizer {res['optimizer_bytes'] / 2**20:,.1f}) | {res['step_s']:.3f} s/step | sync "
                  f"{sync_bytes / 2**20:,.1f} MiB" + (f" | peak {res['peak_mem_gib']:.2f} GiB" if cuda else ""),
                  flush=True)
            del ddp, opt, step, model
            gc.collect()
    finally:
        destroy_parallel()
    f, lo = results["full"], results["lora"]
    ratios = {k: lo[k] / f[k] for k in ("trainable_params", "trainer_state_bytes", "optimizer_bytes",
                                        "grad_buffer_bytes", "step_s", "sync_bytes") if f[k]}
    if cuda:
        ratios["peak_mem_gib"] = lo["peak_mem_gib"] / f["peak_mem_gib"]
    print("lora / full: " + ", ".join(f"{k} {v:.4g}" for k, v in ratios.items()))
    out = {"device": device, "shape": args.shape, "rank": args.rank, "rollouts": args.rollouts,
           "dtype": args.dtype, "results": results, "ratios": ratios}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    print("RESULT " + json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
