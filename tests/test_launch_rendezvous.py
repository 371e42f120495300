"""Rollout-server placement on a node, and how the trainer finds the servers (rendezvous files, SLURM node lists)."""

from __future__ import annotations

import sys
import textwrap

from dasd_megatron.launch.placement import RolloutPlacement
from dasd_megatron.launch.rendezvous import (expand_hostlist, expected_urls, read_records, server_hosts_from_env,
                                             wait_for_servers)
from dasd_megatron.launch.rollout_node import ServerLaunch, plan_servers, run_servers
from recipes import get_recipe

# A stand-in server: answers GET /health with 200, exits after `life` seconds with status `code`.
FAKE_SERVER = textwrap.dedent("""
    import http.server, sys, threading
    port, life, code = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    srv = http.server.HTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    threading.Event().wait(life)
    sys.exit(code)
""")


def test_hostlist_expansion():
    assert expand_hostlist("gpu[01-03,07],login5") == ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]


def test_server_plan_on_separate_and_colocated_nodes():
    sep = get_recipe("qwen3_8b_dasd_2node_2rollout_h100_bf16").placement
    plans = plan_servers(sep, "Qwen/Qwen3-8B", host="r01", port_offset=300, python="py")
    assert [p.gpus for p in plans] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [p.port for p in plans] == [30300, 30310, 30320, 30330]
    assert dict(plans[1].env) == {"CUDA_VISIBLE_DEVICES": "2,3", "NCCL_CUMEM_ENABLE": "0"}
    argv = plans[1].argv
    assert argv[:3] == ("py", "-m", "sglang.launch_server") and "--enable-memory-saver" not in argv
    assert argv[argv.index("--tp-size") + 1] == "2" and argv[argv.index("--mem-fraction-static") + 1] == "0.85"
    assert plans[3].url == "http://r01:30330"
    col = get_recipe("qwen3_1p7b_dasd_1node_h100_bf16").placement
    plans = plan_servers(col, "Qwen/Qwen3-1.7B", host="t01")
    assert len(plans) == 8 and plans[5].gpus == (5,) and "--enable-memory-saver" in plans[5].argv
    builtin = plan_servers(RolloutPlacement(mode="builtin"), "/m", host="h", python="py")
    assert builtin[0].argv[:3] == ("py", "-m", "sglang_rollout.builtin_server") and builtin[0].gpus == ()


def test_addresses_from_the_slurm_environment():
    sep = get_recipe("qwen3_8b_dasd_2node_2rollout_h100_bf16").placement
    env = {"SLURM_JOB_NODELIST_HET_GROUP_0": "t[1-2]", "SLURM_JOB_NODELIST_HET_GROUP_1": "r[1-2]"}
    urls = expected_urls(sep, server_hosts_from_env(sep, env), offset=100)
    assert urls[:2] == ["http://r1:30100", "http://r1:30110"] and urls[-1] == "http://r2:30130" and len(urls) == 8
    col = get_recipe("qwen3_4b_dasd_2node_h100_bf16").placement
    assert server_hosts_from_env(col, {"SLURM_JOB_NODELIST": "t[1-2]"}) == ["t1", "t2"]


def test_node_runner_announces_healthy_servers_and_cleans_up(tmp_path):
    from dasd_megatron.testing.distributed import free_port

    ports = [free_port(), free_port()]
    # server 0 lives 60 s, server 1 exits after 4 s with status 3: the runner must stop server 0 and return 3
    plans = [ServerLaunch(index=i, port=p, gpus=(), env=(), url=f"http://node9:{p}",
                          argv=(sys.executable, "-c", FAKE_SERVER, str(p), life, code))
             for i, (p, life, code) in enumerate(zip(ports, ("60", "4"), ("0", "3")))]
    import threading

    result = {}

    def run():
        try:
            result["rc"] = run_servers(plans, run_dir=str(tmp_path), host="node9", node_index=0, tensor_parallel=1,
                                       job_id="42", poll=0.2)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    runner = threading.Thread(target=run)
    runner.start()
    urls = wait_for_servers(str(tmp_path), expected=2, timeout=30, poll=0.2, job_id="42")
    assert urls == [f"http://node9:{ports[0]}", f"http://node9:{ports[1]}"]
    assert read_records(str(tmp_path), job_id="other") == []
    runner.join(timeout=60)
    assert "error" not in result, result
    assert result["rc"] == 3
    assert read_records(str(tmp_path)) == []  # records removed when the servers stop
