"""Rule-based math rewards: answer extraction, math-verify checks in a killable process pool, hard deadlines.

One module per step of scoring a response against its gold answer(s):

- `extract`: the final answer of a response (last `\\boxed{}`, else an `Answer:` line, else optionally the last
  number), in the calling process.
- `verify`: `math_verify_check`, the math-verify comparison that runs in a worker process.
- `pool`: `RewardScorer`, the pool of killable worker processes with a parent-enforced deadline per check.
- `result`: the outcome of a check (`STATUSES`, `RewardResult`) and per-batch metrics (`summarize`).
- `config`: `RewardConfig` (`reward.*` in the run config).

Example::

    with RewardScorer(RewardConfig(num_workers=4, timeout_s=5.0)) as scorer:
        rewards = [r.score for r in scorer.score(responses, golds)]
"""

from dasd_megatron.reward.config import RewardConfig
from dasd_megatron.reward.extract import answer_line, extract_answer, last_boxed, last_number, normalize_golds
from dasd_megatron.reward.pool import RewardScorer
from dasd_megatron.reward.result import STATUSES, RewardResult, summarize
from dasd_megatron.reward.verify import math_verify_check, to_parse_input

__all__ = [
    "STATUSES",
    "RewardConfig",
    "RewardResult",
    "RewardScorer",
    "answer_line",
    "extract_answer",
    "last_boxed",
    "last_number",
    "math_verify_check",
    "normalize_golds",
    "summarize",
    "to_parse_input",
]
