"""The main job submitted through nemo-run to a real single-node SLURM (slurmctld, slurmd, munge, slurmdbd +
mariadb) started on this machine by scripts/slurm/start_local_cluster.sh. Skips, saying why, where that cannot run.

Measured on the shared 2-core development machine: cluster set-up 45 s the first time (apt-get install of slurm,
munge and mariadb included), 14 s when the packages are there but the daemons are stopped, 0.1 s when it is up;
submit + job of the shortened main job (sbatch, 2 torchrun processes, SmolLM2 materialised, two evaluations and one
DASD step, nemo-run polling sacct): see the issue note.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dasd_megatron.config import RunConfig, from_dict

REPO = Path(__file__).resolve().parents[2]
START = REPO / "scripts" / "slurm" / "start_local_cluster.sh"
ACCOUNT = os.environ.get("DASD_SLURM_ACCOUNT", "dasd")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def local_slurm():
    """Start (or find) the local cluster; returns the set-up time in seconds."""
    if sys.platform != "linux":
        pytest.skip("the local SLURM cluster is set up from Debian packages (Linux only)")
    t0 = time.monotonic()
    try:
        r = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("local SLURM set-up did not finish in 900 s")
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        pytest.skip(f"local SLURM could not be started (start_local_cluster.sh exit {r.returncode}): {tail}")
    return time.monotonic() - t0


def test_main_job_runs_on_local_slurm(local_slurm, tmp_path, record_property):
    """The README's main job (`smollm2_135m_dasd_cpu`, the train job kind), shortened to one step and four
    evaluation problems, submitted through nemo-run's SLURM executor and polled to completion."""
    from dasd_megatron.testing.distributed import free_port

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-W", "ignore", "-m", "dasd_megatron.launch", "submit", "--recipe", "smollm2_135m_dasd_cpu",
           "--executor", "slurm", "--job", "train", "--wait",
           "--account", ACCOUNT, "--partition", "debug", "--time", "00:15:00", "--packager", "none",
           "--python", sys.executable, "--env", f"PYTHONPATH={REPO}", "--env", f"DASD_MODEL_CACHE={tmp_path / 'models'}",
           "--env", "HF_HUB_OFFLINE=1", "--experiments-dir", str(tmp_path / "exp"),
           f"run_dir={run_dir}", "train.steps=1", "train.eval_limit=4", "train.prompts_per_step=2",
           f"rollout.base_port={free_port()}"]
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemo_run_home"))
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
    job_seconds = time.monotonic() - t0
    record_property("slurm_setup_s", round(local_slurm, 1))
    record_property("submit_and_job_s", round(job_seconds, 1))
    print(f"\nlocal SLURM set-up {local_slurm:.1f} s; submit + job {job_seconds:.1f} s")
    logs = re.findall(r"^log:\s+(\S+)$", r.stdout, flags=re.M)
    text = "".join(Path(p).read_text() for p in logs if "/log-" in p and os.path.exists(p))
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}\njob log:\n{text[-3000:]}"
    assert "state:       SUCCEEDED" in r.stdout

    (job_id,) = re.search(r"^job ids:\s+(\S+)$", r.stdout, flags=re.M).groups()
    state = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert state == ["COMPLETED|0:0"], state  # slurmdbd recorded it

    config = from_dict(RunConfig, json.loads((run_dir / "config.json").read_text()))
    assert (config.parallel.tensor, config.train.steps, config.run_dir) == (1, 1, str(run_dir))
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["recipe"] == "smollm2_135m_dasd_cpu" and launch["executor"] == "slurm"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1] and metrics[0]["eval/num_problems"] == 4
    assert metrics[1]["rollout/num_samples"] == 8 and metrics[1]["loss/num_tokens"] > 0
    assert re.search(r"train: 1 steps in \d+ s \| reward [\d.]+ -> [\d.]+ \| eval accuracy", text), text[-3000:]
