"""`RewardConfig`: how rollouts are scored (extraction fallbacks, scores per status, the worker pool). Lives at
`reward` in the run config, so errors name fields as `reward.<field>`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from dasd_megatron.errors import config_error

_SECTION = "reward"


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
    answer in prose; see `dasd_megatron.reward.extract`)."""
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
        """The score of a check that ended with `status` (one of `dasd_megatron.reward.result.STATUSES`)."""
        return {
            "correct": self.correct_score, "incorrect": self.incorrect_score,
            "unparseable": self.unparseable_score, "timeout": self.timeout_score, "error": self.error_score,
        }[status]
