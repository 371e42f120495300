"""Start and watch one node's rollout servers: ``python -m dasd_megatron.launch.rollout_node --run-dir RUN``.

Reads ``RUN/launch.json`` (the placement) and ``RUN/config.json`` (the model), plans this node's servers
(`plan_servers`: GPUs ``[i*tp, (i+1)*tp)``, port ``base_port + i*port_stride + $DASD_PORT_OFFSET``), starts each as a
subprocess (``python -m sglang.launch_server``; the built-in CPU server for placement 'builtin'), announces each in
the run folder once its ``/health`` answers (`dasd_megatron.launch.rendezvous`), and then watches them: when one
exits, the others are stopped and the runner exits with that server's status; SIGTERM/SIGINT stop them all.

The node index is ``--node-index``, else ``$SLURM_NODEID`` (relative to the het group's step), else 0.

Security: the servers listen on every interface (``--host 0.0.0.0``), so they require the run's API key
(`sglang_rollout.auth`): ``RUN/rollout_api_key``, mode 0600, made by the first node runner. It never goes on a command
line: the built-in server gets it as ``$DASD_ROLLOUT_API_KEY``, SGLang as ``--config RUN/rollout_api_key.sglang.yaml``
(mode 0600, merged by SGLang in-process); the trainer's clients read the key file through ``$DASD_RUN_DIR``. SGLang
versions that log their arguments write the key to this runner's output (the job's log): keep that private.

No orphans: SGLang runs under `sglang_rollout.supervise` and the built-in server watches ``$DASD_PARENT_PID``, so
the servers stop when this runner is gone, even when it is killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from dasd_megatron.launch.checks import CONFIG_FILE, read_launch_record
from dasd_megatron.launch.placement import RolloutPlacement
from dasd_megatron.launch.rendezvous import ServerRecord, remove_records, write_record
from sglang_rollout import auth
from sglang_rollout.supervise import PARENT_PID_ENV, supervise_argv


@dataclass(frozen=True)
class ServerLaunch:
    """One server this node starts: its command, environment additions, and where it will answer."""

    index: int
    port: int
    gpus: tuple[int, ...]
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    url: str


def lora_server_args(config: dict) -> list[str]:
    """SGLang's LoRA flags for a run whose policy is a LoRA adapter synced alone (`model.lora.sync=adapter`, from
    the run's config.json): `--enable-lora --max-lora-rank R --lora-target-modules ...` (the built-in server takes
    the same flags); none otherwise."""
    from dasd_megatron.config import LoRAConfig, from_dict
    from dasd_megatron.model.lora import peft_config
    from sglang_rollout.manager import lora_flags

    lora = from_dict(LoRAConfig, (config.get("model") or {}).get("lora") or {})
    if not lora.enabled or lora.sync != "adapter":
        return []
    return lora_flags(lora.rank, peft_config(lora)["target_modules"])


def plan_servers(placement: RolloutPlacement, model: str, *, host: str, port_offset: int = 0,
                 python: str = sys.executable, extra_args: tuple[str, ...] = ()) -> list[ServerLaunch]:
    """The servers of one node for `placement` (pure: starts nothing); `extra_args` go on every server's command
    line (the LoRA flags: `lora_server_args`)."""
    plans = []
    for i in range(placement.servers_per_node):
        port = placement.port(i, port_offset)
        if placement.mode == "builtin":
            argv = [python, "-m", "sglang_rollout.builtin_server", "--model-path", model, "--host", "0.0.0.0",
                    "--port", str(port)]
            gpus: tuple[int, ...] = ()
            env = {}
        else:
            gpus = placement.gpu_ids(i)
            argv = [python, "-m", "sglang.launch_server", "--model-path", model, "--host", "0.0.0.0",
                    "--port", str(port), "--tp-size", str(placement.tensor_parallel),
                    "--mem-fraction-static", str(placement.mem_fraction_static)]
            if placement.mode == "colocated":  # lets the trainer release/resume the server's GPU memory
                argv.append("--enable-memory-saver")
            env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
        argv += list(extra_args)
        env["NCCL_CUMEM_ENABLE"] = "1" if placement.nccl_cumem_enable else "0"
        plans.append(ServerLaunch(index=i, port=port, gpus=gpus, argv=tuple(argv), env=tuple(sorted(env.items())),
                                  url=f"http://{host}:{port}"))
    return plans


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def launch_command(plan: ServerLaunch, *, run_dir: str, key: str, python: str = sys.executable,
                   environ: Optional[dict] = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start `plan` with the run's API key (never in argv) and an orphan guard.

    Built-in server: key in ``$DASD_ROLLOUT_API_KEY``, it watches ``$DASD_PARENT_PID`` itself. SGLang: key in
    ``--config RUN/rollout_api_key.sglang.yaml``, run under `sglang_rollout.supervise`. Anything else runs under the
    wrapper too, with the key in its environment.
    """
    env = dict(os.environ if environ is None else environ)
    env.pop(auth.API_KEY_FILE_ENV, None)
    env.update(dict(plan.env))
    env[PARENT_PID_ENV] = str(os.getpid())
    argv = list(plan.argv)
    if "sglang_rollout.builtin_server" in argv:
        env[auth.API_KEY_ENV] = key
        return argv, env
    env.pop(auth.API_KEY_ENV, None)
    if "sglang.launch_server" in argv:
        argv += ["--config", auth.write_sglang_config(os.path.join(run_dir, auth.SGLANG_CONFIG_NAME), key)]
    else:
        env[auth.API_KEY_ENV] = key
    return supervise_argv(argv, python=python, parent_pid=os.getpid()), env


