"""Everything a launch checks before it submits anything, and the run folder it writes.

`resolve_recipe(name, overrides)` builds and overrides a recipe; `check_recipe(recipe)` validates it against its own
world size (parallel layout vs. the model architecture, placement vs. GPUs, lengths vs. the model) and checks its
paths; both raise `ConfigError` with the field, the rule and the fix.

`check_paths(cfg)` is the one preflight of a run's input paths, run by `dasd train` (before torchrun starts any
process), `dasd validate` and `dasd submit` (through `check_recipe`): `data.source`, `train.eval_source` (when
`train.eval_interval > 0`) and `model.hf_config`. A value that looks like a local path (starts with `/`, `.` or `~`,
ends in a data-file extension, or whose first folder exists here, like `data/` of `data/trian.jsonl`) must exist
(a data folder must hold the split's files, a model folder a config.json). Anything else is a Hugging Face hub id:
its spelling is checked, and with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set it must be in the local cache (or, for a
model, have a shipped config or a packaged offline copy); nothing goes to the network. With `data.on_bad_row=error`,
a local JSON Lines file is also scanned for malformed lines, which would stop every rank at start.

`dasd submit` runs on a host whose file system may not be the job's: there (`on_cluster=True`) a missing absolute
path whose parent folder does not exist here either is only warned about (it may live on the cluster's file system);
a missing path whose parent folder exists here, and a missing relative path (relative to the submit directory, which
the job's code is shipped from), are errors as everywhere else. `write_run_files` puts the resolved `config.json` (a `RunConfig`
as `dasd_megatron.config.from_dict` reads it) and `launch.json` (recipe name, trainer resources, placement, job) into
the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from dasd_megatron.config import ConfigError, RunConfig, config_error, to_dict
from dasd_megatron.launch.spec import Recipe

log = logging.getLogger(__name__)

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


def check_recipe(recipe: Recipe, te_available: Optional[bool] = None, on_cluster: bool = True) -> None:
    """Validate the whole recipe for its world size, before any job exists.

    te_available: whether Transformer Engine will exist where the job runs. None = assume yes on GPU recipes (the
    GPU image provides it; the job re-checks at start) and detect it here for CPU recipes.
    on_cluster: the job may run on another file system (see `check_paths`); False for a job on this machine.
    """
    cfg, trainer = recipe.config, recipe.trainer
    check_paths(cfg, need_data=False, on_cluster=on_cluster)
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


_TRUE = ("1", "ON", "YES", "TRUE")


def _offline(*names: str) -> Optional[str]:
    """`NAME=value` of the first of the environment variables `names` that is set, when it switches the hub off."""
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            return f"{name}={value}" if value.upper() in _TRUE else None
    return None


def _looks_local(value: str) -> bool:
    """A local path rather than a hub id: see the module docstring (`data.loading.is_local`, or a first folder that
    exists here)."""
    from dasd_megatron.data.loading import is_local

    first = value.split("/", 1)[0]
    return is_local(value) or ("/" in value and os.path.isdir(first))


def _missing(field: str, value: str, what: str, fix: str, on_cluster: bool, warnings: list[str]) -> None:
    """A local path that does not exist: an error, or (`on_cluster`, absolute, parent folder not here) a warning."""
    path = Path(os.path.expanduser(value))
    if on_cluster and path.is_absolute() and not path.parent.exists():
        msg = (f"{field}={value!r}: not on this machine (nor its folder {str(path.parent)!r}), so it cannot be checked "
               "here; the job fails at start unless it exists where the job runs (the cluster's file system)")
        log.warning(msg)
        warnings.append(msg)
        return
    where = "" if path.is_absolute() else f" (relative paths are resolved from {os.getcwd()})"
    raise config_error(field, value, f"no such {what}{where}", fix)


def _check_hub_id(field: str, value: str, kind: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise config_error(field, value, "neither an existing local path nor a Hugging Face hub id "
                           f"({str(e).split('. Use')[0]})",
                           f"give a local path, or a {kind} hub id such as "
                           f"{'openai/gsm8k' if kind == 'data set' else 'Qwen/Qwen3-4B'}") from None


def _hub_dataset_cached(repo_id: str, cache_dir: Optional[str]) -> bool:
    """Whether `datasets` has anything for `repo_id` offline: its own cache folder (named as `datasets` names it,
    `openai___gsm8k`, `BytedTsinghua-SIA___dapo-math-17k`), or the hub cache's snapshot."""
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants

    datasets_cache = cache_dir or os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    parts = repo_id.split("/")
    cached = "___".join(parts[:-1] + [camelcase_to_snakecase(parts[-1])])
    hub_dir = os.path.join(constants.HF_HUB_CACHE, "datasets--" + "--".join(parts))
    return os.path.isdir(os.path.join(os.path.expanduser(datasets_cache), cached)) or os.path.isdir(hub_dir)


