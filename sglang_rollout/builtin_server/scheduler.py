"""The built-in server's scheduler: a queue of sequences run in batches with a KV cache.

One thread takes the waiting sequences (up to `max_batch_size`, after a short window that lets concurrent
requests join), left-pads the prompts, runs one prefill and then decode steps, dropping finished rows from the
batch and its cache as they finish. Sequences that arrive meanwhile wait for the next batch (no mid-batch joins).

LoRA: a batch runs with one adapter or none (`Sequence.adapter`). The next batch takes the adapter of the oldest
waiting sequence and every waiting sequence with that same adapter (in arrival order); the others stay queued for
the following batches. So no forward (prefill or decode step) ever mixes adapters, and a base request and an
adapter request sent together come back exactly as when sent alone.

Pause (`/pause_generation`): mode "abort" finishes every queued and running sequence with an `abort`
finish_reason; "in_place" and "retract" hold the running batch at the next step boundary. In every mode no new
batch starts until `/continue_generation`. Requests that arrive while paused are held aside (SGLang holds them in
its tokenizer manager, before the scheduler) and join the queue on continue: they do not count as pending for
`/flush_cache` or `/release_memory_occupation`, as in SGLang. Weight updates take the model lock, so they land
between two steps.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from sglang_rollout.builtin_server.model_runner import ModelRunner
from sglang_rollout.builtin_server.sampler import SamplingSpec, sample_next, token_logprobs

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One sequence to generate (a `/generate` request expands into one per prompt and per `n`)."""

    rid: str
    prompt: list[int]
    spec: SamplingSpec
    generator: torch.Generator
    return_logprob: bool = False
    logprob_start_len: int = -1
    future: Future = field(default_factory=Future)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: Optional[list] = None
    finish_reason: Optional[dict] = None
    abort_message: Optional[str] = None
    created: float = field(default_factory=time.monotonic)
    #: the LoRA adapter this sequence runs with (a `builtin_server.lora.LoRAAdapter`; None: the base model)
    adapter: Optional[Any] = None

    def stop_ids(self, eos_ids: set[int]) -> set[int]:
        return set(self.spec.stop_token_ids) | (set() if self.spec.ignore_eos else eos_ids)


