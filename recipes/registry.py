"""The recipe registry: `register` a zero-argument function under a name, `get_recipe(name)`, `list_recipes()`."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

from dasd_megatron.errors import ConfigError
from dasd_megatron.launch.spec import Recipe

_RECIPES: dict[str, Callable[[], Recipe]] = {}


def register(name: str, fn: Callable[[], Recipe]) -> None:
    """Register `fn` (no arguments, returns a Recipe) as `name`; names are unique."""
    if name in _RECIPES:
        raise ValueError(f"recipe {name!r} is registered twice")
    _RECIPES[name] = fn


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: str) -> Recipe:
    """Build the named recipe (a fresh Recipe; its `name` is the registered name)."""
    if name not in _RECIPES:
        close = difflib.get_close_matches(name, _RECIPES, n=3, cutoff=0.5)
        hint = f"did you mean {close}? " if close else ""
        raise ConfigError(f"recipe {name!r} is not registered. Fix: {hint}use one of {list_recipes()}")
    return dataclasses.replace(_RECIPES[name](), name=name)
