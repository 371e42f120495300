"""The README's main job, shortened: `dasd train --recipe smollm2_135m_dasd_cpu --nproc 2` from a machine with no
model (the SmolLM2 offline copy is materialised into an empty model cache), one training step instead of twelve and
eight evaluation problems instead of 64. The full run's numbers are in the README and the issue note."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_main_job_one_step(tmp_path):
    from dasd_megatron.testing.distributed import free_port

    run = tmp_path / "run"
    env = dict(os.environ, DASD_MODEL_CACHE=str(tmp_path / "models"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "dasd_megatron.cli", "train", "--recipe", "smollm2_135m_dasd_cpu", "--nproc", "2",
           "train.steps=1", "train.eval_limit=8", f"run_dir={run}", f"rollout.base_port={free_port()}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "converting" in r.stderr and os.path.isdir(tmp_path / "models" / "SmolLM2-135M-Instruct")
    with open(run / "metrics.jsonl") as f:
        m = [json.loads(line) for line in f]
    assert [x["step"] for x in m] == [0, 1]
    assert m[0]["eval/num_problems"] == 8 and m[0]["eval/accuracy"] > 0  # a pretrained model: some answers right
    x = m[1]
    assert x["rollout/num_samples"] == 32 and math.isfinite(x["loss/dasd"]) and x["loss/num_tokens"] > 0
    assert 0 <= x["rollout/reward_mean"] <= 1 and "eval/accuracy" in x
    assert x["rollout/logp_mismatch_abs"] < 1e-3  # server (transformers, fp32) vs trainer (megatron, fp32)
    cfg = json.load(open(run / "config.json"))
    assert cfg["parallel"]["tensor"] == 1 and cfg["reward"]["last_number_fallback"] is True
    assert "train: 1 steps" in r.stdout
