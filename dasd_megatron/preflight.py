"""The one preflight every entry point runs before any process starts: `preflight(cfg, world_size, ...)`.

`dasd train` (before torchrun starts any rank, with world size `--nproc`), `dasd validate`, `dasd submit` (through
`launch.checks.check_recipe`, at the recipe's `trainer.world_size`, dry runs included), `dasd smoke` and the trainer
itself at start (`train.loop.Trainer`) call this same function, so a config that the trainer would refuse at start
is refused by every one of them, in one line (`ConfigError`: the field, the value, the rule and the fix; the CLI
prints it and exits with status 2). What it checks, in this order (configuration facts before file-system facts):

1. `model.hf_config` as a path (`check_paths`' model part: an existing folder with config.json, or a hub id).
2. The architecture, read as the trainer reads it (`model_architecture`: a local folder or config.json; for a hub id
   the HF cache, then the config shipped under recipes/hf_configs, then the hub).
3. The parallel layout against the world size and the architecture (`RunConfig.validate_layout`).
4. job 'train' only: the DASD step's own rules (`train.dasd_step.check_supported`: `train.updates_per_batch` vs. the
   rollouts per data-parallel rank, an LR decay that ends after the warm-up, ...).
5. job 'train' only: the input data (`check_paths`: `data.source`, and `train.eval_source` when evaluating).
6. job 'train' only, `need_weights`: a local model folder holds what the trainer loads from it (`check_model_files`).

Model folders without weights. The trainer never initialises a model at random: it resolves `model.hf_config` to a
folder with weights (`train.loop`: a folder without `*.safetensors`/`*.bin` is a ConfigError), imports its
safetensors (`model.hf_import.weight_files`: `model.safetensors` or `model.safetensors.index.json`), loads its
tokenizer, and starts the built-in rollout server from the same folder (`from_pretrained`). A folder holding only
config.json is therefore refused for training, before any process starts, with a message naming `model.hf_config`
and the fix. Random weights from a config-only folder are a supported feature of `dasd smoke` (its default model is
such a folder, and `dasd submit --job smoke` passes the recipe's shipped config folder) and of the unit tests that
build megatron models directly: job 'smoke' checks neither data nor weights. The tiny CPU recipes
(`tiny_qwen3_*_cpu`, model `recipes/hf_configs/tiny-qwen3`, a config only) are smoke recipes for that reason: as
train jobs they are refused here, exactly as the trainer would refuse them after the queue wait. A hub id is not
checked for weights (offline, nothing can be: the trainer downloads it, finds it in the HF cache or materialises a
packaged offline copy, `model.pretrained`). `dasd validate` checks the weights of a model it is given, not of the
tiny config it writes when `model.hf_config` is empty (a layout check).

Launch-only checks stay in `launch.checks.check_recipe`, because the trainer itself does not make them: the rollout
placement against the nodes and against `rollout.colocated`, and the recipe's lengths against `model.seq_length` and
the model's context.

`check_paths(cfg)` is the preflight of a run's input paths: `data.source`, `train.eval_source` (when
`train.eval_interval > 0`) and `model.hf_config`. A value that looks like a local path (starts with `/`, `.` or `~`,
ends in a data-file extension, or whose first folder exists here, like `data/` of `data/trian.jsonl`) must exist
(a data folder must hold the split's files, a model folder a config.json). Anything else is a Hugging Face hub id:
its spelling is checked, and with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set it must be in the local cache (or, for a
model, have a shipped config or a packaged offline copy; for a data set checked `on_cluster`, a warning: the job's
environment decides); nothing goes to the network. With `data.on_bad_row=error`,
a local JSON Lines file is also scanned for malformed lines, which would stop every rank at start.

`dasd submit` runs on a host whose file system may not be the job's: there (`on_cluster=True`) a missing absolute
path whose parent folder does not exist here either is only warned about (it may live on the cluster's file system);
a missing path whose parent folder exists here, and a missing relative path (relative to the submit directory, which
the job's code is shipped from), are errors as everywhere else. Those warnings are what `preflight` returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

from dasd_megatron.config import ConfigError, RunConfig, config_error

log = logging.getLogger(__name__)

JOBS = ("train", "smoke")
"""What the checked process will run: the DASD trainer, or `dasd smoke` (random data, random weights)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
"""Any one of these lets `AutoTokenizer.from_pretrained(folder)` find a tokenizer."""


