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
"""

from __future__ import annotations

import argparse
import json
import random

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
    a = p.parse_args(argv)
    write_jsonl(a.out, easy_arithmetic(a.n, a.seed))
    print(f"wrote {a.n} rows to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
