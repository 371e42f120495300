"""`dasd sweep` end to end: a 2-recipe x 2-seed sweep of 1-step tiny runs (tiny random Qwen3, built-in server,
one process each), killed in the middle and resumed, then `dasd sweep-report`: the right runs, and per-method means
and 95% intervals equal to numbers computed here from the runs' own metrics and evaluation records. The diversity
stage (`--diversity K`: a `dasd eval` per run, ~30 s each) is left out here; its command line is checked against
`dasd eval`'s parser in tests/test_sweep_report.py and its records' aggregation there too."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dasd_megatron.data.synthetic import easy_arithmetic, kind_of, write_jsonl
from dasd_megatron.testing.distributed import free_port
from proc_marks import marked_processes

pytestmark = pytest.mark.e2e

RECIPES = ("tiny_qwen3_dasd_cpu", "tiny_qwen3_grpo_cpu")
SEEDS = (1, 2)
T975 = {1: 12.706, 2: 4.303}  # Student t quantiles, df = n - 1


def _sweep_cmd(model, data, evalf, out, port):
    return [sys.executable, "-m", "dasd_megatron.cli", "sweep", "--recipes", ",".join(RECIPES), "--seeds", "2",
            "--out", out, "--eval-data", evalf,
            f"model.hf_config={model}", f"data.source={data}", "trainer.procs_per_node=1", "parallel.tensor=1",
            "train.steps=1", "train.prompts_per_step=2", "train.samples_per_prompt=2", "train.max_prompt_tokens=64",
            "train.max_response_tokens=8", "train.micro_batch_tokens=128", "model.seq_length=128",
            "train.eval_interval=1", "train.checkpoint_interval=1", f"rollout.base_port={port}"]


def _stat(values):
    v = np.asarray(values, dtype=float)
    half = T975[len(v) - 1] * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return v.mean(), half


def test_sweep_killed_resumed_and_reported(assets):
    root, model, data = assets
    evalf = str(root / "heldout.jsonl")
    write_jsonl(evalf, easy_arithmetic(8, seed=11))  # 2 problems of each kind
    out = str(root / "sweep")
    marker = f"sweep-{os.getpid()}-{time.time_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", DASD_TEST_MARK=marker)
    cmd = _sweep_cmd(model, data, evalf, out, free_port())

    # kill the sweep (the parent alone) while its third run trains: the run it had started dies with it
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    second = os.path.join(out, RECIPES[0], "seed2", "metrics.jsonl")
    t0 = time.time()
    while not os.path.exists(second) and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    assert p.poll() is None, p.stdout.read().decode()[-3000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    deadline = time.time() + 30
    while marked_processes("DASD_TEST_MARK", marker) and time.time() < deadline:
        time.sleep(0.2)
    assert not marked_processes("DASD_TEST_MARK", marker), "a training run outlived the killed sweep"

    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"[1/4] {RECIPES[0]}/seed1: done, skipped" in r.stdout  # seed-major order
    assert f"[2/4] {RECIPES[1]}/seed1: done, skipped" in r.stdout
    assert f"[3/4] {RECIPES[0]}/seed2: resuming" in r.stdout
    with open(os.path.join(out, RECIPES[0], "seed1", "logs", "sweep.log")) as f:
        assert sum(" train --recipe " in line for line in f) == 1  # trained once, not again after the resume
    manifest = json.load(open(os.path.join(out, "sweep.json")))
    assert [(x["recipe"], x["seed"]) for x in manifest["runs"]] == [(r_, s) for s in SEEDS for r_ in RECIPES]
    # a different sweep on the same folder is refused before anything runs
    bad = subprocess.run(cmd[:cmd.index("--seeds") + 1] + ["3"] + cmd[cmd.index("--seeds") + 2:],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "holds another sweep" in bad.stderr

    rep = subprocess.run([sys.executable, "-m", "dasd_megatron.cli", "sweep-report", out], capture_output=True,
                         text=True, env=env, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "report", "summary.json")))
    for recipe in RECIPES:
        got = summary["methods"][recipe]
        assert got["seeds"] == list(SEEDS) and not got["missing"] and not got["partial"]
        runs = [os.path.join(out, recipe, f"seed{s}") for s in SEEDS]
        metrics = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in runs]
        for step in (0, 1):  # held-out accuracy at each evaluation step, mean and 95% interval over the seeds
            values = [next(x["eval/accuracy"] for x in m if x["step"] == step) for m in metrics]
            mean, half = _stat(values)
            assert got["eval_accuracy"][str(step)]["values"] == pytest.approx(values)
            assert got["eval_accuracy"][str(step)]["mean"] == pytest.approx(mean)
            assert got["eval_accuracy"][str(step)]["ci95"] == pytest.approx(half, nan_ok=True)
        for kind in ("add_1d", "mul_1d"):  # accuracy by kind from the last evaluation's records
            values = []
            for d in runs:
                rows = [json.loads(line) for line in open(os.path.join(d, "eval_records", "step_00000001.jsonl"))]
                mine = [x for x in rows if kind_of(x["problem"]) == kind]
                assert len(mine) == 2 and all(x["kind"] == kind for x in mine)
                values.append(sum(x["status"] == "correct" for x in mine) / len(mine))
            assert got["kinds"][kind]["mean"] == pytest.approx(np.mean(values))
        assert got["diversity"] is None  # no --diversity (its `dasd eval` stage: tests/test_sweep_report.py)
    md = open(os.path.join(out, "report", "sweep_report.md")).read()
    assert all(r_ in md for r_ in RECIPES) and "](accuracy.png)" in md
