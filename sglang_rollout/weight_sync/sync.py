"""`WeightSync`: push the trainer's weights to every rollout server after a training step, one interface for
all transports.

    sync = WeightSync(servers, DiskTransport(...) | TensorTransport() | DistributedTransport(...))
    report = sync.sync(iter_hf_weights(model, arch), version="step-12")   # on the sending rank only

`weights` is any iterable of (HF name, tensor) pairs, or of buckets (lists) of them: the streaming exporter's
output, a `state_dict().items()`, ... It is consumed once, bucket by bucket, so the whole model is never held.
On the other trainer ranks the same exporter must still be iterated (it runs collectives): see `drain`.

Each sync: pause generation (mode "abort" by default: in-flight samples come back aborted and the rollout client
retries them after the sync) -> flush the KV/radix cache (retried while requests are still draining) -> stream
the buckets through the transport (the last call stamps `version`) -> continue generation. The bucket plan is
recorded at the first sync and enforced after. Every phase is timed and logged in one line (`SyncReport`).
A failed sync raises `WeightSyncError` and leaves the servers paused: their weights may be half-updated, so they
must not serve until a sync succeeds.

Colocated memory choreography (`release_memory`/`resume_memory`): release weights and KV cache before training;
`sync(..., resume_memory=True)` resumes the weights first, updates, then resumes the KV cache. `release_memory()`
releases exactly those two types (`COLOCATED_MEMORY_TAGS`), not SGLang's `tags: null` (every type, CUDA graphs
included), because a resume must name only released types: SGLang fails on resuming one that is not released.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from sglang_rollout.http_client import ServerError
from sglang_rollout.server_client import ServerClient
from sglang_rollout.weight_sync.buckets import BucketPlan, BucketStream
from sglang_rollout.weight_sync.transports import Transport, call_all, flush_until_idle

log = logging.getLogger(__name__)

__all__ = ["WeightSync", "SyncReport", "WeightSyncError", "drain", "COLOCATED_MEMORY_TAGS"]

#: what `WeightSync.release_memory()` releases and `sync(..., resume_memory=True)` resumes (weights, then KV cache)
COLOCATED_MEMORY_TAGS = ("weights", "kv_cache")


class WeightSyncError(RuntimeError):
    """A sync that did not complete; the servers are left paused."""


@dataclass
class SyncReport:
    version: str
    transport: str
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    #: seconds per phase: pause, flush, export (waiting on the weight iterator), send, finish, continue, total
    timing: dict = field(default_factory=dict)

    def metrics(self, prefix: str = "weight_sync/") -> dict:
        out = {f"{prefix}{k}_s": v for k, v in self.timing.items()}
        out.update({f"{prefix}buckets": self.buckets, f"{prefix}bytes": self.bytes})
        if self.timing.get("total"):
            out[f"{prefix}gb_per_s"] = self.bytes / 1e9 / self.timing["total"]
        return out


def drain(weights: Iterable) -> None:
    """Iterate a weight stream without sending it (the non-sending ranks of a distributed exporter)."""
    for _ in weights:
        pass


class WeightSync:
    """Versioned weight sync to a set of servers (see module docstring)."""

    def __init__(self, servers: Sequence[ServerClient], transport: Transport, *,
                 bucket_bytes: int = 512 << 20, plan: Optional[BucketPlan] = None, pause_mode: str = "abort",
                 flush_timeout_s: float = 60.0):
        if not servers:
            raise ValueError("WeightSync needs at least one server")
        if pause_mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"weight_sync.pause_mode={pause_mode!r}: expected abort, retract or in_place")
        self.servers = list(servers)
        self.transport = transport
        self.bucket_bytes = bucket_bytes
        self.plan = plan
        self.pause_mode = pause_mode
        self.flush_timeout_s = flush_timeout_s
        self.version: Optional[str] = None
        self._connected = False

    # ---- memory --------------------------------------------------------------------------------------------

    def release_memory(self, tags: Optional[Sequence[str]] = COLOCATED_MEMORY_TAGS) -> None:
        """Free the servers' GPU memory (by default weights and KV cache: what `sync(..., resume_memory=True)`
        resumes) before training on the same GPUs. The servers must be idle."""
        call_all(self.servers, lambda s: s.release_memory_occupation(tags))

    def resume_memory(self, tags: Optional[Sequence[str]] = None) -> None:
        call_all(self.servers, lambda s: s.resume_memory_occupation(tags))

    # ---- sync ----------------------------------------------------------------------------------------------

    def connect(self) -> None:
        if not self._connected:
            self.transport.connect(self.servers)
            self._connected = True

    def close(self) -> None:
        """Release what the transport set up (the weight-update group); safe to call twice, and after a connect
        that failed half-way."""
        self._connected = False
        self.transport.close(self.servers)

    def _flush(self) -> None:
        call_all(self.servers, lambda s: flush_until_idle(s, self.flush_timeout_s))

    def sync(self, weights: Iterable, version: str, *, resume_memory: bool = False) -> SyncReport:
        """Pause, flush, send every bucket, continue; returns the timings (see module docstring)."""
        version = str(version)
        rep = SyncReport(version=version, transport=self.transport.name)
        t = rep.timing
        t0 = time.perf_counter()

        def phase(name, fn):
            s = time.perf_counter()
            try:
                return fn()
            except (ServerError, OSError, ValueError, RuntimeError, TimeoutError) as e:
                raise WeightSyncError(f"weight sync to version {version!r} failed in phase {name!r} "
                                      f"({self.transport.name} transport): {e}. Servers are left paused.") from e
            finally:
                t[name] = t.get(name, 0.0) + time.perf_counter() - s

        phase("connect", self.connect)
        if resume_memory:
            phase("resume_weights", lambda: self.resume_memory(["weights"]))
        phase("pause", lambda: call_all(self.servers, lambda s: s.pause_generation(self.pause_mode)))
        phase("flush", self._flush)
        phase("begin", lambda: self.transport.begin(self.servers, version))
        stream = BucketStream(self.plan, self.bucket_bytes)
        buckets = stream(weights)
        n_planned = len(self.plan) if self.plan is not None else None
        pending = phase("export", lambda: next(buckets, None))
        while pending is not None:
            if n_planned is None:  # first sync: look one bucket ahead to know which one is the last
                nxt = phase("export", lambda: next(buckets, None))
                last = nxt is None
            else:  # planned: no look-ahead, so only one bucket is held at a time
                last = rep.buckets == n_planned - 1
            bucket = pending
            phase("send", lambda: self.transport.send(self.servers, bucket, last=last, version=version))
            rep.buckets += 1
            rep.tensors += len(bucket)
            rep.bytes += sum(x.numel() * x.element_size() for _, x in bucket)
            del bucket
            pending = nxt if n_planned is None else phase("export", lambda: next(buckets, None))
        phase("finish", lambda: self.transport.finish(self.servers, version))
        if self.plan is None:
            self.plan = stream.recorded
        if resume_memory:
            phase("resume_kv_cache", lambda: self.resume_memory(["kv_cache"]))
        phase("continue", lambda: call_all(self.servers, lambda s: s.continue_generation()))
        t["total"] = time.perf_counter() - t0
        self.version = version
        log.info("weight sync v=%s via %s: %d buckets, %d tensors, %.1f MB in %.3fs (%s)", version,
                 self.transport.name, rep.buckets, rep.tensors, rep.bytes / 1e6, t["total"],
                 " ".join(f"{k}={v:.3f}" for k, v in t.items() if k != "total"))
        return rep
