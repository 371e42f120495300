"""Rule-based math rewards: answer extraction, math-verify checks in a killable process pool, hard deadlines.

Extraction (`extract_answer`, runs in the calling process; pure string scanning, linear time):

1. The content of the *last* `\\boxed{...}`, `\\fbox{...}` or `\\framebox[...]{...}` in the response, braces matched
   with nesting (`\\{` and `\\}` are escaped braces and do not count). `\\boxed 5` (no braces) gives `5`. When the last
   box is never closed (a response cut at the length limit) the answer counts as missing: the final answer was
   truncated, and an earlier box is usually an intermediate result.
2. If there is no box and `answer_line_fallback` is on: the last line of the form `Answer: ...` (also `Final answer:`,
   with optional markdown `**`, `#`, `>` around it and a full-width colon), the format DAPO-Math-17k asks for.
   Surrounding `$`/`**` and a trailing period are removed.
3. If there is still nothing and `last_number_fallback` is on (off by default): the last number in the response
   (`-12`, `3.5`, `1,234` -> `1234`, `3/4`), the "flexible" GSM8K extraction. Meant for small models that answer in
   prose ("7 + 5 = 12."); with it a response is rewarded for its last number, so a policy can also learn to end on
   the answer.
4. Otherwise the response is `unparseable` (no math-verify call is made).

Verification (`math_verify_check`, runs in a worker process): the extracted answer and each gold are handed to
math-verify as `$\\boxed{...}$` (as they are when already delimited as `$...$` with balanced `$`; otherwise stray
unescaped `$` are dropped), after rewriting plain scientific notation (`4.5e33` -> `4.5 \\times 10^{33}`, on both
sides, so that Minerva's golds compare with LaTeX answers). A gold may be a list of acceptable answers
(OlympiadBench): any match is correct. Gold parses are cached per worker (a GRPO group shares one gold). If the
extracted answer does not parse, the status is `unparseable`; if no gold parses, it is `error` (a data problem,
logged). math-verify swallows its own internal errors and answers False, so those count as `incorrect`. Every gold
of the six benchmarks, boxed as a response, verifies as correct against itself (tests/test_reward_benchmark_golds.py).

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

import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, Union

from dasd_megatron.config import config_error

log = logging.getLogger(__name__)

_SECTION = "reward"
STATUSES = ("correct", "incorrect", "unparseable", "timeout", "error")
Gold = Union[str, int, float, Sequence[Union[str, int, float]]]
VerifyFn = Callable[[str, tuple], Union[bool, str]]
"""A worker-side check `(extracted_answer, golds_tuple) -> bool | status`. It must be a module-level function (it is
pickled by reference into spawned workers). `True`/`False` mean correct/incorrect; a string must be one of
`correct`, `incorrect`, `unparseable`."""


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RewardConfig:
    """How rollouts are scored. Lives at `reward` in the run config."""

    num_workers: int = 4
    """Worker processes running math-verify. Each check takes 4-25 ms of one core."""
    timeout_s: float = 5.0
    """Deadline of one check, enforced by the parent (fractional seconds are fine)."""
    correct_score: float = 1.0
    incorrect_score: float = 0.0
    unparseable_score: float = 0.0
    """Score when no answer could be extracted, or math-verify could not parse the extracted answer."""
    timeout_score: float = 0.0
    """Score of a check that ran past `timeout_s`."""
    error_score: float = 0.0
    """Score of a check that raised, whose worker died, or whose gold could not be parsed."""
    answer_line_fallback: bool = True
    """Use the last `Answer: ...` line when the response has no `\\boxed{}`."""
    last_number_fallback: bool = False
    """Use the last number of the response when it has neither a box nor an `Answer:` line (for small models that
    answer in prose; see the module docstring)."""
    start_method: Literal["spawn", "forkserver", "fork"] = "spawn"
    """How workers start. 'spawn' is safe in a process holding CUDA or threads; 'fork' starts fastest but can
    deadlock when the parent has threads."""
    startup_timeout_s: float = 120.0
    """How long a new worker may take to import math-verify and report ready."""
    worker_memory_mb: Optional[int] = 2048
    """Address-space limit of each worker (RLIMIT_AS; a worker needs ~65 MB). A check that tries to build a giant
    number (`2^{2^{40}}` grows by ~80 MB/s) fails with MemoryError -> status `error`, instead of eating the host's
    memory before its deadline. None: no limit."""

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise config_error(f"{_SECTION}.num_workers", self.num_workers, "must be an integer >= 1",
                               "use about one worker per free CPU core, e.g. 4")
        for name in ("timeout_s", "startup_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise config_error(f"{_SECTION}.{name}", v, "must be a finite number of seconds > 0",
                                   "use e.g. 5.0 (timeout_s) or 120 (startup_timeout_s)")
        for name in ("correct_score", "incorrect_score", "unparseable_score", "timeout_score", "error_score"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise config_error(f"{_SECTION}.{name}", v, "must be a finite number", "use e.g. 1.0 or 0.0")
        mem = self.worker_memory_mb
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, int) or mem < 256):
            raise config_error(f"{_SECTION}.worker_memory_mb", mem, "must be an integer >= 256 or None",
                               "use e.g. 2048, or null for no limit")
        if self.start_method not in ("spawn", "forkserver", "fork"):
            raise config_error(f"{_SECTION}.start_method", self.start_method, "unknown start method",
                               "use spawn (safe default), forkserver or fork")

    def score_of(self, status: str) -> float:
        return {
            "correct": self.correct_score, "incorrect": self.incorrect_score,
            "unparseable": self.unparseable_score, "timeout": self.timeout_score, "error": self.error_score,
        }[status]


@dataclass(frozen=True)
class RewardResult:
    """The reward of one response: its score, how it was reached, and the answer string that was checked."""

    score: float
    status: str
    """One of `STATUSES`: correct, incorrect, unparseable, timeout, error."""
    extracted: Optional[str]
    """The extracted answer (None when nothing could be extracted)."""


# ---------------------------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_]*(?:final[ \t]+answer|answer)[ \t]*(?:\*\*)?[ \t]*[:：][ \t]*(?:\*\*)?[ \t]*(?P<ans>.*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)


def _match_braces(text: str, open_pos: int) -> Optional[int]:
    """Index of the `}` closing the `{` at `open_pos` (nesting aware, `\\{`/`\\}` skipped), or None if unclosed."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _box_content(text: str, start: int) -> Optional[str]:
    """Content of the box command whose name ends at `start` (brace form, `[..]` options, or `\\boxed 5`)."""
    i = start
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "[":  # \framebox[width][pos]{...}
        while i < n and text[i] == "[":
            close = text.find("]", i)
            if close < 0:
                return None
            i = close + 1
            while i < n and text[i] in " \t":
                i += 1
    if i < n and text[i] == "{":
        close = _match_braces(text, i)
        return None if close is None else text[i + 1:close]
    if start < n and text[start] in " \t":  # `\boxed 5`: up to whitespace or `$`
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


