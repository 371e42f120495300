"""The weight-update process group joined by the trainer (rank 0) and every server TP rank.

`init_weights_update_group(...)` builds a torch.distributed process group *beside* the default one (the trainer
already has its own; a server has its TP group), the way SGLang's `init_custom_process_group` does: a TCP store at
`master_address:master_port` (the trainer, rank 0, hosts it), a `PrefixStore` named after the group, and
`_new_process_group_helper`. Using the same construction on both ends keeps the store keys the same as SGLang's, so
the trainer side also works against a real SGLang server.

One difference: SGLang gets its store from `rendezvous("tcp://...")`, which under torchrun
(`TORCHELASTIC_USE_AGENT_STORE=True`) makes every rank, rank 0 included, a *client* of the agent's store; the
trainer runs under torchrun, so nobody would host the group's store and both ends would wait until the timeout.
Here the store is made directly (`TCPStore(is_master=rank == 0)`), what that rendezvous does outside torchrun.

`backend` is "nccl" on GPUs; the built-in server and the CPU tests use "gloo".
"""

from __future__ import annotations

import inspect
import socket
from datetime import timedelta
from typing import Sequence
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from sglang_rollout.auth import is_loopback

__all__ = ["init_weights_update_group", "destroy_weights_update_group", "parse_dtype", "dtype_name",
           "free_store_port", "master_address_for"]


def init_weights_update_group(*, master_address: str, master_port: int, rank: int, world_size: int,
                              group_name: str, backend: str, timeout_s: float = 300.0):
    """Join (or, as rank 0, host) the weight-update group; blocks until all `world_size` ranks joined."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    # not rendezvous("tcp://..."): under torchrun it would not host the store on rank 0 (module docstring)
    store = dist.TCPStore(host_name=master_address, port=int(master_port), world_size=world_size,
                          is_master=rank == 0, timeout=timeout, multi_tenant=True)
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    params = inspect.signature(_new_process_group_helper).parameters
    options = {"backend_options" if "backend_options" in params else "pg_options": None}
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      timeout=timeout, **options)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weights_update_group(pg) -> None:
    try:
        dist.destroy_process_group(pg)
    except Exception:  # noqa: BLE001 - best effort: the peer may be gone already
        pass


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' -> torch.bfloat16 (the `dtypes` field of update_weights_from_distributed)."""
    short = name.removeprefix("torch.")
    dt = getattr(torch, short, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype name (e.g. 'bfloat16', 'float32')")
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def free_store_port() -> int:
    """A TCP port that was free on every interface a moment ago: where rank 0 hosts the group's TCP store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def master_address_for(urls: Sequence[str]) -> str:
    """The address the servers at `urls` reach this process at (the `master_address` of the weight-update group):
    127.0.0.1 when they all listen on loopback (same host), else the address of this host's interface that routes
    to the first server (a UDP `connect` picks the route; nothing is sent)."""
    hosts = [urlsplit(u).hostname or "" for u in urls]
    if hosts and all(is_loopback(h) for h in hosts):
        return "127.0.0.1"
    first = urlsplit(urls[0])
    family = socket.AF_INET6 if ":" in (first.hostname or "") else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((first.hostname, first.port or 80))
        return s.getsockname()[0]
