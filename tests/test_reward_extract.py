"""Answer extraction and the strings handed to math-verify (in-process; no worker pool)."""

from __future__ import annotations

import pytest

from dasd_megatron.config import ConfigError
from dasd_megatron.reward import (
    RewardConfig,
    answer_line,
    extract_answer,
    last_boxed,
    math_verify_check,
    normalize_golds,
    to_parse_input,
)


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{\sqrt{a_{1}}}{b^{2}}}", r"\frac{\sqrt{a_{1}}}{b^{2}}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                # escaped braces do not close the box
    (r"\boxed {  7 }", "7"),
    (r"$\boxed 5$ and more", "5"),
    (r"\fbox{12}", "12"),
    (r"the time is $\framebox{204}$ minutes", "204"),
    (r"\framebox[2cm][c]{x+1}", "x+1"),
    ("no box here", None),
    (r"\boxed{3} ... \boxed{\frac{1}{", None),       # last box truncated: the final answer is missing
    (r"\boxedsymbol{3}", None),                        # not a box command
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Let me think.\nAnswer: 34", "34"),
    ("Answer: 1\nwait, no.\nAnswer: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("**Final Answer:** 12", "12"),
    ("## Answer：-3", "-3"),
    ("The answer is 5", None),
    ("Answer:   \n", None),
])
def test_answer_line(text, expected):
    assert answer_line(text) == expected


def test_extract_answer_prefers_box_and_fallback_is_switchable():
    assert extract_answer("Answer: 3\n\\boxed{4}") == "4"
    assert extract_answer("Answer: 3") == "3"
    assert extract_answer("Answer: 3", answer_line_fallback=False) is None
    assert extract_answer(r"\boxed{}") is None
    assert extract_answer("Answer: 7 \\boxed{8") is None  # a truncated box wins over the answer line


def test_parse_input_and_golds():
    assert to_parse_input("4.5e33") == r"$\boxed{4.5 \times 10^{33}}$"
    assert to_parse_input("$69$,$84$") == "$69$,$84$"
    assert to_parse_input(r"x+$ $y") == r"$\boxed{x+ y}$"
    assert to_parse_input("$221,$8$") == r"$\boxed{221,8}$"  # unbalanced delimiters (an OlympiadBench gold)
    assert to_parse_input(r"\$36") == r"$\boxed{\$36}$"
    assert normalize_golds(7) == ("7",)
    assert normalize_golds(["$1$", " ", "2"]) == ("$1$", "2")
    with pytest.raises(ValueError, match="empty"):
        normalize_golds(["", None])


@pytest.mark.parametrize("pred, golds, status", [
    (r"\frac{1}{2}", ("0.5",), "correct"),
    ("2", ("3",), "incorrect"),
    (r"4.5 \times 10^{33}", ("4.5e33",), "correct"),
    (r"(3, \frac{\pi}{2})", (r"\left( 3, \frac{\pi}{2} \right)",), "correct"),
    ("5", ("$4$", "$5$"), "correct"),                 # list of acceptable answers: any match
    (r"\text{}", ("1",), "unparseable"),
])
def test_math_verify_check_in_process(pred, golds, status):
    assert math_verify_check(pred, golds) == status


def test_reward_config_validation():
    with pytest.raises(ConfigError, match=r"reward\.num_workers=0: must be an integer >= 1"):
        RewardConfig(num_workers=0)
    with pytest.raises(ConfigError, match=r"reward\.timeout_s=-1"):
        RewardConfig(timeout_s=-1)
    with pytest.raises(ConfigError, match=r"reward\.correct_score=nan"):
        RewardConfig(correct_score=float("nan"))
    with pytest.raises(ConfigError, match=r"reward\.start_method='threads'.*Fix: use spawn"):
        RewardConfig(start_method="threads")
    with pytest.raises(ConfigError, match=r"reward\.worker_memory_mb=64: must be an integer >= 256 or None"):
        RewardConfig(worker_memory_mb=64)
    assert RewardConfig(timeout_s=0.25).score_of("timeout") == 0.0


@pytest.mark.parametrize("text, expected", [
    ("7 + 5 = 12.", "12"),
    ("It is 1,234 apples", "1234"),
    ("x = -3.5", "-3.5"),
    ("about 3/4 of it", "3/4"),
    ("step2 gives 7", "7"),           # digits glued to a word are not a number
    ("12,345,678.5 in all", "12345678.5"),
    ("nothing numeric", None),
])
def test_last_number(text, expected):
    from dasd_megatron.reward import last_number

    assert last_number(text) == expected


def test_last_number_fallback_is_off_by_default_and_comes_last():
    assert extract_answer("7 + 5 = 12") is None
    assert extract_answer("7 + 5 = 12", last_number_fallback=True) == "12"
    assert extract_answer("Answer: 11\nthen 12", last_number_fallback=True) == "11"      # the Answer: line first
    assert extract_answer(r"\boxed{10} or 12", last_number_fallback=True) == "10"         # a box before either
    assert extract_answer(r"12 then \boxed{10", last_number_fallback=True) is None        # a truncated box: missing
    assert extract_answer("no digits", last_number_fallback=True) is None


def test_package_exports_each_name_from_the_module_that_defines_it():
    """`dasd_megatron.reward` re-exports the public API its callers use; each name lives in one module of the
    package (extract, verify, pool, result, config)."""
    import importlib

    import dasd_megatron.reward as reward

    homes = {
        "extract": {"answer_line", "extract_answer", "last_boxed", "last_number", "normalize_golds"},
        "verify": {"math_verify_check", "to_parse_input"},
        "pool": {"RewardScorer"},
        "result": {"STATUSES", "RewardResult", "summarize"},
        "config": {"RewardConfig"},
    }
    assert set(reward.__all__) == set().union(*homes.values())
    for module, names in homes.items():
        home = importlib.import_module(f"dasd_megatron.reward.{module}")
        for name in names:
            obj = getattr(reward, name)
            assert getattr(home, name) is obj, (name, module)
            assert getattr(obj, "__module__", home.__name__) == home.__name__, (name, obj.__module__)
    assert reward.STATUSES == ("correct", "incorrect", "unparseable", "timeout", "error")