def run_servers(plans: list[ServerLaunch], *, run_dir: str, host: str, node_index: int, tensor_parallel: int,
                job_id: str = "", health_timeout: float = 1800.0, poll: float = 1.0) -> int:
    """Start `plans`, announce each when healthy, watch them; returns the exit status of the first that ends."""
    remove_records(run_dir, host)
    key, key_path = auth.ensure_key_file(run_dir)
    print(f"rollout node {node_index}: servers require the run's API key ({key_path}, mode 0600)", flush=True)
    procs: dict[int, subprocess.Popen] = {}
    stopping = []

    def stop(*_):
        stopping.append(True)

    in_main = threading.current_thread() is threading.main_thread()  # signals can only be caught there
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    try:
        for p in plans:
            argv, env = launch_command(p, run_dir=run_dir, key=key)
            procs[p.index] = subprocess.Popen(argv, env=env)
            print(f"rollout node {node_index}: server {p.index} pid {procs[p.index].pid} gpus {list(p.gpus)} "
                  f"-> {p.url}", flush=True)
        pending = {p.index: p for p in plans}
        deadline = time.monotonic() + health_timeout
        while not stopping:
            for i, proc in procs.items():
                if proc.poll() is not None:
                    print(f"rollout node {node_index}: server {i} exited with {proc.returncode}", flush=True)
                    return proc.returncode or 1
            for i, p in list(pending.items()):
                if _healthy(p.port):
                    write_record(run_dir, ServerRecord(url=p.url, host=host, port=p.port, node_index=node_index,
                                                       server_index=i, gpus=p.gpus, tensor_parallel=tensor_parallel,
                                                       pid=procs[i].pid, job_id=job_id))
                    del pending[i]
            if pending and time.monotonic() > deadline:
                print(f"rollout node {node_index}: servers {sorted(pending)} not healthy after "
                      f"{health_timeout:.0f} s", flush=True)
                return 1
            time.sleep(poll)
        return 0
    finally:
        remove_records(run_dir, host)
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dasd_megatron.launch.rollout_node", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--node-index", type=int, default=None)
    ap.add_argument("--health-timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)
    record = read_launch_record(args.run_dir)
    placement = RolloutPlacement(**record["placement"])
    with open(os.path.join(args.run_dir, CONFIG_FILE)) as f:
        config = json.load(f)
    model = config["model"]["hf_config"]
    host = socket.gethostname()
    node_index = args.node_index if args.node_index is not None else int(os.environ.get("SLURM_NODEID", "0"))
    plans = plan_servers(placement, model, host=host, port_offset=int(os.environ.get("DASD_PORT_OFFSET", "0")),
                         extra_args=tuple(lora_server_args(config)))
    return run_servers(plans, run_dir=args.run_dir, host=host, node_index=node_index,
                       tensor_parallel=placement.tensor_parallel, job_id=os.environ.get("SLURM_JOB_ID", ""),
                       health_timeout=args.health_timeout)


if __name__ == "__main__":
    sys.exit(main())
