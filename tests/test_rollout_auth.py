"""API key of rollout servers that listen beyond loopback (sglang_rollout.auth).

Real processes and sockets: the rollout node runner starts the built-in server bound to 0.0.0.0 (all traffic of the
test goes to 127.0.0.1), and `ServerManager` starts an SGLang stand-in (tests/fake_sglang.py) under the supervise
wrapper. Checked: 401 without / with a wrong key on every endpoint but /health, success with the key, clients that
find the key through the environment, the key file's mode 0600, and that no process's argv holds the key.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from sglang_rollout import auth
from sglang_rollout.rollout_client import ClientConfig, RolloutClient, SamplingConfig
from sglang_rollout.http_client import HttpClient, HTTPStatusError
from sglang_rollout.server_client import ServerClient
from sglang_rollout.testing import free_port, make_tiny_hf_model

from fake_sglang import make_fake_sglang  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NODE_RUNNER = """
import sys
from dasd_megatron.launch.placement import RolloutPlacement
from dasd_megatron.launch.rollout_node import plan_servers, run_servers
run_dir, model, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
plans = plan_servers(RolloutPlacement(mode="builtin", base_port=port), model, host="127.0.0.1")
sys.exit(run_servers(plans, run_dir=run_dir, host="127.0.0.1", node_index=0, tensor_parallel=1, poll=0.2,
                     health_timeout=120))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("auth") / "hf"), seed=0)


