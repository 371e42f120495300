"""`dasd train` with `rollout.transport=distributed` and `rollout.colocated=true` on CPU: TP=2 on gloo, the built-in
rollout server launched by the run, a real gloo weight-update group (trainer rank 0 = group rank 0 on 127.0.0.1 and a
free port, the server = rank 1), two steps.

One run, three checks:

* the sync invariant: the step-2 rollouts were sampled under the weights broadcast after step 1, and the trainer's
  log-probs of those tokens equal the server's (`rollout/logp_mismatch_abs`, as in test_train_e2e); the server
  loaded exactly one broadcast per step, the last stamped `step<N>`;
* the colocated choreography, read from the server's own log (every memory call is logged by the server, which also
  refuses generation while released and weight loads while its weights are released, as SGLang cannot serve then):
  per step release(weights, kv_cache) -> resume(weights) -> broadcast -> resume(kv_cache), nothing else;
* teardown: the group is destroyed on the server before the run ends, and no process of the run outlives it.

And the error path, with a server the test starts itself (`rollout.urls`, as the multi-node launcher's servers):
it serves a model with one layer fewer than the trainer's, so it joins the group, generates, and then refuses the
broadcast weights at the first sync. The run must fail with that error, promptly, having destroyed the group on the
server (which stays up and is asked afterwards), and leave no process behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from dasd_megatron.testing.distributed import free_port
from hf_fixtures import make_tiny_hf, tiny_train_cmd
from proc_marks import marked_processes

pytestmark = pytest.mark.e2e

MARK = "DASD_DISTRIBUTED_TRANSPORT_TEST"
EVENT = re.compile(r"(release_memory_occupation|resume_memory_occupation) tags=(\S.*?): released|"
                   r"(update_weights_from_distributed): \d+ tensors, weight_version=(\S+)|"
                   r"(init_weights_update_group|destroy_weights_update_group) '([^']+)'(.*)")


def _marked(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries the marker."""
    return marked_processes(MARK, marker)


@pytest.fixture(scope="module")
def run(assets):
    root, model, data = assets
    run_dir = str(root / "run")
    marker = uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", **{MARK: marker})
    cmd = tiny_train_cmd(model, data, run_dir, 2, free_port()) + [
        "rollout.transport=distributed", "rollout.colocated=true", "train.checkpoint_interval=0",
        "rollout.request_timeout_s=120"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    print(f"dasd train (2 steps, distributed + colocated): {time.monotonic() - t0:.1f}s")
    assert r.returncode == 0, r.stderr[-4000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(run_dir, "logs", "rollout_server_0.log")) as f:
        events = []
        for line in f:
            m = EVENT.search(line)
            if m:
                events.append(tuple(g for g in m.groups() if g is not None))
    return run_dir, marker, metrics, events


def test_server_serves_the_trainers_weights_after_each_sync(run):
    _, _, m, events = run
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert x["update_successful"] and x["grad_norm"] > 0 and x["weight_sync/buckets"] >= 1
        assert x["rollout/num_samples"] == 4
    # step 1 samples under the HF folder's weights (both sides loaded them), step 2 under those synced after step 1
    for x in m:
        assert x["rollout/logp_mismatch_abs"] < 1e-4, (x["step"], x["rollout/logp_mismatch_abs"])
    loads = [e[1] for e in events if e[0] == "update_weights_from_distributed"]
    n = len(loads) // 2
    assert len(loads) == 2 * n and n >= 1, loads  # the same bucket plan at every sync
    assert loads[n - 1] == "step1" and loads[-1] == "step2", loads  # the version rides on the last bucket


def test_colocated_release_then_resume_around_each_update(run):
    _, _, m, events = run
    memory_and_loads = [e[0].split("_")[0] + (e[1] if e[0] != "update_weights_from_distributed" else "")
                        for e in events if "memory" in e[0] or e[0] == "update_weights_from_distributed"]
    one_step = ["release['weights', 'kv_cache']", "resume['weights']"]
    loads_per_step = sum(e[0] == "update_weights_from_distributed" for e in events) // 2
    one_step += ["update"] * loads_per_step + ["resume['kv_cache']"]
    assert memory_and_loads == one_step * 2, memory_and_loads
    for x in m:
        assert x["timing/release_memory_s"] >= 0
        assert "weight_sync/resume_weights_s" in x and "weight_sync/resume_kv_cache_s" in x


def test_group_is_destroyed_and_nothing_outlives_the_run(run):
    _, marker, _, events = run
    groups = [e for e in events if e[0].endswith("weights_update_group")]
    assert [g[:2] for g in groups] == [("init_weights_update_group", "weight_update_group"),
                                       ("destroy_weights_update_group", "weight_update_group")], groups
    assert "rank 1 of 2 via gloo at 127.0.0.1" in groups[0][2]
    assert events.index(groups[1]) == len(events) - 1  # after the last update
    deadline = time.monotonic() + 15
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _marked(marker), _marked(marker)


def _server_info(url: str) -> dict:
    with urllib.request.urlopen(url + "/server_info", timeout=10) as r:
        return json.loads(r.read())


def test_failed_sync_ends_the_run_and_destroys_the_group(assets):
    root, model, data = assets
    smaller = make_tiny_hf(str(root / "smaller"), "qwen3", num_hidden_layers=3)  # the trainer's model has 4
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "sglang_rollout.builtin_server", "--model-path", smaller,
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _server_info(url)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        marker = uuid.uuid4().hex
        env = dict(os.environ, OMP_NUM_THREADS="1", **{MARK: marker})
        cmd = tiny_train_cmd(model, data, str(root / "failing"), 2, free_port()) + [
            "rollout.transport=distributed", f'rollout.urls=["{url}"]', "train.checkpoint_interval=0",
            "rollout.request_timeout_s=60"]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        elapsed = time.monotonic() - t0
        print(f"failing dasd train: exit {r.returncode} after {elapsed:.1f}s")
        assert r.returncode != 0
        assert "WeightSyncError" in r.stderr and "unknown weight 'model.layers.3." in r.stderr, r.stderr[-4000:]
        assert elapsed < 120, "the failed run took too long to end (a hang until a timeout?)"
        info = _server_info(url)  # the server is still up; the trainer destroyed the group on it while closing
        assert info["weight_update_groups"] == [] and info["weight_version"] == "default"
        log_text = (root / "server.log").read_text()
        assert log_text.index("init_weights_update_group") < log_text.index("destroy_weights_update_group")
        deadline = time.monotonic() + 15
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _marked(marker), _marked(marker)
    finally:
        server.terminate()
        server.wait(30)
