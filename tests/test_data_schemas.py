"""Row mapping per schema, schema detection, field overrides, instruction-wrapper removal and bad-row handling,
on small files written by the tests."""

from __future__ import annotations

import json
import logging

import pytest

from dasd_megatron.data import (
    BadRowError,
    DataConfig,
    DataError,
    DataLoadError,
    detect_schema,
    load_math_dataset,
    strip_instructions,
)

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def _write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("text, expected", [
    (DAPO_PREFIX + "What is $2+3$?" + DAPO_SUFFIX, "What is $2+3$?"),
    (DAPO_PREFIX.upper() + "Find $x$." + DAPO_SUFFIX.replace('"', "“", 1).replace('"', "”"), "Find $x$."),
    ("Solve the following math problem step by step. The last line of your response should be of the form Answer: "
     "$ANSWER (without quotes) where $ANSWER is the answer to the problem.\n\nFind $w$.\n\nRemember to put your "
     'answer on its own line after "Answer:", and you do not need to use a \\boxed command.', "Find $w$."),
    ("Compute $1+1$.\n让我们一步一步地思考。请以“Answer: \\boxed{<final_answer>}”的格式输出最终答案。", "Compute $1+1$."),
    ("Find $y$. Let's think step by step and output the final answer within \\boxed{}.", "Find $y$."),
    ("Find $z$.\nPlease reason step by step, and put your final answer within \\boxed{}.", "Find $z$."),
    # look-alikes stay untouched
    ("Solve the following equation in positive numbers:\n$$x^2=4$$", "Solve the following equation in positive "
     "numbers:\n$$x^2=4$$"),
    ("Solve the following math problem: what is 1+1?\n\nIt is easy.", "Solve the following math problem: what is "
     "1+1?\n\nIt is easy."),
    ("Answer: the box holds 3 balls. How many are left?", "Answer: the box holds 3 balls. How many are left?"),
])
def test_strip_instructions(text, expected):
    out, changed = strip_instructions(text)
    assert out == expected and changed == (expected != text.strip())


@pytest.mark.parametrize("columns, schema", [
    (["data_source", "prompt", "reward_model", "extra_info"], "dapo"),
    (["question", "answer"], "gsm8k"),
    (["problem", "solution", "answer", "level"], "math"),
    (["problem", "solution", "type"], "minerva"),
    (["id", "question", "final_answer", "solution", "context"], "olympiadbench"),
    (["id", "problem", "answer"], "aime"),
])
def test_detect_schema(columns, schema):
    assert detect_schema(columns) == schema


def test_unknown_columns_name_the_fix(tmp_path):
    with pytest.raises(DataLoadError, match=r"cannot recognise the columns \['q', 'target'\].*data\.schema=plain"):
        load_math_dataset(DataConfig(source=_write(tmp_path, [{"q": "1+1?", "target": 2}])))


def test_plain_schema_and_dotted_overrides(tmp_path):
    src = _write(tmp_path, [{"q": {"text": "1+1?"}, "meta": {"gold": 2.0}, "worked": "1+1=2"}])
    cfg = DataConfig(source=src, schema="plain", problem_field="q.text", answer_field="meta.gold",
                     solution_field="worked", name="toy")
    ex = load_math_dataset(cfg)[0]
    assert (ex.problem, ex.answer, ex.solution, ex.source) == ("1+1?", "2", "1+1=2", "toy")
    with pytest.raises(DataLoadError, match=r"data\.answer_field='gold': no such column"):
        load_math_dataset(DataConfig(source=src, schema="plain", problem_field="q.text", answer_field="gold"))


