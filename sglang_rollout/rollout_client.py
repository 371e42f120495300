"""The rollout client: token ids in, G samples per prompt out, with sampled log-probs and weight versions.

`RolloutClient(urls, ClientConfig(...)).generate(prompts, n=G, sampling=SamplingConfig(...))` returns, for each
prompt, exactly G `Sample`s in sample order, or raises `RolloutError`.

How it stays exact under failures:

* every sample has a stable request id ``rid = f"{batch_id}-{prompt}-{sample}"``; results are keyed by it, so a
  retried request can neither duplicate nor lose a sample (a late duplicate is ignored and counted);
* samples travel in batch `/generate` calls (``input_ids`` as a list of prompts, ``rid`` as a list), a few per
  call, spread over the servers by least in-flight calls; each call is bounded by `request_timeout_s`;
* connection errors, timeouts, 5xx/429 and samples that come back with ``finish_reason.type == "abort"`` (a
  server paused for a weight update, or shutting down) are retried with exponential backoff and jitter, preferring
  another server, at most `max_retries` times per call; a server that failed is avoided for a cool-down;
* with `accept_version`, a sample stamped with a weight version it refuses (a server restarted with other weights
  than the ones the rollout is meant to come from) is dropped and re-sent like an aborted one (counted in
  ``stats["rejected_version"]``);
* other 4xx (the request is wrong) and malformed answers (the server is broken) fail the rollout at once with
  the server's message;
* with a seed, each sample gets its own `sampling_seed` derived from (seed, prompt index, sample index), so a
  retried sample is reproducible and the G samples of a prompt differ.

`n > 1` inside one request is deliberately not used: SGLang regenerates request ids for the copies.

LoRA: with `ClientConfig.lora_path` every `/generate` request (rollouts and `logprobs`) names that adapter (SGLang's
``lora_path``: the ``lora_name`` of an adapter loaded on every server, see `sglang_rollout.weight_sync.lora`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from sglang_rollout.contract import broken_sampling_rule, sampling_default
from sglang_rollout.http_client import HttpClient, ProtocolError, ServerError
from sglang_rollout.server_client import ServerClient

log = logging.getLogger(__name__)

__all__ = ["SamplingConfig", "ClientConfig", "Sample", "RolloutClient", "RolloutError", "derive_seed"]


class RolloutError(RuntimeError):
    """A rollout that could not produce every sample (the message says which server and why)."""


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters sent with every sample (SGLang `sampling_params` names).

    Names and defaults come from `sglang_rollout.contract.SAMPLING_PARAMS`, and the values are checked against its
    `SAMPLING_RULES` (those with a trainer wording) at construction: a bad value is a ValueError naming the field
    and the fix, e.g. ``rollout.sampling.top_p=0: must be in (0, 1]. Fix: use 1.0 to disable``.
    """

    max_new_tokens: int = sampling_default("max_new_tokens")
    temperature: float = sampling_default("temperature")
    top_p: float = sampling_default("top_p")
    top_k: int = sampling_default("top_k")
    min_p: float = sampling_default("min_p")
    stop_token_ids: tuple[int, ...] = sampling_default("stop_token_ids")
    ignore_eos: bool = sampling_default("ignore_eos")
    #: base seed; None = unseeded. Each sample's `sampling_seed` is derived from it (see `derive_seed`).
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        values = vars(self)
        rule = broken_sampling_rule(values, client=True)
        if rule is not None:
            raise rule.client_error(values)

    def to_params(self, sampling_seed: Optional[int] = None) -> dict:
        p: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }
        if self.min_p:
            p["min_p"] = self.min_p
        if self.stop_token_ids:
            p["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            p["ignore_eos"] = True
        if sampling_seed is not None:
            p["sampling_seed"] = sampling_seed
        return p


@dataclass(frozen=True)
class ClientConfig:
    #: sent as ``Authorization: Bearer <key>``; None: from the environment (``DASD_ROLLOUT_API_KEY``, its ``_FILE``,
    #: or the run folder's key, see `sglang_rollout.auth`); "": send none
    api_key: Optional[str] = None
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    #: a failed server is avoided for this long (others are tried first)
    server_cooldown_s: float = 2.0
    max_inflight_per_server: int = 8
    samples_per_request: int = 8
    #: wall-clock bound on one `generate` call
    rollout_timeout_s: float = 3600.0
    #: the LoRA adapter every /generate request names (its `lora_name` on the servers, e.g. the one
    #: `weight_sync.lora.Adapter*Transport` loads); None: the base model
    lora_path: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("request_timeout_s", "connect_timeout_s", "rollout_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"rollout.client.{name}={getattr(self, name)}: must be > 0")
        if self.max_retries < 0:
            raise ValueError(f"rollout.client.max_retries={self.max_retries}: must be >= 0")
        if self.max_inflight_per_server < 1 or self.samples_per_request < 1:
            raise ValueError("rollout.client.max_inflight_per_server and samples_per_request must be >= 1")
        if self.lora_path is not None and (not isinstance(self.lora_path, str) or not self.lora_path):
            raise ValueError(f"rollout.client.lora_path={self.lora_path!r}: must be a non-empty adapter name. Fix: "
                             "use the lora_name the adapter was loaded under, or None for the base model")


@dataclass(frozen=True)
class Sample:
    """One generated response with what training needs from it."""

    rid: str
    prompt_index: int
    sample_index: int
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    #: log-prob of each output token under the sampling distribution, as the server computed it
    output_logprobs: tuple[float, ...]
    finish_reason: dict
    weight_version: str
    server: str
    attempts: int = 1

    @property
    def finish_type(self) -> str:
        return self.finish_reason.get("type", "")


def derive_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A per-sample 31-bit seed, stable across retries and distinct across samples."""
    h = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


@dataclass
class _Item:
    rid: str
    prompt_index: int
    sample_index: int
    prompt: list[int]
    params: dict


@dataclass
class _Server:
    client: ServerClient
    inflight: int = 0
    cooldown_until: float = 0.0
    failures: int = 0


class RolloutClient:
    """Generates samples from one or more servers (see module docstring)."""

    def __init__(self, urls: Sequence[str], config: ClientConfig = ClientConfig(), *,
                 http: Optional[HttpClient] = None,
                 on_server_error: Optional[Callable[[str, Exception], None]] = None):
        if not urls:
            raise ValueError("RolloutClient needs at least one server url")
        self.config = config
        self.http = http or HttpClient(api_key=config.api_key, connect_timeout_s=config.connect_timeout_s)
        self.servers = [_Server(ServerClient(u, self.http, timeout_s=config.request_timeout_s)) for u in urls]
        #: called with (url, error) on each retryable failure, e.g. `ServerManager.report_failure`
        self.on_server_error = on_server_error
        self._lock = threading.Condition()
        self.stats = {"requests": 0, "retries": 0, "aborted_samples": 0, "duplicates_ignored": 0,
                      "rejected_version": 0}

    @property
    def urls(self) -> list[str]:
        return [s.client.url for s in self.servers]

    # ---- generation ----------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig = SamplingConfig(), *,
                 batch_id: Optional[str] = None,
                 accept_version: Optional[Callable[[str], bool]] = None) -> list[list[Sample]]:
        """G=`n` samples for each prompt (token ids), as lists in prompt and sample order. `accept_version(label)`:
        whether a sample stamped with weight version `label` is kept (others are re-sent; None keeps all)."""
        if n < 1:
            raise ValueError(f"rollout.n_samples={n}: must be >= 1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must have at least one token")
        batch_id = batch_id or uuid.uuid4().hex[:12]
        items = [
            _Item(f"{batch_id}-{i}-{j}", i, j, list(map(int, p)),
                  sampling.to_params(None if sampling.seed is None else derive_seed(sampling.seed, i, j)))
            for i, p in enumerate(prompts) for j in range(n)
        ]
        k = self.config.samples_per_request
        chunks = [items[a:a + k] for a in range(0, len(items), k)]
        results: dict[str, Sample] = {}
        deadline = time.monotonic() + self.config.rollout_timeout_s
        stop = threading.Event()
        workers = min(len(chunks), len(self.servers) * self.config.max_inflight_per_server) or 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rollout") as pool:
            futures = [pool.submit(self._run_chunk, c, results, deadline, stop, accept_version) for c in chunks]
            done, _ = wait(futures, timeout=max(0.0, deadline - time.monotonic()) + 5, return_when=FIRST_EXCEPTION)
            stop.set()
            for f in futures:
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()
            if len(done) < len(futures):
                raise RolloutError(f"rollout {batch_id} exceeded rollout_timeout_s={self.config.rollout_timeout_s}")
        out: list[list[Sample]] = [[] for _ in prompts]
        for it in items:
            out[it.prompt_index].append(results[it.rid])
        for i, group in enumerate(out):  # the invariant the trainer relies on
            if len(group) != n or len({s.rid for s in group}) != n:
                raise RolloutError(f"prompt {i} got {len(group)} samples, expected exactly {n}")
        return out

    def _pick(self, exclude: Optional[_Server], deadline: float, stop: threading.Event) -> _Server:
        """The server with the fewest in-flight calls, preferring ones not cooling down and not `exclude`."""
        with self._lock:
            while True:
                if stop.is_set():
                    raise RolloutError("rollout cancelled (another request failed)")
                now = time.monotonic()
                free = [s for s in self.servers if s.inflight < self.config.max_inflight_per_server]
                if free:
                    ready = [s for s in free if s.cooldown_until <= now]
                    pool = [s for s in ready if s is not exclude] or ready or free
                    best = min(pool, key=lambda s: (s.cooldown_until > now, s.inflight, s.failures))
                    best.inflight += 1
                    return best
                if now >= deadline:
                    raise RolloutError("rollout_timeout_s exceeded while waiting for a free server slot")
                self._lock.wait(timeout=min(0.5, deadline - now))

    def _release(self, server: _Server, error: Optional[Exception]) -> None:
        with self._lock:
            server.inflight -= 1
            if error is not None:
                server.failures += 1
                server.cooldown_until = time.monotonic() + self.config.server_cooldown_s
            else:
                server.failures = 0
            self._lock.notify_all()

    def _backoff(self, attempt: int) -> float:
        base = min(self.config.backoff_max_s, self.config.backoff_base_s * (2 ** attempt))
        return base * (0.5 + 0.5 * random.random())

    def _body(self, items: list[_Item]) -> dict:
        params = [it.params for it in items]
        body = {
            "input_ids": [it.prompt for it in items],
            "sampling_params": params if any(p != params[0] for p in params) else params[0],
            "return_logprob": True,
            "rid": [it.rid for it in items],
        }
        if self.config.lora_path is not None:
            body["lora_path"] = self.config.lora_path
        return body

    def _run_chunk(self, chunk: list[_Item], results: dict, deadline: float, stop: threading.Event,
                   accept_version: Optional[Callable[[str], bool]] = None) -> None:
        pending = {it.rid: it for it in chunk}
        last_error: Optional[Exception] = None
        server: Optional[_Server] = None
        attempt = 0
        while pending:
            if stop.is_set():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RolloutError(f"rollout_timeout_s={self.config.rollout_timeout_s} exceeded with "
                                   f"{len(pending)} samples pending; last error: {last_error}")
            server = self._pick(server if last_error else None, deadline, stop)
            body = self._body(list(pending.values()))
            error: Optional[Exception] = None
            try:
                with self._lock:
                    self.stats["requests"] += 1
                answer = server.client.generate(body, min(self.config.request_timeout_s, remaining))
                aborted = self._collect(server.client.url, answer, pending, results, attempt + 1, accept_version)
                if aborted:
                    error = RolloutError(f"{server.client.url}: {aborted} samples came back aborted or from a "
                                         "refused weight version")
            except ServerError as e:
                error = e
            self._release(server, error)
            if isinstance(error, ServerError):
                if not error.retryable:
                    raise RolloutError(f"{error} (not retryable)") from error
                if self.on_server_error is not None:
                    self.on_server_error(server.client.url, error)
            if error is None:
                continue
            last_error = error
            attempt += 1
            with self._lock:
                self.stats["retries"] += 1
            if attempt > self.config.max_retries:
                raise RolloutError(f"{len(pending)} samples failed after {attempt} attempts "
                                   f"(max_retries={self.config.max_retries}); last error: {error}")
            delay = min(self._backoff(attempt - 1), max(0.0, deadline - time.monotonic()))
            log.warning("rollout: %s; retry %d/%d in %.2fs", error, attempt, self.config.max_retries, delay)
            stop.wait(delay)

    def _collect(self, url: str, answer: Any, pending: dict, results: dict, attempts: int,
                 accept_version: Optional[Callable[[str], bool]] = None) -> int:
        """Move finished samples of one answer into `results`; return how many came back aborted (or stamped with
        a weight version `accept_version` refuses)."""
        items = answer if isinstance(answer, list) else [answer]
        aborted = 0
        for obj in items:
            rid, out_ids, lps, reason, version = _parse_item(url, obj)
            it = pending.get(rid)
            if it is None:
                with self._lock:
                    self.stats["duplicates_ignored"] += 1
                continue
            if reason.get("type") == "abort":
                aborted += 1
                with self._lock:
                    self.stats["aborted_samples"] += 1
                continue
            if accept_version is not None and not accept_version(version):
                aborted += 1
                with self._lock:
                    self.stats["rejected_version"] += 1
                log.warning("rollout: %s answered %s from weight version %r, which this rollout refuses; re-sending",
                            url, rid, version)
                continue
            with self._lock:
                if rid in results:
                    self.stats["duplicates_ignored"] += 1
                    continue
                results[rid] = Sample(rid, it.prompt_index, it.sample_index, tuple(it.prompt), tuple(out_ids),
                                      tuple(lps), reason, version, url, attempts)
            del pending[rid]
        return aborted

    # ---- scoring -------------------------------------------------------------------------------------------

    def logprobs(self, input_ids: Sequence[int], *, temperature: float = 1.0, server: int = 0) -> list[float]:
        """log p(x_t | x_<t) for t = 1..len-1 as the server computes it (prefill only, no generation)."""
        body = {
            "input_ids": list(map(int, input_ids)),
            "sampling_params": {"max_new_tokens": 0, "temperature": temperature},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        if self.config.lora_path is not None:
            body["lora_path"] = self.config.lora_path
        srv = self.servers[server].client
        answer = srv.generate(body, self.config.request_timeout_s)
        try:
            entries = answer["meta_info"]["input_token_logprobs"]
            values = [e[0] for e in entries]
        except (KeyError, TypeError, IndexError) as e:
            raise ProtocolError(srv.url, "/generate", f"no meta_info.input_token_logprobs in the answer ({e})")
        if len(values) == len(input_ids):  # SGLang: the first token has no log-prob (null)
            values = values[1:]
        if len(values) != len(input_ids) - 1 or any(v is None for v in values):
            raise ProtocolError(srv.url, "/generate", f"expected {len(input_ids)} input log-probs (the first null), "
                                                      f"got {len(entries)}")
        return [float(v) for v in values]


def _parse_item(url: str, obj: Any) -> tuple[str, list[int], list[float], dict, str]:
    """Check one generate result's shape; a wrong shape is a ProtocolError naming the field."""
    def bad(msg):
        return ProtocolError(url, "/generate", msg)

    if not isinstance(obj, dict) or not isinstance(obj.get("meta_info"), dict):
        raise bad(f"result without meta_info: {str(obj)[:200]}")
    meta = obj["meta_info"]
    rid = meta.get("id")
    out_ids = obj.get("output_ids")
    reason = meta.get("finish_reason")
    if not isinstance(rid, str) or not isinstance(out_ids, list) or not isinstance(reason, dict):
        raise bad(f"result needs meta_info.id (str), output_ids (list), meta_info.finish_reason (dict): "
                  f"{str(obj)[:200]}")
    if reason.get("type") == "abort":
        return rid, out_ids, [], reason, str(meta.get("weight_version"))
    lps = meta.get("output_token_logprobs")
    if not isinstance(lps, list) or len(lps) != len(out_ids):
        raise bad(f"rid {rid}: output_token_logprobs has {None if lps is None else len(lps)} entries for "
                  f"{len(out_ids)} output_ids")
    values = []
    for entry, tok in zip(lps, out_ids):
        if not isinstance(entry, list) or len(entry) < 2 or entry[1] != tok or not isinstance(entry[0], (int, float)):
            raise bad(f"rid {rid}: output_token_logprobs entry {entry!r} does not match token {tok}")
        values.append(float(entry[0]))
    return rid, out_ids, values, reason, str(meta.get("weight_version"))
