"""Removal of instruction wrappers that some data sets put around the bare problem.

We write our own instructions (see `prompts`), so a problem must reach them bare. Known wrappers:

- DAPO-Math-17k (hub version), around every problem::

      Solve the following math problem step by step. The last line of your response should be of the form
      Answer: $Answer (without quotes) where $Answer is the answer to the problem.

      <problem>

      Remember to put your answer on its own line after "Answer:".

- DAPO's Chinese rows (also in the local copy): a trailing `让我们一步一步地思考。请以“Answer: \\boxed{<final_answer>}”
  的格式输出最终答案。...` paragraph.
- simple-evals' variant of the DAPO suffix: `..., and you do not need to use a \\boxed command.`
- verl-preprocessed sets: a trailing `Let's think step by step and output the final answer within \\boxed{}.` or
  `Please reason step by step, and put your final answer within \\boxed{}.`

How it stays robust: each pattern is anchored at the start or the end of the text and must contain the wrapper's
distinctive words together (a prefix must say "Solve the following math problem" *and* mention `Answer:` on the same
line), so a problem that merely starts "Solve the following equation ..." is left alone. Matching ignores case and
tolerates straight or curly quotes and extra whitespace; the patterns are applied until none matches, so a wrapper
with both a prefix and a suffix is removed whole. What remains is stripped of surrounding whitespace; if nothing
remains, the row is reported as bad (the caller's job).
"""

from __future__ import annotations

import re

_Q = "[\"'“”‘’]?"

PREFIXES = (
    # DAPO: one line that asks for "Answer: $Answer", then a blank line.
    re.compile(r"\A\s*Solve the following math problem[^\n]*?Answer:[^\n]*\n\s*", re.IGNORECASE),
)

SUFFIXES = (
    re.compile(r"\s*Remember to put your answer on its own line after\s*" + _Q + r"Answer:?" + _Q
               + r"(?:,[^\n]*)?\.?\s*\Z", re.IGNORECASE),
    re.compile(r"\s*让我们一步一步地思考。[^\n]*Answer[^\n]*\Z"),
    re.compile(r"\s*Let'?s think step by step and output the final answer within \\boxed\{\}\.?\s*\Z", re.IGNORECASE),
    re.compile(r"\s*Please reason step by step,? and put your final answer within \\boxed\{\}\.?\s*\Z",
               re.IGNORECASE),
)


def strip_instructions(text: str) -> tuple[str, bool]:
    """`(bare_problem, changed)`: `text` without any known instruction prefix or suffix."""
    out = text
    changed = True
    while changed:
        changed = False
        for pat in PREFIXES + SUFFIXES:
            new = pat.sub("", out, count=1)
            if new != out:
                out, changed = new, True
    out = out.strip()
    return out, out != text.strip()
