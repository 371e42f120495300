"""Answer extraction: the final answer of a response, as the string handed to math-verify.

Extraction (`extract_answer`, runs in the calling process; pure string scanning, linear time):

1. The content of the *last* `\\boxed{...}`, `\\fbox{...}` or `\\framebox[...]{...}` in the response, braces matched
   with nesting (`\\{` and `\\}` are escaped braces and do not count). `\\boxed 5` (no braces) gives `5`. When the last
   box is never closed (a response cut at the length limit) the answer counts as missing: the final answer was
   truncated, and an earlier box is usually an intermediate result.
2. If there is no box and `answer_line_fallback` is on: the last line of the form `Answer: ...` (also `Final answer:`,
   with optional markdown `**`, `#`, `>` around it and a full-width colon), the format DAPO-Math-17k asks for.
   Surrounding `$`/`**` and a trailing period are removed.
3. If there is still nothing and `last_number_fallback` is on (off by default): the last number in the response
   (`-12`, `3.5`, `1,234` -> `1234`, `3/4`), the "flexible" GSM8K extraction. Meant for small models that answer in
   prose ("7 + 5 = 12."); with it a response is rewarded for its last number, so a policy can also learn to end on
   the answer.
4. Otherwise the response is `unparseable` (no math-verify call is made).

Gold answers (a string, a number, or a list of acceptable answers) become a tuple of strings (`normalize_golds`).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

Gold = Union[str, int, float, Sequence[Union[str, int, float]]]
"""A gold answer: a string, a number, or a list of acceptable answers (OlympiadBench); any match is correct."""

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_]*(?:final[ \t]+answer|answer)[ \t]*(?:\*\*)?[ \t]*[:：][ \t]*(?:\*\*)?[ \t]*(?P<ans>.*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)


def _match_braces(text: str, open_pos: int) -> Optional[int]:
    """Index of the `}` closing the `{` at `open_pos` (nesting aware, `\\{`/`\\}` skipped), or None if unclosed."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _box_content(text: str, start: int) -> Optional[str]:
    """Content of the box command whose name ends at `start` (brace form, `[..]` options, or `\\boxed 5`)."""
    i = start
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "[":  # \framebox[width][pos]{...}
        while i < n and text[i] == "[":
            close = text.find("]", i)
            if close < 0:
                return None
            i = close + 1
            while i < n and text[i] in " \t":
                i += 1
    if i < n and text[i] == "{":
        close = _match_braces(text, i)
        return None if close is None else text[i + 1:close]
    if start < n and text[start] in " \t":  # `\boxed 5`: up to whitespace or `$`
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


def last_boxed(text: str) -> Optional[str]:
    """The stripped content of the last `\\boxed`/`\\fbox`/`\\framebox` in `text`; None if there is none or the last
    one is not closed."""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    content = _box_content(text, matches[-1].end())
    return None if content is None else content.strip()


def answer_line(text: str) -> Optional[str]:
    """The answer on the last `Answer: ...` line (see the module docstring), or None."""
    found = None
    for m in _ANSWER_LINE_RE.finditer(text):
        if m.group("ans").strip():
            found = m.group("ans")
    if found is None:
        return None
    ans = found.strip()
    for _ in range(3):  # peel `**$x$**.`-style decorations
        before = ans
        ans = ans.rstrip(".").strip()
        if ans.startswith("**") and ans.endswith("**") and len(ans) > 4:
            ans = ans[2:-2].strip()
        if ans.startswith("$") and ans.endswith("$") and len(ans) > 2 and not ans.startswith("$$"):
            ans = ans[1:-1].strip()
        elif ans.startswith("$$") and ans.endswith("$$") and len(ans) > 4:
            ans = ans[2:-2].strip()
        if ans == before:
            break
    return ans or None


_NUMBER_RE = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,]*\d)|(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")


def last_number(text: str) -> Optional[str]:
    """The last number in `text` (`-12`, `3.5`, `3/4`; `1,234` -> `1234`), or None. A trailing period is not kept."""
    found = None
    for m in _NUMBER_RE.finditer(text):
        found = m.group(0)
    return None if found is None else found.replace(",", "")


def extract_answer(response: str, answer_line_fallback: bool = True, last_number_fallback: bool = False
                   ) -> Optional[str]:
    """The final answer of a response: the last box, else (optionally) the last `Answer:` line, else (optionally)
    the last number, else None."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed or None
    if _BOX_RE.search(response):  # a box is there but unclosed: truncated final answer
        return None
    ans = answer_line(response) if answer_line_fallback else None
    if ans is None and last_number_fallback:
        ans = last_number(response)
    return ans


def normalize_golds(gold: Gold) -> tuple[str, ...]:
    """A gold answer (string, number, or list of acceptable answers) as a tuple of non-empty strings."""
    items = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    out = tuple(str(g).strip() for g in items if g is not None and str(g).strip())
    if not out:
        raise ValueError(f"gold answer {gold!r} is empty. Fix: drop the example or give it an answer")
    return out
