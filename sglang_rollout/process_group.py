"""The weight-update process group joined by the trainer (rank 0) and every server TP rank.

`init_weights_update_group(...)` builds a torch.distributed process group *beside* the default one (the trainer
already has its own; a server has its TP group), the way SGLang's `init_custom_process_group` does: rendezvous
through `tcp://master_address:master_port` (the trainer, rank 0, hosts the TCP store), a `PrefixStore` named after
the group, and `_new_process_group_helper`. Using the same construction on both ends keeps the store keys the
same as SGLang's, so the trainer side also works against a real SGLang server.

`backend` is "nccl" on GPUs; the built-in server and the CPU tests use "gloo".
"""

from __future__ import annotations

import inspect
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["init_weights_update_group", "destroy_weights_update_group", "parse_dtype"]


def init_weights_update_group(*, master_address: str, master_port: int, rank: int, world_size: int,
                              group_name: str, backend: str, timeout_s: float = 300.0):
    """Join (or, as rank 0, host) the weight-update group; blocks until all `world_size` ranks joined."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                              timeout=timeout))
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