def test_schema_specific_mapping(tmp_path):
    gsm = load_math_dataset(DataConfig(source=_write(tmp_path, [
        {"question": "How many?", "answer": "2*3=<<2*3=6>>6 apples\n#### 1,234"}], "g.jsonl")))[0]
    assert (gsm.answer, gsm.solution) == ("1234", "2*3=6 apples")
    minerva = load_math_dataset(DataConfig(source=_write(tmp_path, [
        {"problem": "P", "solution": r"first \boxed{1}, finally $\boxed{\frac{a}{b}}$ cm"}], "m.jsonl")))[0]
    assert minerva.answer == r"\frac{a}{b}" and minerva.solution.startswith("first")
    hendrycks = load_math_dataset(DataConfig(schema="math", source=_write(tmp_path, [
        {"problem": "P", "solution": r"so \boxed{7}", "level": "Level 1"}], "h.jsonl")))[0]
    assert hendrycks.answer == "7"
    ob = load_math_dataset(DataConfig(source=_write(tmp_path, [
        {"question": "Find n.", "context": "Let n be odd.", "final_answer": ["$1$", "$3$"],
         "solution": ["", "It is 1 or 3."]}], "o.jsonl")))[0]
    assert (ob.problem, ob.answer, ob.solution) == ("Let n be odd.\n\nFind n.", ("$1$", "$3$"), "It is 1 or 3.")
    aime = load_math_dataset(DataConfig(source=_write(tmp_path, [{"problem": "P", "answer": 33}], "a.jsonl")))[0]
    assert (aime.answer, aime.solution) == ("33", None)
    dapo = load_math_dataset(DataConfig(source=_write(tmp_path, [
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": DAPO_PREFIX + "Q?"}],
         "reward_model": {"ground_truth": "5"}}], "d.jsonl")))
    assert (dapo[0].problem, dapo.stripped_instructions) == ("Q?", 1)
    raw = load_math_dataset(DataConfig(source=_write(tmp_path, [
        {"prompt": [{"role": "user", "content": DAPO_PREFIX + "Q?"}], "reward_model": {"ground_truth": "5"}}],
        "d2.jsonl"), strip_instructions=False))[0]
    assert raw.problem.startswith("Solve the following math problem")


BAD_DAPO_ROWS = [
    {"prompt": [{"role": "user", "content": "Fine problem"}], "reward_model": {"ground_truth": "1"}},
    {"prompt": [{"role": "user", "content": "   "}], "reward_model": {"ground_truth": "1"}},
    {"prompt": [{"role": "user", "content": "No answer"}], "reward_model": {"ground_truth": ""}},
    {"prompt": [{"role": "user", "content": DAPO_PREFIX + DAPO_SUFFIX.strip()}], "reward_model": {"ground_truth": "1"}},
    {"prompt": [], "reward_model": {"ground_truth": "1"}},
    {"prompt": [{"role": "user", "content": "Also fine"}], "reward_model": {"ground_truth": "2"}},
]


def test_bad_rows_are_skipped_with_index_and_reason(tmp_path, caplog):
    src = _write(tmp_path, BAD_DAPO_ROWS)
    with caplog.at_level(logging.WARNING, logger="dasd_megatron.data.dataset"):
        ds = load_math_dataset(DataConfig(source=src))
    assert [ex.index for ex in ds] == [0, 5]
    assert [(b.index, b.field) for b in ds.bad_rows] == [(1, "prompt"), (2, "reward_model.ground_truth"),
                                                          (3, "prompt"), (4, "prompt")]
    assert "empty" in ds.bad_rows[0].reason and "missing or empty" in ds.bad_rows[1].reason
    assert "instruction wrappers" in ds.bad_rows[2].reason
    assert "row 2: reward_model.ground_truth: gold answer is missing or empty" in caplog.text
    assert "4 bad rows skipped in all" in caplog.text


def test_bad_row_error_mode_names_row_field_and_fix(tmp_path):
    src = _write(tmp_path, BAD_DAPO_ROWS)
    with pytest.raises(BadRowError, match=r"row 1: field 'prompt': problem is empty.*Fix: repair or remove row 1") as e:
        load_math_dataset(DataConfig(source=src, on_bad_row="error"))
    assert (e.value.index, e.value.field) == (1, "prompt")


def test_malformed_row_is_a_bad_row_not_a_crash(tmp_path):
    src = _write(tmp_path, [{"problem": "P", "answer": {"nested": "dict"}}, {"problem": ["not", "text"], "answer": "1"},
                            {"problem": "Q", "answer": "1"}])
    ds = load_math_dataset(DataConfig(source=src, schema="aime"))
    assert [ex.problem for ex in ds] == ["Q"]
    assert [(b.index, b.reason) for b in ds.bad_rows] == [(0, "gold answer is not text or a number (got dict)"),
                                                          (1, "problem is not text (got list)")]


def test_no_usable_row_is_an_error(tmp_path):
    src = _write(tmp_path, [{"problem": "", "answer": "1"}])
    with pytest.raises(DataError, match="no usable example among 1 rows"):
        load_math_dataset(DataConfig(source=src))
