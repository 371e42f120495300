"""`MathExample`, the one normalised form of a problem that every schema maps to, and `BadRow`, a skipped row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union


@dataclass(frozen=True)
class MathExample:
    """One problem with its gold answer(s).

    `index` is the row's position in the loaded split (before shuffling, deduplication or filtering), so a report
    about an example points at the source row. `answer` is a string, or a tuple of acceptable answers (OlympiadBench's
    `final_answer` list); `RewardScorer.score` accepts both as gold. `solution` is a worked reference solution when
    the data set has one (the teacher's preferred privileged context). `source` names the data set (`math500`,
    `dapo_math_17k`, `openai/gsm8k`, ...).
    """

    index: int
    problem: str
    answer: Union[str, tuple[str, ...]]
    solution: Optional[str]
    source: str

    @property
    def answers(self) -> tuple[str, ...]:
        """The acceptable answers as a tuple (one element for a single gold)."""
        return self.answer if isinstance(self.answer, tuple) else (self.answer,)


@dataclass(frozen=True)
class BadRow:
    """A row that was skipped: its index in the split, the field at fault, and why."""

    index: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}: {self.field}: {self.reason}"
