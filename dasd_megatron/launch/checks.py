"""Everything a launch checks before it submits anything, and the run folder it writes.

`resolve_recipe(name, overrides)` builds and overrides a recipe; `check_recipe(recipe, job=...)` runs the one
preflight (`dasd_megatron.preflight.preflight`: model, layout, the trainer's rules, paths, weights) at the recipe's
own world size, then the launch-only checks (the rollout placement against the nodes and against
`rollout.colocated`; the lengths against `model.seq_length` and the model's context). Both raise `ConfigError` with
the field, the rule and the fix.

`dasd submit` runs on a host whose file system may not be the job's: with `on_cluster=True` a missing absolute path
whose parent folder does not exist here either is only warned about (see `dasd_megatron.preflight`).
`write_run_files` puts the resolved `config.json` (a `RunConfig` as `dasd_megatron.config.from_dict` reads it) and
`launch.json` (recipe name, trainer resources, placement, job) into the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

from dasd_megatron.config import ConfigError, config_error, to_dict
from dasd_megatron.launch.spec import Recipe
from dasd_megatron.preflight import model_architecture, preflight

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
    """The model architecture, resolved as the trainer resolves it (offline when the recipe names a hub model with a
    shipped config)."""
    return model_architecture(recipe.config.model.hf_config)


def check_recipe(recipe: Recipe, te_available: Optional[bool] = None, on_cluster: bool = True,
                 job: str = "train") -> list[str]:
    """Validate the whole recipe for its world size and `job` ('train' or 'smoke'), before any job exists.

    te_available: whether Transformer Engine will exist where the job runs. None = assume yes on GPU recipes (the
    GPU image provides it; the job re-checks at start) and detect it here for CPU recipes.
    on_cluster: the job may run on another file system (see `dasd_megatron.preflight`); False for a job on this
    machine. Returns the preflight's warnings (paths it could not check here).
    """
    cfg, trainer = recipe.config, recipe.trainer
    if te_available is None:
        if trainer.accelerator == "gpu":
            te_available = True
        else:
            from dasd_megatron.model.specs import transformer_engine_available

            te_available = transformer_engine_available()
    warnings = preflight(cfg, trainer.world_size, job=job, te_available=te_available, need_data=job == "train",
                         on_cluster=on_cluster, cuda_available=trainer.accelerator == "gpu",
                         world_from=f"recipe {recipe.name!r}: world size {trainer.world_size} = trainer.nodes "
                                    f"{trainer.nodes} x trainer.procs_per_node {trainer.procs_per_node}")
    arch = architecture(recipe)
    recipe.placement.validate(trainer, arch)
    recipe.placement.check_rollout(cfg.rollout)
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
    return warnings


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
