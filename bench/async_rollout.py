#!/usr/bin/env python
"""Benchmark asynchronous rollouts: the same `dasd train` run with `rollout.max_staleness=0` (the baseline: generate,
train, sync, one after the other) and with `--staleness` (default 1: the next batch is generated while this one
trains), in one invocation, on the CPU main job's shape by default (`--recipe smollm2_135m_dasd_cpu`, 2 trainer
processes, the built-in server).

Each run is a real `dasd train` (its own run folder under a temporary directory, evaluation and checkpoints off, so
the loop's phases are what is timed). Reported per run: mean seconds per step over the steps after the first
(the first fills the pipeline and warms up), its phases (`timing/rollout_s`, `timing/train_s`, `timing/sync_s`,
and for the async run how long the trainer waited for a batch, `timing/rollout_wait_s`), and the whole run's wall
time. Ratio = async s/step / sync s/step (< 1: faster). The ideal is max(generate, train) / (generate + train);
on this 2-core machine the server and the two trainer processes share the cores, so overlap buys less than on a
cluster where the rollout servers have their own GPUs. The last printed line is one JSON object with all numbers.

    python bench/async_rollout.py                    # main-job shape, 6 steps per run (~8 min on 2 cores)
    python bench/async_rollout.py --steps 4 --recipe tiny_dasd_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PHASES = ("timing/rollout_s", "timing/reward_s", "timing/train_s", "timing/sync_s", "timing/rollout_wait_s",
          "timing/sync_wait_s", "timing/step_s")


def run(recipe: str, staleness: int, steps: int, nproc: int, run_dir: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "dasd_megatron.cli", "train", "--recipe", recipe, "--nproc", str(nproc),
           f"train.steps={steps}", "train.eval_interval=0", "train.checkpoint_interval=0",
           f"rollout.max_staleness={staleness}", f"run_dir={run_dir}", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"dasd train (max_staleness={staleness}) failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [x for x in rows if x.get("step", 0) >= 1]
    later = rows[1:] or rows
    out = {"max_staleness": staleness, "wall_s": wall, "steps": len(rows),
           "step_s_first": rows[0]["timing/step_s"]}
    for k in PHASES:
        vals = [x[k] for x in later if k in x]
        if vals:
            out[k.split("/")[1] + "_mean"] = sum(vals) / len(vals)
    out["staleness_mean"] = sum(x["rollout/staleness_mean"] for x in later) / len(later)
    out["is_weight_mean"] = sum(x["loss/is_weight_mean"] for x in later) / len(later)
    out["reward_mean"] = sum(x["rollout/reward_mean"] for x in rows) / len(rows)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2_135m_dasd_cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--staleness", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for both runs")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.staleness < 1:
        ap.error("--steps must be >= 2 and --staleness >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_async_") as tmp:
        base = run(args.recipe, 0, args.steps, args.nproc, os.path.join(tmp, "sync"), args.overrides)
        fast = run(args.recipe, args.staleness, args.steps, args.nproc, os.path.join(tmp, "async"), args.overrides)
    ideal = max(base["rollout_s_mean"] + base["reward_s_mean"], base["train_s_mean"]) / (
        base["rollout_s_mean"] + base["reward_s_mean"] + base["train_s_mean"])
    res = {"recipe": args.recipe, "steps": args.steps, "sync": base, "async": fast,
           "ratio_step_s": fast["step_s_mean"] / base["step_s_mean"], "ratio_wall": fast["wall_s"] / base["wall_s"],
           "ideal_ratio_without_sync": ideal}
    for name, r in (("sync (max_staleness=0)", base), (f"async (max_staleness={args.staleness})", fast)):
        print(f"{name:26s} {r['step_s_mean']:7.2f} s/step after the first | generate {r['rollout_s_mean']:6.2f} s "
              f"train {r['train_s_mean']:6.2f} s sync {r['sync_s_mean']:5.2f} s"
              + (f" waited {r['rollout_wait_s_mean']:5.2f} s" if "rollout_wait_s_mean" in r else "")
              + f" | wall {r['wall_s']:6.1f} s | staleness {r['staleness_mean']:.2f}")
    print(f"ratio async/sync: {res['ratio_step_s']:.2f}x per step, {res['ratio_wall']:.2f}x wall "
          f"(ideal max(generate, train)/(generate + train) = {ideal:.2f})")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
