"""The reward worker pool: math-verify checks in killable worker processes, with hard deadlines.

`RewardScorer.score(responses, golds)` extracts each response's answer in the calling process
(`dasd_megatron.reward.extract`) and sends the checks (`dasd_megatron.reward.verify.math_verify_check`, or an injected
`verify_fn`) to a pool of worker processes; every response gets a `RewardResult`, whatever happens to a worker.

Memory: each worker runs under an address-space cap (`worker_memory_mb`), so an answer such as `2^{2^{40}}` cannot
eat the host's memory before its deadline.

Deadlines: math-verify's own timeout uses SIGALRM (main thread only, whole seconds, cannot interrupt C code), so it is
switched off and the *parent* enforces `timeout_s` per check. `RewardScorer` owns a small pool of
`multiprocessing.Process` workers, each with its own pipe; a check that passes its deadline scores `timeout_score`,
is counted, and its worker is killed (SIGKILL) and replaced by a fresh one, while the other workers keep going.
A worker that dies mid-check gives `error` and is replaced the same way. `ProcessPoolExecutor` is not used because
it cannot kill one stuck worker. Slow checks are not hypothetical: a Minerva gold (an equation of motion) compared
with the same equation plus 1 took more than 5 s here, and `9^{9^{9^{9}}}` against 2 does not finish in 20 s.

Example::

    with RewardScorer(RewardConfig(num_workers=4, timeout_s=5.0)) as scorer:
        results = scorer.score(responses, golds)          # list[RewardResult]
        rewards = [r.score for r in results]
        log(scorer.metrics())                              # reward/correct, reward/timeout, ...

The scorer is not thread-safe: call it from one thread. With `start_method='spawn'` (the default) workers re-import
the parent's main module, so a script that creates a scorer needs an `if __name__ == "__main__":` guard (and cannot
be fed through stdin); a failure to start is reported with that fix.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import time
import weakref
from collections import deque
from typing import Any, Optional, Sequence

from dasd_megatron.reward.config import RewardConfig
from dasd_megatron.reward.extract import Gold, extract_answer, normalize_golds
from dasd_megatron.reward.result import STATUSES, RewardResult
from dasd_megatron.reward.verify import VerifyFn, math_verify_check

log = logging.getLogger("dasd_megatron.reward")  # one logger for the whole reward package


def _limit_memory(mb: Optional[int]) -> None:
    if mb is None:
        return
    try:
        import resource

        limit = mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError) as e:  # not on this platform: run without the cap
        log.warning("reward worker: could not limit memory to %s MB (%s)", mb, e)


def _worker_main(conn, verify_fn: Optional[VerifyFn], memory_mb: Optional[int] = None) -> None:
    """Worker loop: warm up math-verify, report ready, then answer `(task_id, pred, golds)` until `None` arrives."""
    _limit_memory(memory_mb)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    fn = verify_fn or math_verify_check
    try:
        if verify_fn is None:
            math_verify_check("1", ("1",))  # import sympy & friends before the first deadline starts
        conn.send(("ready", os.getpid()))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            task_id, pred, golds = msg
            try:
                out = fn(pred, golds)
                status = ("correct" if out else "incorrect") if isinstance(out, bool) else str(out)
                if status not in ("correct", "incorrect", "unparseable"):
                    raise ValueError(f"verify function returned {out!r}; expected a bool or correct/incorrect/"
                                     "unparseable")
                conn.send((task_id, status, None))
            except (Exception, MemoryError, RecursionError) as e:  # noqa: BLE001 - reported as status 'error'
                conn.send((task_id, "error", f"{type(e).__name__}: {e}"))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        conn.close()


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx, verify_fn: Optional[VerifyFn], memory_mb: Optional[int]):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, verify_fn, memory_mb), daemon=True,
                                name="dasd-reward")
        self.proc.start()
        child.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.task: Optional[tuple[int, int, float]] = None  # (batch, result index, deadline)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        """Ask an idle worker to exit; kill it if it does not."""
        try:
            if self.task is None:
                self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=2)
        self.kill()


def _kill_all(workers: list) -> None:
    for w in list(workers):
        try:
            w.kill()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class RewardScorer:
    """Scores batches of responses against gold answers with a pool of killable math-verify workers.

    `verify_fn` replaces the worker-side check (default `math_verify_check`); it exists for tests and custom
    verifiers, and must be a module-level function.
    """

    def __init__(self, cfg: RewardConfig = RewardConfig(), verify_fn: Optional[VerifyFn] = None):
        self.cfg = cfg
        self._verify_fn = verify_fn
        self._ctx = multiprocessing.get_context(cfg.start_method)
        self._workers: list[_Worker] = []
        self._closed = False
        self._batch = 0
        self.counters: dict[str, float] = {s: 0 for s in STATUSES}
        self.counters.update(checks=0, workers_replaced=0, seconds=0.0)
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        for _ in range(cfg.num_workers):
            self._workers.append(_Worker(self._ctx, verify_fn, cfg.worker_memory_mb))

    # -- public API ---------------------------------------------------------------------------------------------

    def score(self, responses: Sequence[str], golds: Sequence[Gold]) -> list[RewardResult]:
        """Score `responses[i]` against `golds[i]`; every response gets a result, whatever happens to a worker."""
        if self._closed:
            raise RuntimeError("RewardScorer is closed. Fix: create a new one (or use it inside its `with` block)")
        if len(responses) != len(golds):
            raise ValueError(f"score() got {len(responses)} responses but {len(golds)} golds. Fix: pass one gold "
                             "per response (repeat a problem's gold for each of its G rollouts)")
        t0 = time.monotonic()
        results: list[Optional[RewardResult]] = [None] * len(responses)
        extracted: list[Optional[str]] = [None] * len(responses)
        pending: deque = deque()
        for i, (resp, gold) in enumerate(zip(responses, golds)):
            try:
                g = normalize_golds(gold)
            except ValueError as e:
                raise ValueError(f"golds[{i}]: {e}") from None
            ans = extract_answer(resp or "", self.cfg.answer_line_fallback, self.cfg.last_number_fallback)
            extracted[i] = ans
            if ans is None:
                results[i] = self._result("unparseable", None)
            else:
                pending.append((i, ans, g))
        if pending:
            self._run(pending, results, extracted)
        self.counters["checks"] += len(responses)
        self.counters["seconds"] += time.monotonic() - t0
        return results  # type: ignore[return-value]

    def worker_pids(self) -> list[Optional[int]]:
        return [w.pid for w in self._workers]

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Cumulative counters (checks, each status, workers_replaced, seconds, checks_per_s), namespaced."""
        out = {f"{prefix}{k}": float(v) for k, v in self.counters.items()}
        secs = self.counters["seconds"]
        out[f"{prefix}checks_per_s"] = self.counters["checks"] / secs if secs > 0 else 0.0
        return out

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.stop()
        self._finalizer.detach()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------------

    def _result(self, status: str, extracted: Optional[str]) -> RewardResult:
        self.counters[status] += 1
        return RewardResult(score=float(self.cfg.score_of(status)), status=status, extracted=extracted)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self._verify_fn, self.cfg.worker_memory_mb)
        self.counters["workers_replaced"] += 1

    def _run(self, pending: deque, results: list, extracted: list) -> None:
        """Dispatch `pending` checks to ready workers, collect results, enforce deadlines, replace dead workers.

        Tasks carry a batch number: if a previous `score()` was interrupted (an exception, Ctrl-C) while checks were
        in flight, their late results are dropped instead of landing in this batch's slots.
        """
        self._batch += 1
        batch = self._batch
        startup_failures = 0
        while pending or any(w.task is not None and w.task[0] == batch for w in self._workers):
            for w in self._workers:  # dispatch to idle, ready workers
                if pending and w.ready and w.task is None:
                    i, ans, g = pending.popleft()
                    try:
                        w.conn.send(((batch, i), ans, g))
                    except (OSError, BrokenPipeError):
                        pending.appendleft((i, ans, g))
                        self._replace(w)
                        continue
                    w.task = (batch, i, time.monotonic() + self.cfg.timeout_s)
            deadlines = [w.task[2] for w in self._workers if w.task is not None]
            deadlines += [w.started_at + self.cfg.startup_timeout_s for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            conns = {w.conn: w for w in self._workers}
            for conn in multiprocessing.connection.wait(list(conns), timeout=wait_s):
                w = conns[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is None:  # the worker died
                    if w.task is not None and w.task[0] == batch:
                        i = w.task[1]
                        log.warning("reward worker %s died while checking response %d; scored as error", w.pid, i)
                        results[i] = self._result("error", extracted[i])
                    elif not w.ready:
                        startup_failures += 1
                        if startup_failures > 3 * self.cfg.num_workers:
                            w.proc.join(timeout=1)
                            raise RuntimeError(
                                f"reward workers keep dying at start-up (exit code {w.proc.exitcode}). Fix: check "
                                "that math-verify imports in a fresh interpreter (python -c 'import math_verify'); "
                                f"with reward.start_method={self.cfg.start_method} the main module must be an "
                                "importable file with an `if __name__ == '__main__':` guard (not stdin)"
                            )
                    self._replace(w)
                elif msg[0] == "ready":
                    w.ready = True
                else:
                    (task_batch, i), status, err = msg
                    w.task = None
                    if task_batch != batch:
                        continue  # a late result of an interrupted batch
                    if err:
                        log.warning("reward check of response %d failed: %s", i, err)
                    results[i] = self._result(status, extracted[i])
            now = time.monotonic()
            for w in list(self._workers):  # enforce deadlines
                if w.task is not None and now >= w.task[2]:
                    task_batch, i, _ = w.task
                    if task_batch == batch:
                        log.warning("reward check of response %d passed its %.3g s deadline; killing worker %s",
                                    i, self.cfg.timeout_s, w.pid)
                        results[i] = self._result("timeout", extracted[i])
                    self._replace(w)
                elif not w.ready and now >= w.started_at + self.cfg.startup_timeout_s:
                    raise RuntimeError(
                        f"a reward worker did not start within reward.startup_timeout_s={self.cfg.startup_timeout_s}"
                        ". Fix: raise reward.startup_timeout_s or lower reward.num_workers on a loaded machine"
                    )
