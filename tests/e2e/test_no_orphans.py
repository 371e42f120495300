"""No orphans: when a launcher dies, however (SIGKILL included), what it started goes with it.

* `sglang_rollout.supervise` (the wrapper SGLang runs under): its command is stopped when the wrapper's parent is
  killed, dies with the wrapper (PDEATHSIG), gets the wrapper's signals, and passes its exit status through;
  a `ServerManager` killed with SIGKILL leaves no SGLang (stand-in) process behind.
* e2e: a 2-rank `dasd train` (TP=2, tiny model, built-in server) whose launcher's process group is SIGKILLed leaves
  no process of the run alive within 30 s, and the same command then resumes and finishes; killing only the
  `dasd` CLI, or only torchrun's agent, also takes every rank and the server down.

Processes of a run are found by an environment marker that every descendant inherits (/proc/<pid>/environ).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from sglang_rollout.testing import free_port

from fake_sglang import make_fake_sglang
from hf_fixtures import tiny_train_cmd
from proc_marks import alive, marked_processes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = "DASD_NO_ORPHANS_TEST"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _marked(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries the marker."""
    return marked_processes(MARK, marker)


def _wait_until(cond, timeout: float, poll: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll)
    return cond()


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- the supervise wrapper ----------------------------------------------------------------------------------------

PARENT = """
import subprocess, sys
wrapped = subprocess.Popen([sys.executable, "-m", "sglang_rollout.supervise", "--grace-s", "2", "--", *sys.argv[1:]])
bare = subprocess.Popen(sys.argv[1:])  # the same command without the wrapper: the control
print(wrapped.pid, bare.pid, flush=True)
wrapped.wait()
"""


def test_wrapper_stops_its_command_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *SLEEPER], stdout=subprocess.PIPE, text=True)
    wrapper, bare = map(int, parent.stdout.readline().split())
    try:
        assert _wait_until(lambda: _children(wrapper), 30)
        child = _children(wrapper)[0]
        assert alive(child) and alive(bare)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_until(lambda: not alive(child) and not alive(wrapper), 10), "the wrapped command outlived"
        time.sleep(1.0)
        assert alive(bare)  # control: without the wrapper the command is orphaned (what the wrapper prevents)
    finally:
        _kill_all([bare, wrapper] + _children(wrapper))


