"""Column layouts of the common math data sets, their detection, and the mapping of one row to a `MathExample`.

| schema | problem | gold answer | reference solution |
| --- | --- | --- | --- |
| dapo | `prompt`: last user message (or a string), wrapper removed | `reward_model.ground_truth` | none |
| gsm8k | `question` | `answer` after the last `####`, no thousands commas | `answer` before `####`, no `<<..>>` |
| math | `problem` | `answer`; if absent or empty, last `\\boxed{}` of `solution` | `solution` |
| minerva | `problem` | the last `\\boxed{}` of `solution` | `solution` |
| olympiadbench | `context` + blank line + `question` | `final_answer` (a list: any element counts) | `solution[0]` |
| aime | `problem` | `answer` (numbers become strings) | `solution` when present |
| plain | `data.problem_field` | `data.answer_field` | `data.solution_field` if set |

A gold list with one element becomes a plain string; with several, a tuple of acceptable answers. `<<..>>` are
GSM8K's calculator annotations.

`data.problem_field`, `data.answer_field` and `data.solution_field` override the defaults of any schema; dotted names
reach into nested columns. `auto` detects the schema from the column names (`detect_schema`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from dasd_megatron.data.errors import DataLoadError
from dasd_megatron.data.example import BadRow, MathExample
from dasd_megatron.data.instructions import strip_instructions
from dasd_megatron.reward import last_boxed


@dataclass(frozen=True)
class Fields:
    """The columns a schema reads (dotted paths); None = not read."""

    problem: Optional[str]
    answer: Optional[str]
    solution: Optional[str]
    context: Optional[str] = None


DEFAULT_FIELDS = {
    "dapo": Fields("prompt", "reward_model.ground_truth", None),
    "gsm8k": Fields("question", "answer", None),
    "math": Fields("problem", "answer", "solution"),
    "minerva": Fields("problem", None, "solution"),
    "olympiadbench": Fields("question", "final_answer", "solution", context="context"),
    "aime": Fields("problem", "answer", "solution"),
    "plain": Fields(None, None, None),
}


def detect_schema(columns: Iterable[str]) -> str:
    """The schema whose characteristic columns are present (see the module table)."""
    cols = set(columns)
    if {"prompt", "reward_model"} <= cols:
        return "dapo"
    if {"question", "final_answer"} <= cols:
        return "olympiadbench"
    if {"problem", "answer"} <= cols:
        return "math" if "solution" in cols else "aime"
    if {"problem", "solution"} <= cols:
        return "minerva"
    if {"question", "answer"} <= cols:
        return "gsm8k"
    raise DataLoadError(
        f"data.schema='auto': cannot recognise the columns {sorted(cols)} (known layouts: DAPO/verl prompt + "
        "reward_model, GSM8K question + answer, MATH problem + solution/answer, OlympiadBench question + "
        "final_answer). Fix: set data.schema=plain with data.problem_field=<column> and data.answer_field=<column>"
    )


def resolve_fields(schema: str, problem: Optional[str], answer: Optional[str], solution: Optional[str]) -> Fields:
    """The schema's default columns with the config's overrides applied."""
    d = DEFAULT_FIELDS[schema]
    return Fields(problem or d.problem, answer or d.answer, solution or d.solution, d.context)


def check_columns(schema: str, fields: Fields, columns: Iterable[str]) -> None:
    """Fail fast (instead of reporting every row as bad) when a column the schema needs does not exist."""
    cols = set(columns)
    needed = [("problem", fields.problem)]
    answer_optional = schema in ("math", "minerva") and fields.solution is not None
    if not answer_optional:
        needed.append(("answer", fields.answer))
    for role, path in needed:
        if path is None or path.split(".")[0] not in cols:
            raise DataLoadError(
                f"data.{role}_field={path!r}: no such column for schema {schema!r} (columns: {sorted(cols)}). "
                f"Fix: set data.{role}_field to one of the columns (dotted for nested fields), or pick another "
                "data.schema"
            )


def get_path(row: dict, path: Optional[str]) -> Any:
    """`row['a']['b']` for path 'a.b'; None when any part is missing."""
    if path is None:
        return None
    cur: Any = row
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _scalar_text(value: Any) -> Optional[str]:
    """A gold or text value as a stripped string: integral floats lose their '.0'; None/empty give None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float, str)):
        s = str(value).strip()
        return s or None
    return None


