"""Epistemic markers: words of hesitation and re-checking whose density tracks a model's exploration (METHOD.md).

A marker is one of `MARKERS` as a whole word, case-insensitive (`\\b` word boundaries): "Wait," and "WAIT" count,
"waiting", "checked" and "hmmm" do not; "check-in" counts once (the hyphen is a word boundary). The density reported
by the evaluation is the mean number of marker occurrences per response (thinking included: the whole decoded
response is scanned).
"""

from __future__ import annotations

import re
from collections import Counter

MARKERS = ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems", "might", "likely", "check")
_MARKER_RE = re.compile(r"\b(" + "|".join(MARKERS) + r")\b", re.IGNORECASE)


def count_markers(text: str) -> dict[str, int]:
    """Occurrences of each marker in `text` (only markers that occur; lower-case keys)."""
    return dict(Counter(m.group(1).lower() for m in _MARKER_RE.finditer(text or "")))
