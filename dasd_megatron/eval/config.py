"""`EvalConfig`: what an evaluation run generates and how it is scored (frozen, validated at construction).

Defaults follow METHOD.md's evaluation protocol: 16 samples per problem, temperature 0.6, top-p 0.95, answers from
the last `\\boxed{}` checked with math-verify. `max_new_tokens` (32768, room for a thinking model's trace) is ours.

Fields that change what is generated or how it is scored are the *identity* of a run (`identity()`): a rerun into
the same output folder must match them, so that resumed records and new ones belong to one experiment. The benchmark
selection (custom evaluation sets included), `limit`, concurrency and bookkeeping options are not part of it (a rerun
may widen `--limit` or add a set); records are matched to problems by their text's hash, so a changed data file is
caught anyway.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from dasd_megatron.config import config_error
from dasd_megatron.data import DataConfig, PromptConfig
from dasd_megatron.eval.benchmarks import ALL_BENCHMARKS, custom_key, parse_benchmarks
from dasd_megatron.eval.passk import check_ks, default_ks

_S = "eval"


def _positive_int(name: str, value, fix: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise config_error(f"{_S}.{name}", value, "must be a positive integer" + (" or None" if allow_none else ""),
                           fix)


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (see module docstring)."""

    model: str = ""
    """What is evaluated: the checkpoint path as given (made absolute), or the served model's name. Part of the
    run's identity; informational otherwise."""
    benchmarks: tuple[str, ...] = ALL_BENCHMARKS
    """Built-in benchmarks (any of `ALL_BENCHMARKS`); may be empty when `data` names an evaluation set."""
    data: tuple[DataConfig, ...] = ()
    """Custom evaluation sets (`dasd eval --data`, see `benchmarks.custom_data_config`), each evaluated as one more
    benchmark named `DataConfig.name`, after the built-in ones."""
    n_samples: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = -1
    max_new_tokens: int = 32768
    seed: int = 0
    """Base seed: each problem's samples get seeds derived from (seed, benchmark, problem id, sample), so a resumed
    problem is sampled exactly as it would have been in one go (on a server that honours `sampling_seed`)."""
    pass_k: Optional[tuple[int, ...]] = None
    """The k of Pass@k; None: powers of two up to n_samples (and n_samples)."""
    limit: Optional[int] = None
    """Only the first `limit` problems of each benchmark (quick runs)."""
    concurrency: int = 32
    """Problems whose samples are generated at the same time."""
    answer_line_fallback: bool = False
    """Also accept a last `Answer: ...` line when a response has no `\\boxed{}` (off: METHOD.md scores boxes)."""
    last_number_fallback: bool = False
    """Then also accept the response's last number (off; a small model trained with `reward.last_number_fallback`,
    like the main job's, is evaluated the way it was rewarded)."""
    reward_workers: int = 2
    reward_timeout_s: float = 10.0
    save_responses: bool = False
    """Store each sample's decoded text in the records (large: up to n x max_new_tokens tokens per problem)."""
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        data = tuple(self.data)
        for d in data:
            if not isinstance(d, DataConfig) or not d.name:
                raise config_error(f"{_S}.data", d, "each evaluation set must be a DataConfig with a name",
                                   "build it with benchmarks.custom_data_config(source, ...)")
            custom_key(d.source, d.name)  # a valid name that is not a built-in benchmark's
        names = [d.name for d in data]
        if len(set(names)) != len(names):
            raise config_error(f"{_S}.data", names, "two evaluation sets have the same name",
                               "give each its own name (--data-name)")
        object.__setattr__(self, "data", data)
        benchmarks = list(self.benchmarks)
        object.__setattr__(self, "benchmarks", parse_benchmarks(benchmarks) if benchmarks or not data else ())
        _positive_int("n_samples", self.n_samples, "use e.g. 16 (METHOD.md's Avg@16)")
        _positive_int("max_new_tokens", self.max_new_tokens, "use e.g. 32768 for thinking models")
        _positive_int("concurrency", self.concurrency, "use e.g. 32 on GPUs, 2-4 on a CPU server")
        _positive_int("reward_workers", self.reward_workers, "use about one per free CPU core")
        _positive_int("limit", self.limit, "give a problem count per benchmark, or None for all", allow_none=True)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not math.isfinite(self.temperature) or self.temperature < 0:
            raise config_error(f"{_S}.temperature", self.temperature, "must be a finite number >= 0",
                               "use 0.6 (METHOD.md), 0 for greedy")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise config_error(f"{_S}.top_p", self.top_p, "must be in (0, 1]", "use 0.95 (METHOD.md), 1 to disable")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            raise config_error(f"{_S}.top_k", self.top_k, "must be -1 or >= 1", "use -1 to disable")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise config_error(f"{_S}.seed", self.seed, "must be an integer >= 0", "use e.g. 0")
        if isinstance(self.reward_timeout_s, bool) or not isinstance(self.reward_timeout_s, (int, float)) or \
                not math.isfinite(self.reward_timeout_s) or self.reward_timeout_s <= 0:
            raise config_error(f"{_S}.reward_timeout_s", self.reward_timeout_s, "must be a number of seconds > 0",
                               "use e.g. 10")
        if self.pass_k is not None:
            try:
                object.__setattr__(self, "pass_k", check_ks(tuple(self.pass_k), self.n_samples))
            except (ValueError, TypeError) as e:
                raise config_error(f"{_S}.pass_k", self.pass_k, str(e), "leave it unset for powers of two") from None
        if not isinstance(self.prompt, PromptConfig):
            raise config_error(f"{_S}.prompt", self.prompt, "must be a PromptConfig", "build it with PromptConfig()")

    @property
    def sets(self) -> tuple[str, ...]:
        """Every evaluation set's key, in report order: the selected benchmarks, then the custom sets."""
        return self.benchmarks + tuple(d.name for d in self.data)

    @property
    def ks(self) -> tuple[int, ...]:
        return self.pass_k if self.pass_k is not None else default_ks(self.n_samples)

    def identity(self) -> dict:
        """The settings a resumed run must share with the records already in its output folder."""
        return {
            "model": self.model, "n_samples": self.n_samples, "temperature": float(self.temperature),
            "top_p": float(self.top_p), "top_k": self.top_k, "max_new_tokens": self.max_new_tokens,
            "seed": self.seed, "answer_line_fallback": self.answer_line_fallback,
            **({"last_number_fallback": True} if self.last_number_fallback else {}),
            "prompt": {k: v for k, v in asdict(self.prompt).items()
                       if k in ("system_prompt", "chat_template", "enable_thinking")
                       or (k == "instruction" and v is not None)},
        }
