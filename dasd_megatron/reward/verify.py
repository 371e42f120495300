"""math-verify checks, run inside a reward worker process (`dasd_megatron.reward.pool`).

Verification (`math_verify_check`): the extracted answer and each gold are handed to math-verify as `$\\boxed{...}$`
(as they are when already delimited as `$...$` with balanced `$`; otherwise stray unescaped `$` are dropped), after
rewriting plain scientific notation (`4.5e33` -> `4.5 \\times 10^{33}`, on both sides, so that Minerva's golds compare
with LaTeX answers). A gold may be a list of acceptable answers (OlympiadBench): any match is correct. Gold parses are
cached per worker (a GRPO group shares one gold). If the extracted answer does not parse, the status is
`unparseable`; if no gold parses, it is `error` (a data problem, logged). math-verify swallows its own internal errors
and answers False, so those count as `incorrect`. Every gold of the six benchmarks, boxed as a response, verifies as
correct against itself (tests/test_reward_benchmark_golds.py).

No timeout is applied here: math-verify's own uses SIGALRM, so it is switched off and the pool's parent process
enforces the deadline of each check (see `dasd_megatron.reward.pool`).
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Union

VerifyFn = Callable[[str, tuple], Union[bool, str]]
"""A worker-side check `(extracted_answer, golds_tuple) -> bool | status`. It must be a module-level function (it is
pickled by reference into spawned workers). `True`/`False` mean correct/incorrect; a string must be one of
`correct`, `incorrect`, `unparseable`."""

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_SCI = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d+)\s*$")


def to_parse_input(answer: str) -> str:
    """The string handed to `math_verify.parse` for an extracted answer or a gold (see the module docstring)."""
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
