"""An easy arithmetic data set in GSM8K's schema, for runs that must show learning on a small model in minutes.

`easy_arithmetic(n, seed)` draws `n` problems from four kinds, in equal shares:

- `a + b`, one-digit operands (SmolLM2-135M-Instruct answers about half right at T=0.7);
- `a + b`, a two-digit and a one-digit operand;
- `a - b`, a two-digit minus a one-digit operand, non-negative result;
- `a * b`, one-digit operands (2-9).

Each row is `{"question": "What is 23 + 7?", "answer": "23 + 7 = 30\\n#### 30"}`: the GSM8K layout, so the loader's
`gsm8k` schema takes the answer after `####` and the worked line before it as the teacher's reference solution.
The shipped files are `python -m dasd_megatron.data.synthetic recipes/data/easy_arithmetic.jsonl` (2000 rows,
seed 0: training) and `... recipes/data/easy_arithmetic_eval.jsonl --n 128 --seed 1` (evaluation: the same
distribution, drawn apart; with so few one-digit problems some also occur in training); a test checks that they
stay equal to the generator's output.

The method study's held-out set (`dasd sweep`, docs/method_study.md) is `study_split()`: 400 rows drawn with seed
2026 (used for nothing else), repeated questions and every question of the main job's evaluation file removed (that
file chose the main job's learning rate and step count, so it is not a fair test of them): shipped as
`recipes/data/easy_arithmetic_study.jsonl` (`python -m dasd_megatron.data.synthetic OUT --study EVAL_FILE`). `kind_of`
names a question's kind, for accuracy by kind.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from typing import Iterable, Optional

KINDS = ("add_1d", "add_2d1d", "sub_2d1d", "mul_1d")


def _draw(kind: str, rng: random.Random) -> tuple[int, str, int]:
    if kind == "add_1d":
        return rng.randint(1, 9), "+", rng.randint(1, 9)
    if kind == "add_2d1d":
        return rng.randint(10, 99), "+", rng.randint(1, 9)
    if kind == "sub_2d1d":
        return rng.randint(10, 99), "-", rng.randint(1, 9)
    if kind == "mul_1d":
        return rng.randint(2, 9), "*", rng.randint(2, 9)
    raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")


_QUESTION = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")
STUDY_SEED = 2026
STUDY_DRAWN = 400


def kind_of(question: str) -> Optional[str]:
    """The kind (one of `KINDS`) of an easy-arithmetic question, None for any other text."""
    m = _QUESTION.match(question.strip())
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    if op == "*" and a < 10 and b < 10:
        return "mul_1d"
    if op == "+" and a < 10 and b < 10:
        return "add_1d"
    if op == "+" and 10 <= a < 100 and b < 10:
        return "add_2d1d"
    if op == "-" and 10 <= a < 100 and b < 10:
        return "sub_2d1d"
    return None


def study_split(exclude_questions: Iterable[str], n: int = STUDY_DRAWN, seed: int = STUDY_SEED) -> list[dict]:
    """The method study's held-out rows: `easy_arithmetic(n, seed)` without repeated questions and without
    `exclude_questions` (the main job's evaluation set)."""
    seen = set(exclude_questions)
    out = []
    for row in easy_arithmetic(n, seed):
        if row["question"] not in seen:
            seen.add(row["question"])
            out.append(row)
    return out


def _value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def easy_arithmetic(n: int = 2000, seed: int = 0) -> list[dict]:
    """`n` rows (question, answer) in GSM8K's layout, the kinds in turn, seeded. Problems may repeat (there are only
    81 one-digit sums and 64 one-digit products)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: must be a positive integer")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, op, b = _draw(KINDS[i % len(KINDS)], rng)
        c = _value(a, op, b)
        rows.append({"question": f"What is {a} {op} {b}?", "answer": f"{a} {op} {b} = {c}\n#### {c}"})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the .jsonl file to write")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--study", metavar="EVAL_JSONL", help="write the method study's split instead (`study_split`), "
                                                         "without the questions of this evaluation file")
    a = p.parse_args(argv)
    if a.study:
        with open(a.study) as f:
            rows = study_split(json.loads(line)["question"] for line in f if line.strip())
    else:
        rows = easy_arithmetic(a.n, a.seed)
    write_jsonl(a.out, rows)
    print(f"wrote {len(rows)} rows to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
