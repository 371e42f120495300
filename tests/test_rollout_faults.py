"""Faults: a server killed mid-rollout is restarted and its requests re-sent (exactly G samples per prompt);
5xx and duplicate answers are retried/ignored; malformed JSON and hung servers give a clear error in bounded time;
a server that cannot start reports its log.

The killed server is a real `python -m sglang_rollout.builtin_server` subprocess launched by `ServerManager`
(SIGKILL by its pid). Misbehaving servers are small stdlib HTTP servers on loopback in this process.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sglang_rollout.rollout_client import ClientConfig, RolloutClient, RolloutError, SamplingConfig
from sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager, ServerStartError, server_command
from sglang_rollout.testing import free_port, make_tiny_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny") / "hf"), seed=0)


def test_killed_server_is_restarted_and_its_requests_resent(model_dir, tmp_path):
    log_file = str(tmp_path / "server0.log")
    cfg = ManagerConfig(servers=(ServerConfig(model_path=model_dir, port=free_port(), log_file=log_file),),
                        health_check_interval_s=0.5, health_timeout_s=2.0, startup_timeout_s=120)
    with ServerManager(cfg) as mgr:
        pid0 = mgr.pid(0)
        client = RolloutClient(mgr.urls, ClientConfig(samples_per_request=2, max_inflight_per_server=4,
                                                      max_retries=30, backoff_base_s=0.2, backoff_max_s=1.0,
                                                      request_timeout_s=60, rollout_timeout_s=110),
                               on_server_error=mgr.report_failure)
        P, G = 4, 4
        box = {}

        def rollout():
            try:
                box["out"] = client.generate([[1 + i, 2, 3] for i in range(P)], n=G,
                                             sampling=SamplingConfig(max_new_tokens=150, ignore_eos=True, seed=3))
            except BaseException as e:  # noqa: BLE001
                box["err"] = e

        t = threading.Thread(target=rollout)
        t.start()
        deadline = time.monotonic() + 30
        while client.stats["requests"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # requests are in flight on the server
        os.kill(pid0, signal.SIGKILL)
        t.join(115)
        assert not t.is_alive() and "err" not in box, box.get("err")
        out = box["out"]
        assert mgr.restarts(0) == 1 and mgr.pid(0) != pid0
        assert mgr.returncode(0) is None  # the restarted process runs
        assert [len(g) for g in out] == [G] * P
        rids = [s.rid for g in out for s in g]
        assert len(set(rids)) == P * G
        assert all(len(s.output_ids) == 150 for g in out for s in g)
        assert client.stats["retries"] > 0 and max(s.attempts for g in out for s in g) > 1
        assert any("restart: process exited" in e[2] for e in mgr.events)
        assert "listening on" in open(log_file).read()  # the log file got the server's output
    assert mgr.returncode(0) is not None  # stopped on exit


def test_restarted_server_comes_back_with_the_last_synced_weights(model_dir, tmp_path):
    """After a disk sync, `set_weights` makes a restart load the synced folder and announce its version."""
    from transformers import AutoModelForCausalLM

    from sglang_rollout.weight_sync import DiskTransport, WeightSync

    new = AutoModelForCausalLM.from_pretrained(make_tiny_hf_model(str(tmp_path / "b"), seed=1)).state_dict()
    cfg = ManagerConfig(servers=(ServerConfig(model_path=model_dir, port=free_port()),),
                        health_check_interval_s=0.3, startup_timeout_s=120)
    with ServerManager(cfg) as mgr:
        tr = DiskTransport(str(tmp_path / "sync"), base_model_path=model_dir)
        sync = WeightSync(mgr.clients(timeout_s=60), tr)
        sync.sync(new.items(), "v1")
        mgr.set_weights(tr.last_path, sync.version)
        synced = RolloutClient(mgr.urls).logprobs([5, 6, 7, 8])
        pid0 = mgr.pid(0)
        os.kill(pid0, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not any("healthy again" in e[2] for e in mgr.events) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mgr.pid(0) != pid0
        assert mgr.clients()[0].weight_version() == "v1"
        assert RolloutClient(mgr.urls).logprobs([5, 6, 7, 8]) == synced  # same weights, same numbers


def test_hung_server_is_detected_and_restarted(model_dir):
    cfg = ManagerConfig(servers=(ServerConfig(model_path=model_dir, port=free_port()),),
                        health_check_interval_s=0.3, health_timeout_s=0.5, unhealthy_after=2, startup_timeout_s=120)
    restarted = []
    with ServerManager(cfg) as mgr:
        mgr.on_restart(lambda i, url: restarted.append((i, url)))
        pid0 = mgr.pid(0)
        os.kill(pid0, signal.SIGSTOP)  # alive but not answering
        try:
            deadline = time.monotonic() + 90
            while not restarted and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            try:
                os.kill(pid0, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert restarted == [(0, mgr.urls[0])]
        assert any("failed health checks" in e[2] for e in mgr.events)
        c = RolloutClient(mgr.urls)
        assert len(c.generate([[1, 2]], n=1, sampling=SamplingConfig(max_new_tokens=2))[0]) == 1


def test_server_that_cannot_start_reports_its_log(tmp_path):
    log_file = str(tmp_path / "bad.log")
    cfg = ManagerConfig(servers=(ServerConfig(model_path=str(tmp_path / "missing"), port=free_port(),
                                              log_file=log_file),), startup_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 1.*no config.json"):
        ServerManager(cfg).start()
    assert time.monotonic() - t0 < 60


def test_launch_commands_and_config_validation():
    sg = ServerConfig(model_path="/m", port=30001, backend="sglang", tp_size=2, mem_fraction_static=0.5,
                      enable_memory_saver=True, api_key="k", gpu_ids=(2, 3))
    cmd = server_command(sg, python="py", weight_version="7")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    joined = " ".join(cmd)
    for part in ("--model-path /m", "--port 30001", "--tp-size 2", "--mem-fraction-static 0.5",
                 "--enable-memory-saver", "--weight-version 7", "--host 127.0.0.1"):
        assert part in joined, part
    assert "--api-key" not in cmd and "k" not in cmd[1:]  # the key never goes on a command line (ps shows it)
    b = server_command(ServerConfig(model_path="/m", port=1), model_path="/synced")
    assert b[2] == "sglang_rollout.builtin_server" and "--tp-size" not in b and b[4] == "/synced"
    with pytest.raises(ValueError, match=r"tp_size=2.*built-in"):
        ServerConfig(model_path="/m", port=1, tp_size=2)
    with pytest.raises(ValueError, match="gpu_ids"):
        ServerConfig(model_path="/m", port=1, backend="sglang", tp_size=2, gpu_ids=(0,))
    with pytest.raises(ValueError, match="duplicate host:port"):
        ManagerConfig(servers=(ServerConfig(model_path="/m", port=5),) * 2)


# ---- misbehaving servers ---------------------------------------------------------------------------------------


class _Fake:
    """A loopback HTTP server whose /generate misbehaves as `mode` says (for the client's error handling)."""

    def __init__(self, mode: str, fail_times: int = 0):
        self.mode, self.fail_times, self.calls = mode, fail_times, 0
        self.release = threading.Event()
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls += 1
                if fake.mode == "hang":
                    fake.release.wait(20)  # bounded: the test releases it
                    return self._send(500, b"{}")
                if fake.mode == "malformed":
                    return self._send(200, b'{"text": "", "output_ids": [1, 2')
                if fake.mode == "flaky" and fake.calls <= fake.fail_times:
                    return self._send(503 if fake.calls % 2 else 500, b'{"error": "overloaded"}')
                outs = [{"text": "", "output_ids": [7], "meta_info": {
                    "id": rid, "finish_reason": {"type": "length", "length": 1}, "weight_version": "w",
                    "output_token_logprobs": [[-0.5, 7, None]]}} for rid in body["rid"]]
                outs.append(dict(outs[0]))  # a duplicate answer
                outs.append({"text": "", "output_ids": [], "meta_info": {
                    "id": "someone-else", "finish_reason": {"type": "length", "length": 0}, "weight_version": "w",
                    "output_token_logprobs": []}})
                self._send(200, json.dumps(outs).encode())

            def _send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake(request):
    f = _Fake(*request.param)
    yield f
    f.close()


@pytest.mark.parametrize("fake", [("malformed",)], indirect=True)
def test_malformed_json_is_a_clear_error_without_retries(fake):
    client = RolloutClient([fake.url], ClientConfig(max_retries=5, backoff_base_s=0.5))
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match=r"/generate: malformed JSON in a 200 response.*not retryable"):
        client.generate([[1]], n=2, sampling=SamplingConfig(max_new_tokens=1))
    assert time.monotonic() - t0 < 2.0 and fake.calls == 1


