"""What a reward check ends with: its status (`STATUSES`), the `RewardResult` of one response, and per-batch
metrics (`summarize`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

STATUSES = ("correct", "incorrect", "unparseable", "timeout", "error")


@dataclass(frozen=True)
class RewardResult:
    """The reward of one response: its score, how it was reached, and the answer string that was checked."""

    score: float
    status: str
    """One of `STATUSES`: correct, incorrect, unparseable, timeout, error."""
    extracted: Optional[str]
    """The extracted answer (None when nothing could be extracted)."""


def summarize(results: Sequence[RewardResult], prefix: str = "reward/") -> dict[str, float]:
    """Per-batch metrics: the fraction of each status and the mean score."""
    n = max(len(results), 1)
    out = {f"{prefix}{s}_frac": sum(r.status == s for r in results) / n for s in STATUSES}
    out[f"{prefix}mean_score"] = sum(r.score for r in results) / n
    return out
