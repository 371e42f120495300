"""Weight-sync transports: how one bucket of (HF name, tensor) pairs reaches every server.

* `TensorTransport` (colocated): `/update_weights_from_tensor` with the bucket serialised as SGLang expects
  (CUDA-IPC / shared-memory handles; `load_format="flattened_bucket"` by default: one flat tensor + metadata).
  The bucket is held until every server answered, so no buffer is reused before the server copied it.
* `DistributedTransport` (disaggregated): `/init_weights_update_group` once, then per bucket
  `/update_weights_from_distributed` (names, dtypes, shapes) issued on a thread while this process broadcasts the
  tensors from rank 0 of the weight-update group (NCCL on GPUs, gloo on CPU).
* `DiskTransport`: each bucket becomes one safetensors shard of a HF folder; at the end one
  `/update_weights_from_disk` per server loads the folder.

The weight version travels with the last call of a sync (the last bucket, or the disk load), so a server whose
update failed half-way keeps announcing its old version. The last call also asks the server to flush its prefix
cache (`flush_cache`), so no KV entry computed with older weights survives the update.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch

from sglang_rollout.process_group import dtype_name, init_weights_update_group
from sglang_rollout.server_client import ServerClient
from sglang_rollout.tensor_payload import flatten_bucket, shared_payload

log = logging.getLogger(__name__)

__all__ = ["Transport", "TensorTransport", "DistributedTransport", "DiskTransport", "call_all", "flush_until_idle"]

NamedTensors = list[tuple[str, torch.Tensor]]


def flush_until_idle(server: ServerClient, timeout_s: float) -> None:
    """`/flush_cache`, retried while the server still drains requests (it answers 400 until idle), at most
    `timeout_s` seconds."""
    from sglang_rollout.http_client import HTTPStatusError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            server.flush_cache()
            return
        except HTTPStatusError as e:  # 400 while requests still drain
            if e.status != 400 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def call_all(servers: Sequence[ServerClient], fn: Callable[[ServerClient], object]) -> list:
    """fn(server) on every server concurrently; re-raise the first failure (its message names the server)."""
    if len(servers) == 1:
        return [fn(servers[0])]
    with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="sync") as pool:
        futures = [pool.submit(fn, s) for s in servers]
        return [f.result() for f in futures]


class Transport(ABC):
    """One way of moving a sync's buckets to the servers (see module docstring)."""

    name = "?"

    def connect(self, servers: Sequence[ServerClient]) -> None:
        """Once, before the first sync (e.g. join the weight-update group)."""

    def begin(self, servers: Sequence[ServerClient], version: str) -> None:
        """Start of one sync."""

    @abstractmethod
    def send(self, servers: Sequence[ServerClient], bucket: NamedTensors, *, last: bool, version: str) -> None:
        """Deliver one bucket; the `last` one carries the weight version."""

    def finish(self, servers: Sequence[ServerClient], version: str) -> None:
        """End of one sync (after the last bucket)."""

    def close(self, servers: Sequence[ServerClient]) -> None:
        """Release what `connect` set up."""


class TensorTransport(Transport):
    """`/update_weights_from_tensor` (colocated servers on this host; see module docstring).

    `tp_sizes[i]` is server i's TP size: SGLang wants one serialized entry per TP rank (each rank maps the
    same handles here). `load_format`: "flattened_bucket" (default) or None (a list of (name, tensor)).
    """

    name = "tensor"

    def __init__(self, *, load_format: Optional[str] = "flattened_bucket", tp_sizes: Optional[Sequence[int]] = None):
        if load_format not in ("flattened_bucket", None, "direct"):
            raise ValueError(f"weight_sync.load_format={load_format!r}: expected 'flattened_bucket' or None")
        self.load_format = load_format
        self.tp_sizes = list(tp_sizes) if tp_sizes else None

    def send(self, servers, bucket, *, last, version):
        if self.load_format == "flattened_bucket":
            payload_obj = flatten_bucket([(n, t.detach()) for n, t in bucket])
        else:
            payload_obj = [(n, t.detach()) for n, t in bucket]
        tp = dict(zip(map(id, servers), self.tp_sizes or [1] * len(servers)))
        # The payload (CUDA-IPC handles / shared memory) stays valid until every server answered.
        with shared_payload(payload_obj) as payload:
            call_all(servers, lambda s: s.update_weights_from_tensor(
                [payload] * tp[id(s)], load_format=self.load_format, weight_version=version if last else None,
                flush_cache=last))


