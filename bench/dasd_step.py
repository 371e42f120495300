"""One DASD training step (packing, teacher forward, routed loss through megatron's schedule, optimizer) on synthetic
rollouts: seconds per step and trained tokens/s, for the `full` and `sampled` estimators, each as the single pass
`run` does at PP=1 (`train_single_pass`) and as the two-pass baseline (`score` over student and teacher first, then
`train_after_scoring`; `DASDStep.score_first`), and the `sampled` estimator with two PPO updates per batch
(`train.updates_per_batch=2`: the scoring pass plus two optimizer steps), all in the same run; the ratios show what
the single pass saves, what the full-vocabulary KL costs and what a second update per batch costs.

    python bench/dasd_step.py                      # GPU: Qwen3-0.6B shape, 64 rollouts of 256 + 768 tokens
    python bench/dasd_step.py --tiny               # CPU smoke

Prints one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.model import QWEN3_0_6B  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rollouts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=768)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = ap.parse_args(argv)
    if args.tiny:
        args.rollouts, args.prompt_len, args.response_len = 8, 16, 24

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
    ctx = initialize_parallel(base.parallel)
    results = {}
    variants = [(est, single, 1) for est in ("full", "sampled") for single in (True, False)] + [("sampled", False, 2)]
    for est, single, updates in variants:
        name = f"{est}/{'single_pass' if single else 'two_pass'}" + ("" if updates == 1 else "_two_updates")
        cfg = apply_overrides(base, [f"loss.estimator={est}", f"train.updates_per_batch={updates}"])
        ddp = wrap_ddp(build_model(cfg, arch))
        step = DASDStep(ddp, build_optimizer(ddp, cfg.optim), cfg, arch, ctx)
        step.score_first = None if updates > 1 else not single
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps + 1):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = step.run(rollouts, list(range(len(rollouts))), adv)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = sum(times[1:]) / len(times[1:])  # first step compiles / warms up
        n_tok = sum(len(r.response_ids) for r in rollouts)
        results[name] = {"step_s": dt, "response_tokens_per_s": n_tok / dt, "loss": out["loss/dasd"],
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                         else 0}
        print(f"{name:>20}: {dt:.3f} s/step, {n_tok / dt:,.0f} response tokens/s, loss {out['loss/dasd']:.5f}",
              flush=True)
        del ddp, step
    destroy_parallel()
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "rollouts": args.rollouts, "results": results,
               "single_pass_speedup_full": results["full/two_pass"]["step_s"] / results["full/single_pass"]["step_s"],
               "single_pass_speedup_sampled": (results["sampled/two_pass"]["step_s"]
                                               / results["sampled/single_pass"]["step_s"]),
               "full_vs_sampled_time_ratio": (results["full/single_pass"]["step_s"]
                                              / results["sampled/single_pass"]["step_s"]),
               "two_updates_vs_one_time_ratio_sampled": (results["sampled/two_pass_two_updates"]["step_s"]
                                                         / results["sampled/single_pass"]["step_s"])}
    print("RESULT " + json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
