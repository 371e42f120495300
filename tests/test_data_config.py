"""`DataConfig` / `PromptConfig` validation (dotted field, value, rule, fix) and dotted overrides."""

from __future__ import annotations

import pytest

from dasd_megatron.config import ConfigError, apply_overrides, from_dict, to_dict
from dasd_megatron.data import DataConfig, PromptConfig


@pytest.mark.parametrize("kwargs, match", [
    ({"schema": "csv"}, r"data\.schema='csv': unknown schema. Fix: use one of"),
    ({"schema": "plain", "problem_field": "q"}, r"data\.schema='plain': .*needs data\.problem_field and "
                                                r"data\.answer_field"),
    ({"on_bad_row": "warn"}, r"data\.on_bad_row='warn': unknown policy. Fix: use skip or error"),
    ({"max_prompt_tokens": 0}, r"data\.max_prompt_tokens=0: must be a positive integer or None"),
    ({"limit": -5}, r"data\.limit=-5"),
    ({"seed": -1}, r"data\.seed=-1: must be an integer >= 0"),
    ({"split": ""}, r"data\.split='': must not be empty"),
])
def test_data_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"chat_template": "jinja"}, r"data\.prompt\.chat_template='jinja': unknown mode"),
    ({"teacher_context": ("solution", "oracle")}, r"data\.prompt\.teacher_context=\('solution', 'oracle'\)"),
    ({"teacher_context": ("solution", "solution")}, r"each at most once"),
    ({"max_teacher_prompt_tokens": 0}, r"data\.prompt\.max_teacher_prompt_tokens=0"),
])
def test_prompt_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PromptConfig(**kwargs)


def test_overrides_and_round_trip():
    cfg = apply_overrides(DataConfig(), [
        "source=/data/dapo.parquet", "schema=dapo", "max_prompt_tokens=1024", "dedupe=true", "limit=null",
        "prompt.teacher_context=sibling,answer_hint", "prompt.enable_thinking=false",
    ])
    assert (cfg.source, cfg.schema, cfg.max_prompt_tokens, cfg.dedupe, cfg.limit) == (
        "/data/dapo.parquet", "dapo", 1024, True, None)
    assert cfg.prompt.teacher_context == ("sibling", "answer_hint") and cfg.prompt.enable_thinking is False
    assert from_dict(DataConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"data\.prompt\.teacher_context"):
        apply_overrides(DataConfig(), ["prompt.teacher_context=solution,guess"])