def preflight(cfg: RunConfig, world_size: int, *, job: str = "train", arch=None, te_available: Optional[bool] = None,
              need_data: bool = True, need_weights: bool = True, on_cluster: bool = False,
              world_from: str = "", cuda_available: Optional[bool] = None) -> list[str]:
    """Every check the trainer (job 'train') or `dasd smoke` (job 'smoke') makes before its first step that can be
    made offline, for `world_size` processes (see the module docstring). Raises `ConfigError`; returns the warnings
    about paths it could not check here (`on_cluster`).

    arch: the model architecture when the caller has it (else read from `model.hf_config`). te_available: whether
    Transformer Engine exists where the job runs (None: detect it here). need_data: `data.source` must be set
    (otherwise a given one is still checked; `dasd validate`). need_weights: a local model folder must hold
    safetensors weights and a tokenizer (job 'train'). on_cluster: the paths are the job's, on a file system that
    may not be this one (`dasd submit`). world_from: how the world size was chosen, added to layout errors.
    cuda_available: whether the job computes on CUDA devices (None: detect it here); decides whether
    `model.fused_kernels=triton` can run.
    """
    if job not in JOBS:
        raise ConfigError(f"job={job!r}: unknown job kind. Fix: use one of {list(JOBS)}")
    warnings: list[str] = []
    check_model_path(cfg.model.hf_config, on_cluster=on_cluster, warnings=warnings)
    if arch is None:
        arch = model_architecture(cfg.model.hf_config)
    try:
        cfg.validate_layout(world_size, arch, te_available=te_available)
        if job == "train":
            from dasd_megatron.train.dasd_step import check_supported  # torch: only once a config got this far

            check_supported(cfg, world_size)
        from dasd_megatron.kernels import resolve_fused_kernels

        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        resolve_fused_kernels(cfg.model.fused_kernels, "cuda" if cuda_available else "cpu")
    except ConfigError as e:
        if world_from:
            raise ConfigError(f"{e} ({world_from})") from None
        raise
    if job == "train":
        warnings += check_data_paths(cfg, need_data=need_data, on_cluster=on_cluster)
        if need_weights:
            check_model_files(cfg.model.hf_config)
    return warnings


def model_architecture(hf_config: str):
    """The architecture of `model.hf_config`, resolved as the trainer resolves it (`load_hf_architecture`: a local
    folder or config.json; a hub id from the HF cache, the configs shipped under recipes/hf_configs, or the hub)."""
    from dasd_megatron.model.hf_config import load_hf_architecture

    return load_hf_architecture(hf_config)


def check_model_files(hf_config: str) -> None:
    """A local `model.hf_config` holds what training loads from it: safetensors weights (`model.safetensors` or a
    complete `model.safetensors.index.json`) and a tokenizer. Hub ids and paths that are not here pass (see the module
    docstring). Raises `ConfigError` naming `model.hf_config` and the fix."""
    from dasd_megatron.model.hf_files import WEIGHT_SUFFIXES
    from dasd_megatron.model.hf_import import INDEX_FILE, weight_files
    from dasd_megatron.model.hf_mapping import ConversionError

    field = "model.hf_config"
    path = os.path.expanduser(hf_config)
    if not hf_config or not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise config_error(field, hf_config, "a config.json file, but training starts from the weights and tokenizer "
                           "of a Hugging Face model folder", "point model.hf_config at the folder, with its weights "
                           "(*.safetensors) and tokenizer")
    names = os.listdir(path)
    if INDEX_FILE not in names and not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise config_error(field, hf_config, "the folder has a config.json but no weights, and `dasd train` starts "
                           "the policy and the rollout servers from the model's weights (it never initialises a model "
                           "at random)", "point model.hf_config at a Hugging Face model folder with safetensors "
                           "weights and a tokenizer (one written by save_pretrained, or a hub id such as "
                           "HuggingFaceTB/SmolLM2-135M-Instruct); a folder with only config.json is for `dasd smoke` "
                           "(random weights)")
    try:
        weight_files(path)  # what the trainer's weight import reads: model.safetensors, or a complete index
    except ConversionError as e:
        raise ConfigError(f"{field}={hf_config!r}: {e}") from None
    if not any(n in TOKENIZER_FILES for n in names):
        raise config_error(field, hf_config, f"the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), "
                           "which the trainer and the rollout servers load from it", "copy the model's tokenizer "
                           "files into the folder (tokenizer.save_pretrained)")


# -- input paths -------------------------------------------------------------------------------------------------------

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
            if on_cluster:  # the job's environment, not this host's, decides whether the hub is reachable there
                warnings.append(f"{field}={value!r}: a hub data set that is not in this host's cache ({off} here); "
                                "the job must reach the hub or have it cached")
                return
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


def check_model_path(value: str, *, on_cluster: bool = False, warnings: Optional[list[str]] = None) -> list[str]:
    """`model.hf_config` as a path (see the module docstring): an existing folder with config.json (or the
    config.json file), or a well-spelled hub id (offline: cached, shipped or packaged). Appends to and returns
    `warnings` (a missing cluster path, `on_cluster`)."""
    warnings = [] if warnings is None else warnings
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
        return warnings
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
    return warnings


def check_data_paths(cfg: RunConfig, *, need_data: bool = True, on_cluster: bool = False) -> list[str]:
    """`data.source` (required when `need_data`) and, when evaluating, `train.eval_source`; returns the warnings."""
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
    return warnings


def check_paths(cfg: RunConfig, *, need_data: bool = True, on_cluster: bool = False) -> list[str]:
    """Check every input path of the run (see the module docstring): the data (`check_data_paths`), then the model
    (`check_model_path`).

    need_data: `data.source` must be set (a training run); otherwise an empty one is not checked (`dasd validate` of
    a layout, smoke jobs). on_cluster: the paths are the job's, on a file system that may not be this one (`dasd
    submit`). Raises `ConfigError` (field, value, fix); returns the warnings about paths it could not check here.
    """
    warnings = check_data_paths(cfg, need_data=need_data, on_cluster=on_cluster)
    return check_model_path(cfg.model.hf_config, on_cluster=on_cluster, warnings=warnings)


__all__ = ["JOBS", "TOKENIZER_FILES", "check_data_paths", "check_model_files", "check_model_path", "check_paths",
           "model_architecture", "preflight"]
