"""Everything a launch checks before it submits anything, and the run folder it writes.

`resolve_recipe(name, overrides)` builds and overrides a recipe; `check_recipe(recipe)` validates it against its own
world size (parallel layout vs. the model architecture, placement vs. GPUs, lengths vs. the model); both raise
`ConfigError` with the field, the rule and the fix. `write_run_files` puts the resolved `config.json` (a `RunConfig`
as `dasd_megatron.config.from_dict` reads it) and `launch.json` (recipe name, trainer resources, placement, job) into
the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

from dasd_megatron.config import ConfigError, config_error, to_dict
from dasd_megatron.launch.spec import Recipe

CONFIG_FILE = "config.json"
LAUNCH_FILE = "launch.json"


def resolve_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The registered recipe `name` with dotted overrides applied (not yet checked: see `check_recipe`)."""
    from recipes import get_recipe

    try:
        return get_recipe(name).with_overrides(list(overrides))
    except ConfigError:
        raise
    except ValueError as e:  # sub-configs that raise plain ValueError (e.g. DASDLossConfig)
        raise ConfigError(str(e)) from None


def architecture(recipe: Recipe):
    """The model architecture, read offline when the recipe names a hub model with a shipped config."""
    from dasd_megatron.model.hf_config import load_hf_architecture
    from recipes.models import resolve_hf_config

    return load_hf_architecture(resolve_hf_config(recipe.config.model.hf_config))


def check_recipe(recipe: Recipe, te_available: Optional[bool] = None) -> None:
    """Validate the whole recipe for its world size, before any job exists.

    te_available: whether Transformer Engine will exist where the job runs. None = assume yes on GPU recipes (the
    GPU image provides it; the job re-checks at start) and detect it here for CPU recipes.
    """
    cfg, trainer = recipe.config, recipe.trainer
    arch = architecture(recipe)
    if te_available is None:
        if trainer.accelerator == "gpu":
            te_available = True
        else:
            from dasd_megatron.model.specs import transformer_engine_available

            te_available = transformer_engine_available()
    try:
        cfg.validate_layout(trainer.world_size, arch, te_available=te_available)
    except ConfigError as e:
        raise ConfigError(f"{e} (recipe {recipe.name!r}: world size {trainer.world_size} = trainer.nodes "
                          f"{trainer.nodes} x trainer.procs_per_node {trainer.procs_per_node})") from None
    recipe.placement.validate(trainer, arch)
    t = cfg.train
    if t.micro_batch_tokens > cfg.model.seq_length:
        raise config_error("train.micro_batch_tokens", t.micro_batch_tokens,
                           f"a packed micro-batch must fit model.seq_length={cfg.model.seq_length}",
                           f"set model.seq_length >= {t.micro_batch_tokens} or lower train.micro_batch_tokens")
    longest = t.max_prompt_tokens + t.max_response_tokens
    if longest > arch.max_position_embeddings:
        raise config_error("train.max_response_tokens", t.max_response_tokens,
                           f"prompt + response = {longest} tokens exceeds the model's max_position_embeddings="
                           f"{arch.max_position_embeddings}", "shorten train.max_prompt_tokens/max_response_tokens")


def absolute_run_dir(recipe: Recipe, base: Optional[str] = None) -> Recipe:
    """The recipe with `run_dir` made absolute (relative to `base`, default the current directory): every node of a
    job reads and writes it, so it must name the same folder everywhere (a shared file system on clusters)."""
    run_dir = os.path.abspath(os.path.join(base or os.getcwd(), recipe.config.run_dir))
    return dataclasses.replace(recipe, config=dataclasses.replace(recipe.config, run_dir=run_dir))


def launch_record(recipe: Recipe, job: str, executor: str) -> dict:
    return {
        "recipe": recipe.name,
        "description": recipe.description,
        "job": job,
        "executor": executor,
        "trainer": dataclasses.asdict(recipe.trainer),
        "placement": dataclasses.asdict(recipe.placement),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_run_files(recipe: Recipe, *, job: str, executor: str) -> tuple[str, str]:
    """Write `config.json` and `launch.json` into the recipe's run folder; returns their paths."""
    run_dir = recipe.config.run_dir
    os.makedirs(run_dir, exist_ok=True)
    paths = []
    for name, data in ((CONFIG_FILE, to_dict(recipe.config)), (LAUNCH_FILE, launch_record(recipe, job, executor))):
        path = os.path.join(run_dir, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def read_launch_record(run_dir: str) -> dict:
    path = os.path.join(run_dir, LAUNCH_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"run_dir={run_dir!r}: no {LAUNCH_FILE} there. Fix: launch through `dasd submit`, which "
                          "writes it, or point --run-dir at the job's run folder") from None
