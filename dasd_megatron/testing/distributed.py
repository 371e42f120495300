"""Run a function on N real processes joined by a gloo process group (tests and benchmarks).

`run_distributed(fn, world_size, *args)` spawns `world_size` fresh Python processes, initialises
`torch.distributed` with the gloo backend over loopback TCP, calls `fn(rank, world_size, *args)` on each, and
returns the per-rank return values (which must be picklable). An exception on any rank is re-raised here with
that rank's traceback. Nothing is mocked: the collectives are gloo's.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple, kwargs: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # 2-core machines: N processes x default threads would thrash
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        result = fn(rank, world_size, *args, **kwargs)
        torch.save({"ok": True, "result": result}, path)
    except BaseException as exc:  # noqa: BLE001 - re-raised in the parent with the traceback
        torch.save({"ok": False, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}, path)
        raise
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001 - megatron may not be imported or initialised
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo processes; return results by rank."""
    with tempfile.TemporaryDirectory(prefix="dasd-dist-") as outdir:
        port = free_port()
        try:
            mp.start_processes(
                _worker,
                args=(world_size, port, outdir, fn, args, kwargs),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            details = []
            for r in range(world_size):
                p = os.path.join(outdir, f"rank{r}.pt")
                if os.path.exists(p):
                    rec = torch.load(p, weights_only=False)
                    if not rec["ok"]:
                        details.append(f"--- rank {r}: {rec['error']}\n{rec['tb']}")
            raise AssertionError("distributed run failed:\n" + "\n".join(details or [str(exc)])) from None
        results = []
        for r in range(world_size):
            rec = torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
            results.append(rec["result"])
        return results
