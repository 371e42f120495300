"""The configuration error every sub-config raises, and the one format of its message.

A leaf module: it imports nothing from the package, so each component's config (`loss.config`, `train.config`,
`data.config`, `reward.config`, `model.hf_config`, the recipes) and the run config that gathers them
(`dasd_megatron.config`) can all import it without an import cycle.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value, the rule and the fix."""


def config_error(field_name: str, value: Any, rule: str, fix: str) -> ConfigError:
    """`ConfigError("<field>=<value!r>: <rule>. Fix: <fix>")`, the message format of every config check."""
    return ConfigError(f"{field_name}={value!r}: {rule}. Fix: {fix}")
