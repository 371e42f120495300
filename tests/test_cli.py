"""The `dasd` command as a user runs it: real subprocesses, torchrun with gloo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _dasd(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "dasd_megatron.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_smoke_tp2_trains_and_writes_config(tmp_path):
    r = _dasd("smoke", "--nproc", "2", "--steps", "4", "parallel.tensor=2", "model.seq_length=32",
              f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TP=2 PP=1 CP=1 DP=1" in r.stderr
    steps = [float(x) for x in re.findall(r"step +\d+ \| loss ([\d.]+)", r.stdout)]
    assert len(steps) == 4 and steps[-1] < steps[0], r.stdout
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["parallel"]["tensor"] == 2 and saved["model"]["seq_length"] == 32


def test_bad_layout_fails_before_launch(tmp_path):
    r = _dasd("smoke", "--nproc", "2", "parallel.tensor=3", f"run_dir={tmp_path}")
    assert r.returncode == 2
    assert "config error: parallel" in r.stderr and "Fix:" in r.stderr
    assert "torch.distributed" not in r.stderr  # nothing was launched
    r = _dasd("validate", "--world-size", "4", "parallel.tensor=2", "parallel.pipeline=2", f"run_dir={tmp_path}")
    assert r.returncode == 0 and r.stdout.startswith("OK:")
    r = _dasd("validate", "--world-size", "2", "parallel.tensr=2", f"run_dir={tmp_path}")
    assert r.returncode == 2 and "unknown field 'tensr'" in r.stderr