@pytest.mark.parametrize("fake", [("hang",)], indirect=True)
def test_hung_server_times_out_with_a_clear_error(fake):
    client = RolloutClient([fake.url], ClientConfig(request_timeout_s=0.5, max_retries=2, backoff_base_s=0.05))
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match=r"after 3 attempts.*no response within the 0.5s timeout"):
        client.generate([[1]], n=1, sampling=SamplingConfig(max_new_tokens=1))
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed < 5.0 and fake.calls == 3


@pytest.mark.parametrize("fake", [("flaky", 3)], indirect=True)
def test_5xx_is_retried_and_duplicate_answers_are_ignored(fake):
    client = RolloutClient([fake.url], ClientConfig(max_retries=5, backoff_base_s=0.02, samples_per_request=4))
    out = client.generate([[1], [2]], n=2, sampling=SamplingConfig(max_new_tokens=1), batch_id="b")
    assert [[s.rid for s in g] for g in out] == [["b-0-0", "b-0-1"], ["b-1-0", "b-1-1"]]
    assert client.stats["retries"] == 3 and client.stats["duplicates_ignored"] == 2
    assert all(s.attempts == 4 and s.output_logprobs == (-0.5,) for g in out for s in g)


def test_connection_refused_exhausts_retries_with_the_cause():
    port = free_port()  # nothing listens there
    client = RolloutClient([f"http://127.0.0.1:{port}"], ClientConfig(max_retries=2, backoff_base_s=0.01))
    with pytest.raises(RolloutError, match=r"after 3 attempts.*ConnectionRefusedError"):
        client.generate([[1]], n=1, sampling=SamplingConfig(max_new_tokens=1))


def test_server_exits_when_its_launcher_is_killed(model_dir, tmp_path):
    """A trainer killed hard (SIGKILL) must not leave its built-in server running: the server watches the pid the
    manager gives it (DASD_PARENT_PID) and shuts down."""
    import subprocess
    import sys

    port = free_port()
    script = (f"import time\nfrom sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager\n"
              f"m = ServerManager(ManagerConfig(servers=(ServerConfig(model_path={model_dir!r}, port={port}),),"
              f" startup_timeout_s=120)).start()\nprint(m.pid(0), flush=True)\ntime.sleep(600)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(launcher.stdout.readline())
    os.kill(server_pid, 0)  # running
    launcher.kill()
    launcher.wait(timeout=30)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{server_pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            break  # exited; only not reaped (its parent is gone, init reaps it)
        time.sleep(0.2)
    else:
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail("the built-in server outlived its killed launcher by 30 s")