class DistributedTransport(Transport):
    """Broadcast over a weight-update process group; this process is its rank 0 (see module docstring)."""

    name = "distributed"

    def __init__(self, *, master_address: str, master_port: int, backend: str = "nccl",
                 group_name: str = "weight_update_group", tp_sizes: Optional[Sequence[int]] = None,
                 flattened: bool = False, timeout_s: float = 300.0, device: Optional[torch.device] = None):
        self.master_address, self.master_port = master_address, master_port
        self.backend, self.group_name = backend, group_name
        self.tp_sizes = list(tp_sizes) if tp_sizes else None
        self.flattened = flattened
        self.timeout_s = timeout_s
        self.device = device or torch.device("cuda" if backend == "nccl" else "cpu")
        #: bound on each server's `/destroy_weights_update_group` answer when closing (a run that ends on an error
        #: must not wait long for a server that is itself stuck)
        self.close_timeout_s = min(timeout_s, 30.0)
        self.group = None

    def connect(self, servers):
        if self.group is not None:
            return
        tp = self.tp_sizes or [1] * len(servers)
        world = 1 + sum(tp)
        offsets = [1 + sum(tp[:i]) for i in range(len(servers))]
        errors: list[BaseException] = []

        def join_server(i):
            try:
                servers[i].init_weights_update_group(
                    master_address=self.master_address, master_port=self.master_port, rank_offset=offsets[i],
                    world_size=world, group_name=self.group_name, backend=self.backend)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=join_server, args=(i,), daemon=True) for i in range(len(servers))]
        for t in threads:
            t.start()
        # Rank 0 joins on a thread of its own too, so that a server that refuses to join (an HTTP error) fails the
        # connect at once instead of after `timeout_s` of waiting for a rank that will never come.
        hosted: dict = {}

        def host():
            try:
                hosted["group"] = init_weights_update_group(
                    master_address=self.master_address, master_port=self.master_port, rank=0, world_size=world,
                    group_name=self.group_name, backend=self.backend, timeout_s=self.timeout_s)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                hosted["error"] = e

        rank0 = threading.Thread(target=host, daemon=True, name="weight-update-group")
        rank0.start()
        deadline = time.monotonic() + self.timeout_s + 10.0
        while rank0.is_alive() and not errors and time.monotonic() < deadline:
            rank0.join(0.05)
        if rank0.is_alive():  # a server failed (or nobody answered): the rendezvous thread ends at its timeout
            raise errors[0] if errors else TimeoutError(
                f"weight-update group {self.group_name!r}: rank 0 did not join within {self.timeout_s}s")
        for t in threads:
            t.join(self.timeout_s)
        if "error" in hosted:
            raise errors[0] if errors else hosted["error"]
        self.group = hosted["group"]
        if errors:
            raise errors[0]
        log.info("weight-update group %r: world %d (trainer + %d server ranks) at %s:%d via %s", self.group_name,
                 world, world - 1, self.master_address, self.master_port, self.backend)

    def send(self, servers, bucket, *, last, version):
        import torch.distributed as dist

        if self.group is None:
            raise RuntimeError("DistributedTransport.send before connect()")
        tensors = [t.detach().to(self.device).contiguous() for _, t in bucket]
        names = [n for n, _ in bucket]
        errors: list[BaseException] = []

        def http():
            try:
                call_all(servers, lambda s: s.update_weights_from_distributed(
                    names=names, dtypes=[dtype_name(t.dtype) for t in tensors],
                    shapes=[list(t.shape) for t in tensors], group_name=self.group_name,
                    load_format="flattened_bucket" if self.flattened else None,
                    weight_version=version if last else None, flush_cache=last))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        caller = threading.Thread(target=http, daemon=True)
        caller.start()  # the servers must be receiving while we broadcast
        if self.flattened:
            flat = flatten_bucket(list(zip(names, tensors)))["flattened_tensor"]
            dist.broadcast(flat, src=0, group=self.group)
        else:
            works = [dist.broadcast(t, src=0, group=self.group, async_op=True) for t in tensors]
            for w in works:
                w.wait()
        caller.join(self.timeout_s)
        if caller.is_alive():
            raise TimeoutError(f"update_weights_from_distributed did not answer within {self.timeout_s}s")
        if errors:
            raise errors[0]

    def close(self, servers):
        if self.group is None:
            return
        from sglang_rollout.process_group import destroy_weights_update_group

        try:
            call_all(servers, lambda s: s.destroy_weights_update_group(self.group_name,
                                                                        timeout_s=self.close_timeout_s))
        finally:
            destroy_weights_update_group(self.group)
            self.group = None


