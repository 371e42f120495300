"""Epistemic markers: words of hesitation and re-checking whose density tracks a model's exploration (METHOD.md).

A marker is one of `MARKERS` as a whole word, case-insensitive (`\\b` word boundaries): "Wait," and "WAIT" count,
"waiting", "checked" and "hmmm" do not; "check-in" counts once (the hyphen is a word boundary). The density reported
by the evaluation and by training (`rollout/epistemic_marker_density`, `epistemic_marker_density`) is the mean
number of marker occurrences per response (thinking included: the whole decoded response is scanned), so the two
are the same measure.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

__all__ = ["MARKERS", "MARKER_REGEX", "count_markers", "epistemic_marker_density"]

MARKERS = ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems", "might", "likely", "check")
#: The exact pattern counted (compiled with `re.IGNORECASE`): any marker between two word boundaries.
MARKER_REGEX = r"\b(" + "|".join(MARKERS) + r")\b"
_MARKER_RE = re.compile(MARKER_REGEX, re.IGNORECASE)


def count_markers(text: str) -> dict[str, int]:
    """Occurrences of each marker in `text` (only markers that occur; lower-case keys)."""
    return dict(Counter(m.group(1).lower() for m in _MARKER_RE.finditer(text or "")))


def epistemic_marker_density(texts: Iterable[str]) -> float:
    """Mean number of epistemic-marker occurrences per response over `texts` (NaN for no texts).

    A marker is one of wait, hmm, perhaps, maybe, actually, alternatively, seems, might, likely, check, matched as a
    whole word, case-insensitively: `MARKER_REGEX` = `\\b(wait|hmm|perhaps|maybe|actually|alternatively|seems|might|
    likely|check)\\b` with `re.IGNORECASE`. Consequences: "Wait," "WAIT" and "wait." count; "check" counts only as the
    word itself, so "checked", "checking", "checks" and "recheck" do not (inflections are not listed markers), while
    "re-check" and "check-in" count once (a hyphen is a word boundary); "maybelline", "waiting", "hmmm", "seemsly"
    and "check_answer" (underscore is a word character) do not count. Every occurrence counts ("wait wait" = 2).
    """
    texts = list(texts)
    if not texts:
        return float("nan")
    return sum(sum(count_markers(t).values()) for t in texts) / len(texts)
