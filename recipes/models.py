"""Models the recipes train, and offline access to their architecture.

Recipes name a model by its Hugging Face hub id (`Qwen/Qwen3-4B`): with network (or a filled HF cache) that is all a
user needs. For offline validation — CPU unit tests, `dasd submit --dryrun` on a login node — the repository ships
each model's `config.json` (shapes only, no weights) under `recipes/hf_configs/<model name>/`, copied from the
published configs. `resolve_hf_config` turns a hub id or a path into a local folder holding a config.json.
"""

from __future__ import annotations

import os
from pathlib import Path

from dasd_megatron.errors import ConfigError

HF_CONFIG_DIR = Path(__file__).resolve().parent / "hf_configs"

QWEN3_1P7B = "Qwen/Qwen3-1.7B"
QWEN3_4B = "Qwen/Qwen3-4B"
QWEN3_8B = "Qwen/Qwen3-8B"
TINY_QWEN3 = str(HF_CONFIG_DIR / "tiny-qwen3")
"""A 4-layer, 64-wide Qwen3 shape (vocabulary 1024) with random weights: the CPU recipes' model."""


def shipped_config_dir(hub_id: str) -> Path | None:
    """The shipped config folder for a hub id (`Qwen/Qwen3-4B` -> hf_configs/Qwen3-4B), or None."""
    d = HF_CONFIG_DIR / hub_id.rstrip("/").split("/")[-1]
    return d if (d / "config.json").is_file() else None


def resolve_hf_config(name_or_path: str) -> str:
    """A local folder (or config.json file) for `model.hf_config`: an existing path as is, else the shipped shape."""
    if name_or_path and os.path.exists(name_or_path):
        return name_or_path
    shipped = shipped_config_dir(name_or_path) if name_or_path else None
    if shipped is not None:
        return str(shipped)
    known = sorted(p.name for p in HF_CONFIG_DIR.iterdir() if (p / "config.json").is_file())
    raise ConfigError(
        f"model.hf_config={name_or_path!r}: neither a local path nor a model with a shipped config (shipped: {known}). "
        "Fix: point model.hf_config at a Hugging Face model folder, or add recipes/hf_configs/<name>/config.json"
    )
