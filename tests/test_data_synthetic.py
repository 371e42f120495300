"""The easy arithmetic set: generator, the shipped file, and loading it through `datasets` (GSM8K schema)."""

from __future__ import annotations

import json
import operator
import re

import pytest

from dasd_megatron.data import DataConfig, load_math_dataset
from dasd_megatron.data.synthetic import easy_arithmetic
from recipes.smollm2 import EASY_ARITHMETIC, EASY_ARITHMETIC_EVAL

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_Q = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")


@pytest.mark.parametrize("path, n, seed", [(EASY_ARITHMETIC, 2000, 0), (EASY_ARITHMETIC_EVAL, 128, 1)])
def test_shipped_files_are_the_generator_output(path, n, seed):
    with open(path) as f:
        shipped = [json.loads(line) for line in f]
    assert shipped == easy_arithmetic(n, seed), (f"{path} is stale. Fix: python -m dasd_megatron.data.synthetic "
                                                 f"{path} --n {n} --seed {seed}")


def test_rows_are_right_and_mixed():
    rows = easy_arithmetic(400, seed=3)
    kinds = {"+": 0, "-": 0, "*": 0}
    for r in rows:
        a, op, b = _Q.match(r["question"]).groups()
        value = _OPS[op](int(a), int(b))          # recomputed here, not by the generator
        assert value >= 0 and r["answer"] == f"{a} {op} {b} = {value}\n#### {value}"
        kinds[op] += 1
    assert kinds == {"+": 200, "-": 100, "*": 100}
    assert easy_arithmetic(400, seed=3) == rows and easy_arithmetic(400, seed=4) != rows
    with pytest.raises(ValueError, match="positive integer"):
        easy_arithmetic(0)


def test_loads_as_gsm8k_with_answer_and_worked_line():
    data = load_math_dataset(DataConfig(source=EASY_ARITHMETIC, schema="gsm8k", shuffle=False))
    assert len(data.examples) == 2000 and not data.bad_rows
    ex = data.examples[0]
    a, op, b = _Q.match(ex.problem).groups()
    value = _OPS[op](int(a), int(b))
    assert ex.answer == str(value) and ex.solution == f"{a} {op} {b} = {value}"