def test_wrapper_forwards_signals_passes_the_status_and_dies_with_its_command():
    w = subprocess.Popen([sys.executable, "-m", "sglang_rollout.supervise", "--", *SLEEPER])
    assert _wait_until(lambda: _children(w.pid), 30)
    child = _children(w.pid)[0]
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=15) == 128 + signal.SIGTERM and _wait_until(lambda: not alive(child), 5)

    w = subprocess.Popen([sys.executable, "-m", "sglang_rollout.supervise", "--", sys.executable, "-c",
                          "import sys; sys.exit(3)"])
    assert w.wait(timeout=30) == 3

    w = subprocess.Popen([sys.executable, "-m", "sglang_rollout.supervise", "--", *SLEEPER])
    assert _wait_until(lambda: _children(w.pid), 30)
    child = _children(w.pid)[0]
    w.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel's parent-death signal takes the command down
    w.wait(timeout=10)
    try:
        assert _wait_until(lambda: not alive(child), 10), "the command outlived its SIGKILLed wrapper"
    finally:
        _kill_all([child])

    r = subprocess.run([sys.executable, "-m", "sglang_rollout.supervise"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no command given" in r.stderr and "Fix:" in r.stderr


MANAGER = """
import os, sys, time
from sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager
port, fake, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = ServerConfig(model_path="/m", port=port, backend="sglang",
                   env=(("PYTHONPATH", os.pathsep.join([fake, os.environ.get("PYTHONPATH", "")])),
                        ("FAKE_SGLANG_OUT", out)))
mgr = ServerManager(ManagerConfig(servers=(cfg,), startup_timeout_s=60)).start()
print("up", flush=True)
time.sleep(600)
"""


def test_sglang_server_goes_when_its_manager_is_killed(tmp_path):
    fake, out = make_fake_sglang(str(tmp_path / "fake")), str(tmp_path / "out.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    mgr = subprocess.Popen([sys.executable, "-c", MANAGER, str(free_port()), fake, out], stdout=subprocess.PIPE,
                           text=True, env=env)
    info = {}
    try:
        assert mgr.stdout.readline().strip() == "up"
        info = json.load(open(out))
        pids = [info["pid"], info["helper_pid"]]  # SGLang's main process and a child of its own
        assert all(alive(p) for p in pids)
        mgr.send_signal(signal.SIGKILL)
        mgr.wait(timeout=10)
        assert _wait_until(lambda: not any(alive(p) for p in pids), 15), "SGLang outlived its killed manager"
    finally:
        if mgr.poll() is None:
            mgr.kill()
        _kill_all([info.get("pid", 0), info.get("helper_pid", 0)] if info else [])


# ---- e2e: dasd train --nproc 2 ------------------------------------------------------------------------------------


def _roles(procs: dict[int, str]) -> dict[str, list[int]]:
    roles: dict[str, list[int]] = {"cli": [], "agent": [], "rank": [], "server": [], "other": []}
    for pid, cmd in procs.items():
        if "torch.distributed.run" in cmd:
            roles["agent"].append(pid)
        elif "sglang_rollout.builtin_server" in cmd:
            roles["server"].append(pid)
        elif "dasd_megatron.cli train --nproc" in cmd:
            roles["cli"].append(pid)
        elif "dasd_megatron.cli train" in cmd:
            roles["rank"].append(pid)
        else:
            roles["other"].append(pid)
    return roles


def _start_and_wait(cmd, env, log, until) -> tuple[subprocess.Popen, dict[str, list[int]]]:
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ok = _wait_until(lambda: p.poll() is None and until(), 300, poll=0.2)
    assert ok and p.poll() is None, f"the run did not get going (rc {p.poll()}); see {log.name}"
    roles = _roles(_marked(env[MARK]))
    # the finder sees the whole run, so "none left" below is not vacuous
    assert len(roles["cli"]) == 1 and len(roles["agent"]) == 1 and len(roles["rank"]) == 2, roles
    assert len(roles["server"]) == 1, roles
    return p, roles


def _assert_none_left(marker: str, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    gone = _wait_until(lambda: not _marked(marker), timeout, poll=0.2)
    left = _marked(marker)
    _kill_all(left)  # never leak them into the rest of the session, even when failing
    assert gone, f"still alive {timeout:.0f} s after the launcher died: {json.dumps(left, indent=1)}"
    print(f"no process of the run left after {time.monotonic() - t0:.1f} s")


def _steps(run_dir: str) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip().endswith("}")]


@pytest.mark.e2e
def test_sigkill_of_the_launcher_group_leaves_no_process_and_the_run_resumes(assets, tmp_path):
    root, model, data = assets
    run = str(tmp_path / "run")
    marker = uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", **{MARK: marker})
    cmd = tiny_train_cmd(model, data, run, 5, free_port())
    ckpt1 = os.path.join(run, "checkpoints", "step_00000001")
    with open(tmp_path / "killed.log", "wb") as log:
        p, _ = _start_and_wait(cmd, env, log, lambda: os.path.exists(ckpt1))
        os.killpg(p.pid, signal.SIGKILL)  # the CLI and torchrun's agent; the ranks have sessions of their own
        done_at_kill = len(_steps(run))
        p.wait(timeout=30)
        _assert_none_left(marker)
    # orphaned ranks would have trained on (this short run even to its end): at most the step in flight landed
    assert len(_steps(run)) <= done_at_kill + 1 < 5, _steps(run)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _steps(run) == list(range(1, 6))
    assert not _marked(marker)


@pytest.mark.e2e
@pytest.mark.parametrize("victim", ["cli", "agent"])
def test_sigkill_of_the_cli_alone_or_the_agent_alone_leaves_no_process(assets, tmp_path, victim):
    """The CLI killed alone (torchrun's agent lives on) or the agent alone (the CLI lives on)."""
    root, model, data = assets
    marker = uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", **{MARK: marker})
    cmd = tiny_train_cmd(model, data, str(tmp_path / "run"), 50, free_port())
    with open(tmp_path / f"{victim}.log", "wb") as log:
        # the server starts after every rank passed initialize_parallel (where the launcher watch is installed)
        p, roles = _start_and_wait(cmd, env, log, lambda: bool(_roles(_marked(marker))["server"]))
        os.kill(roles[victim][0], signal.SIGKILL)
        _assert_none_left(marker)
        assert p.wait(timeout=10) != 0
