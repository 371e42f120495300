"""How the trainer finds the rollout servers of its job.

Primary: rendezvous files in the run folder (which every node of a job shares). Each server node runs the node
runner (`dasd_megatron.launch.rollout_node`); for every server it starts, once ``GET /health`` answers 200, it
writes ``<run_dir>/rollout/servers/<host>_<port>.json`` (written to a temporary name, then renamed, so a reader
never sees half a record) and deletes it when the server stops. The trainer calls
``wait_for_servers(run_dir, expected=placement.total_servers(trainer), job_id=$SLURM_JOB_ID)`` and gets the sorted
server URLs once all are up. Records carry the SLURM job id, so leftovers of an earlier job in the same run folder
are ignored (the node runner also clears its own host's old records at start).

Fallback (no shared file system): the addresses are deterministic. The server nodes are the rollout het group's
nodes (``SLURM_JOB_NODELIST_HET_GROUP_1``, placement 'separate') or the trainer's (``SLURM_JOB_NODELIST``), and
server ``i`` of a node listens on ``placement.base_port + i * port_stride + $DASD_PORT_OFFSET``:
``expected_urls(placement, server_hosts_from_env(placement), offset)``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

from dasd_megatron.launch.placement import RolloutPlacement

SERVERS_DIR = os.path.join("rollout", "servers")


@dataclass(frozen=True)
class ServerRecord:
    """One healthy rollout server, as the node runner announces it."""

    url: str
    host: str
    port: int
    node_index: int
    server_index: int
    gpus: tuple[int, ...]
    tensor_parallel: int
    pid: int
    job_id: str = ""


def servers_dir(run_dir: str) -> str:
    return os.path.join(run_dir, SERVERS_DIR)


def record_path(run_dir: str, host: str, port: int) -> str:
    return os.path.join(servers_dir(run_dir), f"{host}_{port}.json")


def write_record(run_dir: str, rec: ServerRecord) -> str:
    path = record_path(run_dir, rec.host, rec.port)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(asdict(rec), f)
    os.replace(tmp, path)
    return path


def remove_records(run_dir: str, host: str) -> None:
    """Delete every record of `host` (the node runner's start and stop)."""
    d = servers_dir(run_dir)
    if os.path.isdir(d):
        for name in os.listdir(d):
            if name.startswith(f"{host}_") and name.endswith(".json"):
                os.remove(os.path.join(d, name))


def read_records(run_dir: str, job_id: Optional[str] = None) -> list[ServerRecord]:
    """The announced servers, ordered by (node, server); only `job_id`'s when given."""
    d = servers_dir(run_dir)
    records = []
    if os.path.isdir(d):
        for name in sorted(os.listdir(d)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(d, name)) as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError):  # removed or replaced between listdir and open
                continue
            rec = ServerRecord(**{**data, "gpus": tuple(data["gpus"])})
            if job_id is None or rec.job_id == job_id:
                records.append(rec)
    return sorted(records, key=lambda r: (r.node_index, r.server_index, r.host))


def wait_for_servers(run_dir: str, expected: int, *, timeout: float = 1800.0, poll: float = 2.0,
                     job_id: Optional[str] = None) -> list[str]:
    """Block until `expected` servers are announced; return their URLs. TimeoutError names the missing count."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(run_dir, job_id)
        if len(records) >= expected:
            return [r.url for r in records]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(records)} of {expected} rollout servers announced in {servers_dir(run_dir)} "
                               f"after {timeout:.0f} s; see the rollout node logs")
        time.sleep(poll)


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list ('gpu[01-03,07],login5') as names, like `scontrol show hostnames`."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        m = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def server_hosts_from_env(placement: RolloutPlacement, env: Mapping[str, str] = os.environ) -> list[str]:
    """The nodes that run servers, from SLURM's environment."""
    key = "SLURM_JOB_NODELIST_HET_GROUP_1" if placement.mode == "separate" else "SLURM_JOB_NODELIST"
    if placement.mode != "separate" and "SLURM_JOB_NODELIST_HET_GROUP_0" in env:
        key = "SLURM_JOB_NODELIST_HET_GROUP_0"
    if key not in env:
        raise RuntimeError(f"{key} is not set: not inside a SLURM job with placement mode {placement.mode!r}")
    return expand_hostlist(env[key])


def expected_urls(placement: RolloutPlacement, hosts: list[str], offset: int = 0) -> list[str]:
    """The URLs the node runners will serve on `hosts`, in (node, server) order."""
    return [f"http://{host}:{placement.port(i, offset)}" for host in hosts for i in range(placement.servers_per_node)]