class Scheduler:
    """Runs sequences in KV-cached batches on one thread (see module docstring)."""

    def __init__(self, runner: ModelRunner, *, max_batch_size: int = 64, batch_window_s: float = 0.005):
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self._cv = threading.Condition()
        self._queue: list[Sequence] = []
        #: submitted while paused: join the queue on resume (see module docstring)
        self._held: list[Sequence] = []
        self._running: list[Sequence] = []
        self._paused = False
        self._pause_mode = "abort"
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="builtin-scheduler", daemon=True)
        self.stats = {"batches": 0, "sequences": 0, "generated_tokens": 0, "max_batch": 0}

    # ---- control (HTTP threads) ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            for s in self._queue + self._held + self._running:
                s.abort_message = "server shutting down"
            self._cv.notify_all()
        self._thread.join(timeout=10)
        for s in self._queue + self._held:
            self._finish_abort(s)

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("server is shutting down")
            (self._held if self._paused else self._queue).extend(seqs)
            self._cv.notify_all()

    def busy(self) -> bool:
        """Sequences queued or running (those held while paused do not count, as in SGLang)."""
        with self._cv:
            return bool(self._queue or self._running)

    def num_running(self) -> int:
        """How many sequences the batch in progress holds (0 between batches, finished rows included)."""
        with self._cv:
            return len(self._running)

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, mode: str, wait_s: float = 10.0) -> None:
        """Stop starting batches; "abort" also aborts all sequences and waits (bounded) until none runs."""
        with self._cv:
            self._paused, self._pause_mode = True, mode
            if mode == "abort":
                self._abort_locked(None, "aborted by /pause_generation")
            self._cv.notify_all()
            if mode == "abort":
                deadline = time.monotonic() + wait_s
                while self._running and time.monotonic() < deadline:
                    self._cv.wait(timeout=0.05)

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._queue.extend(self._held)
            self._held.clear()
            self._cv.notify_all()

    def abort(self, rid: Optional[str], message: str = "aborted by /abort_request") -> int:
        with self._cv:
            return self._abort_locked(rid, message)

    def _abort_locked(self, rid: Optional[str], message: str) -> int:
        n = 0
        for waiting in (self._queue, self._held):
            for s in list(waiting):
                if rid is None or s.rid == rid:
                    waiting.remove(s)
                    s.abort_message = message
                    self._finish_abort(s)
                    n += 1
        for s in self._running:
            if rid is None or s.rid == rid:
                s.abort_message = message  # finished by the scheduler at the next step boundary
                n += 1
        return n

    # ---- scheduler thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (self._paused or not self._queue):
                    self._cv.wait()
                if self._stop:
                    return
            time.sleep(self.batch_window_s)  # let concurrent requests join this batch
            with self._cv:
                if self._paused or not self._queue:
                    continue
                batch = self._next_batch()
                self._running = list(batch)
            try:
                self._run_batch(batch)
            except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
                log.exception("batch failed")
                for s in batch:
                    if not s.future.done():
                        s.future.set_exception(e)
            finally:
                with self._cv:
                    self._running = []
                    self._cv.notify_all()

    def _next_batch(self) -> list[Sequence]:
        """Take the oldest waiting sequence's adapter group (at most `max_batch_size`) off the queue."""
        adapter = self._queue[0].adapter
        batch = [s for s in self._queue if s.adapter is adapter][: self.max_batch_size]
        taken = set(map(id, batch))
        self._queue = [s for s in self._queue if id(s) not in taken]
        return batch

    def _wait_if_held(self) -> None:
        """In-place pause: hold the running batch here until /continue_generation (or an abort)."""
        with self._cv:
            while self._paused and self._pause_mode != "abort" and not self._stop and not any(
                s.abort_message for s in self._running
            ):
                self._cv.wait(timeout=0.1)

    def _finish(self, s: Sequence, reason: dict) -> None:
        s.finish_reason = reason
        if not s.future.done():
            s.future.set_result(s)

    def _finish_abort(self, s: Sequence) -> None:
        self._finish(s, {"type": "abort", "message": s.abort_message or "aborted", "status_code": 503,
                         "err_type": None})

    def _run_batch(self, batch: list[Sequence]) -> None:
        r = self.runner
        self.stats["batches"] += 1
        self.stats["sequences"] += len(batch)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        lmax = max(len(s.prompt) for s in batch)
        ids = torch.zeros(len(batch), lmax, dtype=torch.long)
        mask = torch.zeros(len(batch), lmax, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, lmax - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, lmax - len(s.prompt):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want_input_lp = any(s.return_logprob and s.logprob_start_len >= 0 for s in batch)
        cache = r.new_cache()
        adapter = batch[0].adapter  # one per batch (see `_next_batch`)
        logits, cache = r.forward(ids, mask, pos, cache, all_logits=want_input_lp, adapter=adapter)
        if want_input_lp:
            self._input_logprobs(batch, ids, logits, lmax)
        last = logits[:, -1, :]
        next_pos = pos[:, -1] + 1
        active = list(range(len(batch)))
        eos = r.eos_ids
        while True:
            self._wait_if_held()
            keep, tokens_in = [], []
            live = [i for i in active if not self._retire_if_done(batch[i])]
            if live:
                rows = [active.index(i) for i in live]
                lg = last[rows].float()
                for j, i in enumerate(live):  # min_new_tokens: no stop token before it
                    s = batch[i]
                    if len(s.output_ids) < s.spec.min_new_tokens:
                        lg[j, list(s.stop_ids(eos))] = float("-inf")
                toks, lps = sample_next(lg, [batch[i].spec for i in live], [batch[i].generator for i in live])
                for j, i in enumerate(live):
                    s, tok = batch[i], int(toks[j])
                    s.output_ids.append(tok)
                    s.output_logprobs.append(float(lps[j]))
                    self.stats["generated_tokens"] += 1
                    if tok in s.stop_ids(eos):
                        self._finish(s, {"type": "stop", "matched": tok})
                    elif len(s.output_ids) >= s.spec.max_new_tokens:
                        self._finish(s, {"type": "length", "length": s.spec.max_new_tokens})
                    elif len(s.prompt) + len(s.output_ids) >= r.max_context:
                        self._finish(s, {"type": "length", "length": len(s.output_ids)})
                    else:
                        keep.append(i)
                        tokens_in.append(tok)
            if not keep:
                return
            rows = torch.tensor([active.index(i) for i in keep])
            if len(keep) < len(active):
                cache.batch_select_indices(rows)
                mask, next_pos = mask[rows], next_pos[rows]
            active = keep
            mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype)], dim=1)
            logits, cache = r.forward(torch.tensor(tokens_in).unsqueeze(1), mask, next_pos.unsqueeze(1), cache,
                                      all_logits=False, adapter=adapter)
            last = logits[:, -1, :]
            next_pos = next_pos + 1

    def _retire_if_done(self, s: Sequence) -> bool:
        """Finish a sequence that was aborted or asks for no tokens; True if it is finished."""
        if s.finish_reason is not None:
            return True
        if s.abort_message:
            self._finish_abort(s)
            return True
        if s.spec.max_new_tokens == 0:
            self._finish(s, {"type": "length", "length": 0})
            return True
        return False

    def _input_logprobs(self, batch: list[Sequence], ids: torch.Tensor, logits: torch.Tensor, lmax: int) -> None:
        for i, s in enumerate(batch):
            if not (s.return_logprob and s.logprob_start_len >= 0):
                continue
            n = len(s.prompt)
            pad = lmax - n
            start = min(s.logprob_start_len, n - 1)
            # logits at position pad+t predict token t+1
            lp = token_logprobs(logits[i, pad:pad + n - 1], ids[i, pad + 1:pad + n], s.spec.temperature)
            values = [None] + lp.tolist()
            s.input_logprobs = [[values[t], s.prompt[t], None] for t in range(start, n)]