def _call(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = None if body is None else json.dumps(body).encode()
        h = dict(headers or {})
        if data is not None:
            h["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw.strip() else None), r.getheader("WWW-Authenticate")
    finally:
        conn.close()


def _all_cmdlines() -> dict[int, bytes]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    out[int(d)] = f.read()
            except OSError:
                pass
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_gone(pids, timeout=20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if not _gone(p)]
        time.sleep(0.1)
    return alive


def test_node_runner_server_on_all_interfaces_requires_the_run_key(model_dir, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    port = free_port()
    while port > 55000:  # RolloutPlacement keeps base_port + strides + the largest per-job offset below 65536
        port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASD_ROLLOUT_API_KEY")}
    runner = subprocess.Popen([sys.executable, "-c", NODE_RUNNER, run_dir, model_dir, str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(runner.stdout), daemon=True).start()
    try:
        from dasd_megatron.launch.rendezvous import read_records

        deadline = time.monotonic() + 180
        while not read_records(run_dir) and runner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        records = read_records(run_dir)
        assert records, f"no server announced; node runner (rc {runner.poll()}) said:\n{''.join(out)[-4000:]}"
        urls = [r.url for r in records]
        assert urls == [f"http://127.0.0.1:{port}"]
        key_path = os.path.join(run_dir, auth.KEY_FILE_NAME)
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        key = open(key_path).read().strip()
        assert len(key) == 64

        # the server really listens beyond loopback, and no process on the machine has the key in its argv
        server_pid = records[0].pid
        cmdlines = _all_cmdlines()
        assert b"--host\x000.0.0.0" in cmdlines[server_pid]
        assert b"sglang_rollout.builtin_server" in cmdlines[server_pid]
        assert not [pid for pid, c in cmdlines.items() if key.encode() in c]

        # /health needs no key (probes); everything else, known route or not, does: 401 + WWW-Authenticate
        assert _call(port, "GET", "/health")[0] == 200
        assert _call(port, "GET", "/health_generate")[0] == 200
        gen = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}, {"X-Api-Key": key},
                        {"Authorization": f"Basic {key}"}, {"Authorization": f"Bearer {key}x"}):
            for method, path, body in (("POST", "/generate", gen), ("GET", "/model_info", None),
                                       ("POST", "/update_weights_from_disk", {"model_path": str(tmp_path)}),
                                       ("POST", "/pause_generation", {}), ("POST", "/continue_generation", {}),
                                       ("GET", "/nope", None)):
                status, body_out, challenge = _call(port, method, path, body, headers)
                assert status == 401, (method, path, headers, status, body_out)
                assert body_out == {"error": "Unauthorized"} and challenge == "Bearer"
        good = {"Authorization": f"Bearer {key}"}
        status, out_gen, _ = _call(port, "POST", "/generate", gen, good)
        assert status == 200 and len(out_gen["output_ids"]) == 2
        assert _call(port, "GET", "/model_info", None, good)[0] == 200
        assert _call(port, "GET", "/nope", None, good)[0] == 404  # past auth, the route decides

        # clients built without a key find it through $DASD_RUN_DIR (what every process of a launched job has)
        monkeypatch.delenv(auth.API_KEY_ENV, raising=False)
        monkeypatch.delenv(auth.API_KEY_FILE_ENV, raising=False)
        monkeypatch.setenv(auth.RUN_DIR_ENV, run_dir)
        assert ServerClient(urls[0], HttpClient()).model_info()["weight_version"] == "default"
        groups = RolloutClient(urls).generate([[1, 2]], n=2, sampling=SamplingConfig(max_new_tokens=2))
        assert [len(g) for g in groups] == [2]
        # ... and one without any key gets a 401 that says what to do (not retried: a bad key stays bad)
        with pytest.raises(HTTPStatusError, match=r"HTTP 401.*no(ne)?.*Fix: .*DASD_ROLLOUT_API_KEY") as e:
            ServerClient(urls[0], HttpClient(api_key="")).model_info()
        assert not e.value.retryable
        with pytest.raises(Exception, match="HTTP 401"):
            RolloutClient(urls, ClientConfig(api_key="wrong", max_retries=2)).generate(
                [[1]], n=1, sampling=SamplingConfig(max_new_tokens=1))

        # the runner dies without cleanup (SIGKILL): its server does not outlive it
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        assert _wait_gone([server_pid], timeout=20) == [], "the built-in server outlived its killed node runner"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert any("require the run's API key" in line for line in out), out


def test_client_picks_up_a_key_made_after_it_was_built(model_dir, tmp_path, monkeypatch):
    """A 401 makes the client re-read the key (made or rotated since it started) and retry once."""
    from sglang_rollout.builtin_server import BuiltinServer, ServerArgs

    run_dir = str(tmp_path / "run")
    monkeypatch.delenv(auth.API_KEY_ENV, raising=False)
    monkeypatch.delenv(auth.API_KEY_FILE_ENV, raising=False)
    monkeypatch.setenv(auth.RUN_DIR_ENV, run_dir)
    client = ServerClient("http://127.0.0.1:1", HttpClient())
    assert client.http.api_key is None
    key, _ = auth.ensure_key_file(run_dir)
    with BuiltinServer(ServerArgs(model_path=model_dir, port=0, api_key=key)) as s:
        client = ServerClient(s.url, client.http)
        assert client.model_info()["weight_version"] == "default"
        assert client.http.api_key == key


def test_builtin_server_refuses_to_listen_beyond_loopback_without_a_key(model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASD_ROLLOUT_API_KEY")}
    r = subprocess.run([sys.executable, "-m", "sglang_rollout.builtin_server", "--model-path", model_dir, "--host",
                        "0.0.0.0", "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "listens beyond loopback but no API key" in r.stderr and "Fix:" in r.stderr, r.stderr
    from sglang_rollout.builtin_server import BuiltinServer, ServerArgs

    with pytest.raises(ValueError, match="beyond loopback without an API key"):
        BuiltinServer(ServerArgs(model_path=model_dir, host="0.0.0.0", port=0))


def test_key_file_is_private_shared_and_checked(tmp_path, monkeypatch):
    old = os.umask(0)  # even with a permissive umask the file is born 0600
    try:
        keys = []
        threads = [threading.Thread(target=lambda: keys.append(auth.ensure_key_file(str(tmp_path / "run"))[0]))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.umask(old)
    path = str(tmp_path / "run" / auth.KEY_FILE_NAME)
    assert len(set(keys)) == 1 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path / "run")) == [auth.KEY_FILE_NAME]  # no temporary files left
    assert auth.ensure_key_file(str(tmp_path / "run"))[0] == keys[0]  # per run folder: a resume keeps it

    os.chmod(path, 0o644)
    with pytest.raises(auth.AuthError, match=r"mode 0644.*Fix: chmod 600"):
        auth.read_key_file(path)
    os.chmod(path, 0o600)

    env = {auth.RUN_DIR_ENV: str(tmp_path / "run")}
    assert auth.key_from_env(env) == keys[0] and auth.server_key_from_env(env) is None
    other = auth.write_private_file(str(tmp_path / "other"), "k2\n")
    assert auth.key_from_env({**env, auth.API_KEY_FILE_ENV: other}) == "k2"
    assert auth.key_from_env({**env, auth.API_KEY_FILE_ENV: other, auth.API_KEY_ENV: "k3"}) == "k3"
    assert auth.key_from_env({}) is None

    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("127.1.2.3") and auth.is_loopback("::1")
    assert auth.is_loopback("localhost")
    assert not any(auth.is_loopback(h) for h in ("0.0.0.0", "", "::", "10.0.0.5", "node7"))
    assert auth.bearer_matches("Bearer abc", "abc") and auth.bearer_matches("bearer abc", "abc")
    assert not any(auth.bearer_matches(h, "abc") for h in (None, "", "abc", "Bearer ab", "Bearer abcd", "Token abc"))


def test_sglang_gets_its_key_from_a_private_config_file_not_argv(tmp_path):
    """`ServerManager` with backend 'sglang' (a stand-in on PYTHONPATH): the key reaches the server through a 0600
    --config YAML, the server enforces it, the manager's clients send it; the log file is private."""
    from sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager

    fake = make_fake_sglang(str(tmp_path / "fake"))
    out = str(tmp_path / "fake_out.json")
    key = auth.new_key()
    log_file = str(tmp_path / "logs" / "sglang_0.log")
    cfg = ServerConfig(model_path="/models/m", port=free_port(), backend="sglang", api_key=key, log_file=log_file,
                       env=(("PYTHONPATH", os.pathsep.join([fake, REPO, os.environ.get("PYTHONPATH", "")])),
                            ("FAKE_SGLANG_OUT", out)))
    mgr = ServerManager(ManagerConfig(servers=(cfg,), startup_timeout_s=60, health_check_interval_s=0.5))
    with mgr:
        info = json.load(open(out))
        assert info["api_key"] == key  # SGLang got the key, merged from its --config file
        conf = info["config"]
        assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(conf)).st_mode) == 0o700
        cmdlines = _all_cmdlines()
        wrapper = mgr.pid(0)
        assert b"sglang_rollout.supervise" in cmdlines[wrapper] and b"--config" in cmdlines[info["pid"]]
        assert not [pid for pid, c in cmdlines.items() if key.encode() in c]
        assert stat.S_IMODE(os.stat(log_file).st_mode) == 0o600
        assert mgr.clients()[0].model_info()["model_path"] == "/models/m"
        with pytest.raises(HTTPStatusError, match="HTTP 401"):
            ServerClient(mgr.urls[0], HttpClient(api_key="")).model_info()
    assert not os.path.exists(conf)  # the key's config file goes with the manager
    assert _wait_gone([wrapper, info["pid"], info["helper_pid"]], timeout=20) == []


def test_manager_makes_a_key_for_servers_beyond_loopback(monkeypatch):
    from sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager, server_command

    monkeypatch.delenv(auth.API_KEY_ENV, raising=False)
    monkeypatch.delenv(auth.API_KEY_FILE_ENV, raising=False)
    monkeypatch.delenv(auth.RUN_DIR_ENV, raising=False)
    local = ServerManager(ManagerConfig(servers=(ServerConfig(model_path="/m", port=free_port()),)))
    assert local.api_key is None and auth.API_KEY_ENV not in os.environ  # loopback only: no key needed
    cfg = ServerConfig(model_path="/m", port=free_port(), host="0.0.0.0")
    mgr = ServerManager(ManagerConfig(servers=(cfg,)))
    assert mgr.api_key and os.environ[auth.API_KEY_ENV] == mgr.api_key  # exported: this process's clients send it
    assert HttpClient().api_key == mgr.api_key
    assert mgr.api_key not in " ".join(server_command(cfg))
    sg = ServerConfig(model_path="/m", port=1, backend="sglang", api_key="k")
    assert "--api-key" not in server_command(sg) and "k" not in server_command(sg)[1:]
    assert server_command(sg, sglang_config="/x/k.yaml")[-2:] == ["--config", "/x/k.yaml"]