def safe_version(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", version)


class DiskTransport(Transport):
    """Write a HF safetensors folder per sync under `root`, then `/update_weights_from_disk` on every server.

    `base_model_path` (the served model folder) provides config.json, generation_config.json and tokenizer files
    that a real SGLang load needs next to the weights. The newest `keep` folders are kept. `root` must be
    readable by every server (shared storage for multi-node).
    """

    name = "disk"
    _AUX = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")

    def __init__(self, root: str, *, base_model_path: Optional[str] = None, keep: int = 2):
        if keep < 1:
            raise ValueError(f"weight_sync.keep={keep}: must be >= 1")
        self.root, self.base_model_path, self.keep = root, base_model_path, keep
        self._dir: Optional[str] = None
        self._index: dict[str, str] = {}
        self._shard = 0
        self.last_path: Optional[str] = None

    def begin(self, servers, version):
        os.makedirs(self.root, exist_ok=True)
        for d in os.listdir(self.root):  # leftovers of a sync that failed half-way
            if d.startswith("weights_") and d.endswith(".partial"):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
        final = os.path.join(self.root, f"weights_{safe_version(version)}")
        self._dir = final + ".partial"
        os.makedirs(self._dir)
        if self.base_model_path:
            for name in self._AUX:
                src = os.path.join(self.base_model_path, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(self._dir, name))
        self._index, self._shard = {}, 0

    def send(self, servers, bucket, *, last, version):
        from safetensors.torch import save_file

        self._shard += 1
        fname = f"model-{self._shard:05d}.safetensors"
        seen: set[int] = set()
        tensors = {}
        for n, t in bucket:
            t = t.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:  # safetensors refuses shared storage (tied weights): write a copy
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[n] = t
            self._index[n] = fname
        save_file(tensors, os.path.join(self._dir, fname), metadata={"format": "pt"})

    def finish(self, servers, version):
        with open(os.path.join(self._dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"weight_version": version}, "weight_map": self._index}, f, indent=1)
        final = self._dir[: -len(".partial")]
        shutil.rmtree(final, ignore_errors=True)
        os.replace(self._dir, final)
        self._dir = None
        call_all(servers, lambda s: s.update_weights_from_disk(final, weight_version=version))
        self.last_path = final
        self._prune(final)

    def _prune(self, newest: str) -> None:
        dirs = [os.path.join(self.root, d) for d in os.listdir(self.root) if d.startswith("weights_")
                and not d.endswith(".partial")]
        dirs.sort(key=os.path.getmtime)
        for d in dirs[: max(0, len(dirs) - self.keep)]:
            if d != newest:
                shutil.rmtree(d, ignore_errors=True)