def last_boxed(text: str) -> Optional[str]:
    """The stripped content of the last `\\boxed`/`\\fbox`/`\\framebox` in `text`; None if there is none or the last
    one is not closed."""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    content = _box_content(text, matches[-1].end())
    return None if content is None else content.strip()


def answer_line(text: str) -> Optional[str]:
    """The answer on the last `Answer: ...` line (see module docstring), or None."""
    found = None
    for m in _ANSWER_LINE_RE.finditer(text):
        if m.group("ans").strip():
            found = m.group("ans")
    if found is None:
        return None
    ans = found.strip()
    for _ in range(3):  # peel `**$x$**.`-style decorations
        before = ans
        ans = ans.rstrip(".").strip()
        if ans.startswith("**") and ans.endswith("**") and len(ans) > 4:
            ans = ans[2:-2].strip()
        if ans.startswith("$") and ans.endswith("$") and len(ans) > 2 and not ans.startswith("$$"):
            ans = ans[1:-1].strip()
        elif ans.startswith("$$") and ans.endswith("$$") and len(ans) > 4:
            ans = ans[2:-2].strip()
        if ans == before:
            break
    return ans or None


_NUMBER_RE = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,]*\d)|(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")


def last_number(text: str) -> Optional[str]:
    """The last number in `text` (`-12`, `3.5`, `3/4`; `1,234` -> `1234`), or None. A trailing period is not kept."""
    found = None
    for m in _NUMBER_RE.finditer(text):
        found = m.group(0)
    return None if found is None else found.replace(",", "")


def extract_answer(response: str, answer_line_fallback: bool = True, last_number_fallback: bool = False
                   ) -> Optional[str]:
    """The final answer of a response: the last box, else (optionally) the last `Answer:` line, else (optionally)
    the last number, else None."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed or None
    if _BOX_RE.search(response):  # a box is there but unclosed: truncated final answer
        return None
    ans = answer_line(response) if answer_line_fallback else None
    if ans is None and last_number_fallback:
        ans = last_number(response)
    return ans


def normalize_golds(gold: Gold) -> tuple[str, ...]:
    """A gold answer (string, number, or list of acceptable answers) as a tuple of non-empty strings."""
    items = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    out = tuple(str(g).strip() for g in items if g is not None and str(g).strip())
    if not out:
        raise ValueError(f"gold answer {gold!r} is empty. Fix: drop the example or give it an answer")
    return out


# ---------------------------------------------------------------------------------------------------------------
# math-verify (worker side)

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_SCI = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d+)\s*$")


def to_parse_input(answer: str) -> str:
    """The string handed to `math_verify.parse` for an extracted answer or a gold (see module docstring)."""
    s = answer.strip()
    m = _SCI.match(s)
    if m:
        s = f"{m.group(1)} \\times 10^{{{int(m.group(2))}}}"
    dollars = len(_UNESCAPED_DOLLAR.findall(s))
    if dollars % 2 == 0 and len(s) > 1 and s.startswith("$") and s.endswith("$") and not s.endswith("\\$"):
        return s  # already delimited math, e.g. OlympiadBench's "$69$,$84$"
    s = _UNESCAPED_DOLLAR.sub("", s).strip()  # stray inline delimiters inside a box: "x+$ $y"
    return f"$\\boxed{{{s}}}$"


def _parse(s: str):
    from math_verify import parse

    return parse(to_parse_input(s), parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    return _parse(gold)


def math_verify_check(pred: str, golds: tuple) -> str:
    """Compare an extracted answer with the gold(s) using math-verify; no timeout here (the parent enforces it)."""
    from math_verify import verify

    parsed = _parse(pred)
    if not parsed:
        return "unparseable"
    unparsable_golds = []
    for g in golds:
        pg = _parse_gold(g)
        if not pg:
            unparsable_golds.append(g)
            continue
        if verify(pg, parsed, timeout_seconds=None):
            return "correct"
    if len(unparsable_golds) == len(golds):
        raise ValueError(f"math-verify could not parse any gold answer of {golds!r}")
    return "incorrect"


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


# ---------------------------------------------------------------------------------------------------------------
# Process pool (parent side)


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


def summarize(results: Sequence[RewardResult], prefix: str = "reward/") -> dict[str, float]:
    """Per-batch metrics: the fraction of each status and the mean score."""
    n = max(len(results), 1)
    out = {f"{prefix}{s}_frac": sum(r.status == s for r in results) / n for s in STATUSES}
    out[f"{prefix}mean_score"] = sum(r.score for r in results) / n
    return out