def _check_data(field: str, value: str, split_field: str, data_cfg, on_cluster: bool, warnings: list[str]) -> None:
    from dasd_megatron.data.errors import DataError
    from dasd_megatron.data.loading import data_files, locate_bad_lines

    if not _looks_local(value):
        _check_hub_id(field, value, "data set")
        off = _offline("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
        if off and not _hub_dataset_cached(value, data_cfg.cache_dir):
            raise config_error(field, value, f"a Hugging Face hub data set, but {off} and it is not in the local "
                               "cache", "use a local file (a .jsonl/.parquet file or a folder of them), or run where "
                               "the hub is reachable with the offline variable unset")
        return
    if not os.path.exists(os.path.expanduser(value)):
        _missing(field, value, "file or folder", "check the path, or give a hub id such as openai/gsm8k",
                 on_cluster, warnings)
        return
    try:
        fmt, files = data_files(value, data_cfg.split, field=field, split_field=split_field)
        if fmt == "json" and data_cfg.on_bad_row == "error":
            locate_bad_lines(data_cfg, files, field=field)
    except DataError as e:
        raise ConfigError(str(e)) from None


def _check_model(value: str, on_cluster: bool, warnings: list[str]) -> None:
    field = "model.hf_config"
    if not value:
        raise config_error(field, value, "no model given", "set model.hf_config to a Hugging Face model folder or a "
                           "hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")
    path = os.path.expanduser(value)
    if _looks_local(value):
        if not os.path.exists(path):
            _missing(field, value, "folder or config.json", "point it at a Hugging Face model folder (with "
                     "config.json), or give a hub id such as Qwen/Qwen3-4B", on_cluster, warnings)
        elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise config_error(field, value, "the folder has no config.json", "point it at a Hugging Face model "
                               "folder (config.json, weights, tokenizer)")
        return
    _check_hub_id(field, value, "model")
    off = _offline("HF_HUB_OFFLINE")
    if off:
        from huggingface_hub import try_to_load_from_cache

        from dasd_megatron.model.pretrained import OFFLINE_SOURCES
        from recipes.models import shipped_config_dir

        cached = isinstance(try_to_load_from_cache(value, "config.json"), str)
        if not (cached or value in OFFLINE_SOURCES or shipped_config_dir(value) is not None):
            raise config_error(field, value, f"a Hugging Face hub model, but {off} and it is not in the local cache "
                               "(nor shipped under recipes/hf_configs, nor packaged for offline use)",
                               "download or convert the model and point model.hf_config at its folder, or unset "
                               "the offline variable where the hub is reachable")


def check_paths(cfg: RunConfig, *, need_data: bool = True, on_cluster: bool = False) -> list[str]:
    """Check every input path of the run before any process starts (see the module docstring).

    need_data: `data.source` must be set (a training run); otherwise an empty one is not checked (`dasd validate` of
    a layout, smoke jobs). on_cluster: the paths are the job's, on a file system that may not be this one (`dasd
    submit`). Raises `ConfigError` (field, value, fix); returns the warnings about paths it could not check here.
    """
    warnings: list[str] = []
    data = cfg.data
    if data.source or need_data:
        if not data.source:
            raise config_error("data.source", data.source, "no data set given", "set data.source to a local "
                               ".jsonl/.parquet file or folder, or a hub id such as BytedTsinghua-SIA/DAPO-Math-17k")
        _check_data("data.source", data.source, "data.split", data, on_cluster, warnings)
    t = cfg.train
    if t.eval_interval > 0 and t.eval_source:
        eval_cfg = dataclasses.replace(data, source=t.eval_source, split=t.eval_split, limit=t.eval_limit)
        _check_data("train.eval_source", t.eval_source, "train.eval_split", eval_cfg, on_cluster, warnings)
    _check_model(cfg.model.hf_config, on_cluster, warnings)
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