def _message_content(value: Any) -> Optional[str]:
    """The problem text of a chat-style prompt: the last user message's content (or the last message's)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        msgs = [m for m in value if isinstance(m, dict)]
        users = [m for m in msgs if m.get("role") == "user"]
        pick = (users or msgs or [None])[-1]
        if pick is not None and isinstance(pick.get("content"), str):
            return pick["content"]
    return None


_GSM8K_CALC = re.compile(r"<<[^<>]*>>")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def split_gsm8k_answer(text: str) -> tuple[Optional[str], Optional[str]]:
    """`(solution, gold)` of a GSM8K answer field ('worked steps ... #### 42'); gold None without a marker."""
    if "####" not in text:
        return None, None
    head, _, tail = text.rpartition("####")
    gold = _THOUSANDS.sub("", tail.strip()) or None
    solution = _GSM8K_CALC.sub("", head).strip() or None
    return solution, gold


class RowMapper:
    """Maps raw rows of one schema to `MathExample`s, or to `BadRow`s that say why not."""

    def __init__(self, schema: str, fields: Fields, source_name: str, strip: bool = True):
        self.schema, self.fields, self.source_name, self.strip = schema, fields, source_name, strip
        self.stripped = 0
        """How many problems lost an instruction wrapper."""

    def __call__(self, row: dict, index: int) -> Union[MathExample, BadRow]:
        f = self.fields
        raw_problem = get_path(row, f.problem)
        problem = _message_content(raw_problem) if self.schema == "dapo" else raw_problem
        if not isinstance(problem, str):
            why = "missing" if raw_problem is None else f"not text (got {type(raw_problem).__name__})"
            return BadRow(index, f.problem or "problem", f"problem is {why}")
        context = get_path(row, f.context) if f.context else None
        if isinstance(context, str) and context.strip():
            problem = f"{context.strip()}\n\n{problem}"
        if self.strip:
            problem, changed = strip_instructions(problem)
            self.stripped += changed
        problem = problem.strip()
        if not problem:
            return BadRow(index, f.problem or "problem", "problem is empty (after removing instruction wrappers)")

        solution = self._solution(row)
        answer_field = f.answer or "answer"
        if self.schema == "gsm8k" and f.answer is not None:
            raw = get_path(row, f.answer)
            if not isinstance(raw, str):
                return BadRow(index, answer_field, "answer is missing or not text")
            gsm_solution, answer = split_gsm8k_answer(raw)
            if answer is None:
                return BadRow(index, answer_field, "no '####' gold marker in the answer")
            solution = solution or gsm_solution
        else:
            raw = get_path(row, f.answer) if f.answer else None
            answer = self._answer(raw)
            if answer is None and self.schema in ("math", "minerva") and solution:
                answer = last_boxed(solution) or None
                answer_field = f"{f.solution} (last \\boxed)"
            if answer is None:
                kind = type(raw).__name__
                why = ("missing or empty" if raw is None or isinstance(raw, (str, int, float, list, tuple))
                       else f"not text or a number (got {kind})")
                return BadRow(index, answer_field, f"gold answer is {why}")
        return MathExample(index=index, problem=problem, answer=answer, solution=solution, source=self.source_name)

    @staticmethod
    def _answer(value: Any) -> Union[str, tuple[str, ...], None]:
        if isinstance(value, (list, tuple)):
            items = tuple(a for a in (_scalar_text(v) for v in value) if a)
            if not items:
                return None
            return items[0] if len(items) == 1 else items
        return _scalar_text(value)

    def _solution(self, row: dict) -> Optional[str]:
        value = get_path(row, self.fields.solution) if self.fields.solution else None
        if isinstance(value, (list, tuple)):
            value = next((v for v in value if isinstance(v, str) and v.strip()), None)
        return value.strip() if isinstance(value, str) and value.strip() else None
