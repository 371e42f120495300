"""The easy arithmetic set: generator, the shipped file, and loading it through `datasets` (GSM8K schema)."""

from __future__ import annotations

import json
import operator
import re

import pytest

from dasd_megatron.data import DataConfig, load_math_dataset
from dasd_megatron.data.synthetic import KINDS, easy_arithmetic, kind_of, study_split
from recipes.smollm2 import EASY_ARITHMETIC, EASY_ARITHMETIC_EVAL, EASY_ARITHMETIC_STUDY

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


def test_study_split_is_fresh_distinct_and_shipped():
    """The method study's held-out set: drawn with its own seed, no repeated question, none of the main job's
    evaluation questions (they chose its learning rate and step count), every kind present; the shipped file is the
    generator's output."""
    with open(EASY_ARITHMETIC_EVAL) as f:
        eval_questions = {json.loads(line)["question"] for line in f}
    with open(EASY_ARITHMETIC_STUDY) as f:
        shipped = [json.loads(line) for line in f]
    assert shipped == study_split(eval_questions), (f"{EASY_ARITHMETIC_STUDY} is stale. Fix: python -m "
                                                    f"dasd_megatron.data.synthetic {EASY_ARITHMETIC_STUDY} --study "
                                                    f"{EASY_ARITHMETIC_EVAL}")
    questions = [r["question"] for r in shipped]
    assert len(set(questions)) == len(questions) > 200 and not set(questions) & eval_questions
    assert {kind_of(q) for q in questions} == set(KINDS)


@pytest.mark.parametrize("question, kind", [("What is 3 + 4?", "add_1d"), ("What is 23 + 4?", "add_2d1d"),
                                            ("What is 23 - 4?", "sub_2d1d"), ("What is 3 * 4?", "mul_1d"),
                                            ("What is 23 * 4?", None), ("How many apples?", None)])
def test_kind_of(question, kind):
    assert kind_of(question) == kind
