"""The commands a job runs, built from the recipe and the job kind.

Job kinds (`JOB_KINDS`):

* ``train`` — ``dasd train --recipe NAME <overrides>``: the DASD training loop (the main job). Overrides are the
  difference between the resolved recipe and the registered one (config fields, ``trainer.*``, ``placement.*``), so
  ``resolve_recipe(NAME, overrides)`` in the job rebuilds exactly what was checked here.
* ``smoke`` — ``dasd smoke --steps K <overrides>``: a few optimizer steps at the recipe's layout on random data
  (no rollout servers). `dasd smoke` has no ``--recipe``, so every field that differs from `RunConfig()` is passed,
  and ``model.hf_config`` is the model's local config folder (smoke needs the architecture only): with the git
  packager a path relative to the shipped code (the job's working directory), otherwise an absolute one.

Every trainer process runs under torchrun: ``--standalone`` on one node (a free rendezvous port per job), c10d
rendezvous at ``$DASD_RDZV_HOST:$DASD_RDZV_PORT`` with ``--rdzv-id=$SLURM_JOB_ID`` on several nodes (the variables
are exported by the sbatch script, see `dasd_megatron.launch.environment`). We build the torchrun command ourselves
instead of using nemo-run's ``Torchrun`` launcher: in nemo-run 0.11 a heterogeneous job group shares one launcher, which
would also wrap the rollout-server command in torchrun; and the rendezvous port must be chosen per SLURM job.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from dasd_megatron.config import ConfigError, RunConfig
from dasd_megatron.launch.spec import Recipe, apply_in_valid_order

JOB_KINDS = ("train", "smoke")
DASD_MODULE = "dasd_megatron.cli"
ROLLOUT_NODE_MODULE = "dasd_megatron.launch.rollout_node"


def _format(value: Any) -> str:
    """A value as `dasd_megatron.config.apply_overrides` parses it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return json.dumps(list(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _differences(cfg, base, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(base, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += _differences(value, default, prefix=f"{key}.")
        elif value != default or type(value) is not type(default):
            out.append(f"{key}={_format(value)}")
    return out


def config_overrides(cfg, base=None) -> list[str]:
    """Dotted `key=value` overrides that turn `base` (default: the class's defaults) into `cfg`, in an order that
    `apply_overrides` can apply one by one (see `spec.apply_in_valid_order`)."""
    base = type(cfg)() if base is None else base
    result, order = apply_in_valid_order(base, _differences(cfg, base))
    assert result == cfg, "config_overrides does not round-trip"  # a formatting bug, not a user error
    return order


def dasd_args(recipe: Recipe, job: str, *, smoke_steps: int = 8, model_path: Optional[str] = None) -> list[str]:
    """The `dasd` sub-command and arguments (what follows `python -m dasd_megatron.cli`) for `job`.

    model_path: the smoke job's `model.hf_config` (default: the local config folder of the recipe's model).
    """
    if job == "smoke":
        from recipes.models import resolve_hf_config

        path = model_path or resolve_hf_config(recipe.config.model.hf_config)
        cfg = dataclasses.replace(recipe.config, model=dataclasses.replace(recipe.config.model, hf_config=path))
        return ["smoke", "--steps", str(smoke_steps), *config_overrides(cfg, RunConfig())]
    if job == "train":
        from recipes import get_recipe

        base = get_recipe(recipe.name)
        launch = [f"trainer.{item}" for item in _differences(recipe.trainer, base.trainer)]
        launch += [f"placement.{item}" for item in _differences(recipe.placement, base.placement)]
        return ["train", "--recipe", recipe.name, *config_overrides(recipe.config, base.config), *launch]
    raise ConfigError(f"job={job!r}: unknown job kind. Fix: use one of {list(JOB_KINDS)}")


def torchrun_args(nnodes: int, nproc_per_node: int, *, rdzv_host: str = "$DASD_RDZV_HOST",
                  rdzv_port: str = "$DASD_RDZV_PORT", rdzv_id: str = "$SLURM_JOB_ID") -> list[str]:
    """Arguments of `python -m torch.distributed.run` up to (not including) the program."""
    args = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        return args + ["--standalone"]
    return args + ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_host}:{rdzv_port}", f"--rdzv-id={rdzv_id}"]


def trainer_argv(recipe: Recipe, job: str, *, python: str = "python", smoke_steps: int = 8,
                 model_path: Optional[str] = None) -> list[str]:
    """The full trainer command one node runs: python -m torch.distributed.run ... -m dasd_megatron.cli <job>."""
    t = recipe.trainer
    return [python, "-m", "torch.distributed.run", *torchrun_args(t.nodes, t.procs_per_node),
            "-m", DASD_MODULE, *dasd_args(recipe, job, smoke_steps=smoke_steps, model_path=model_path)]


def rollout_node_argv(run_dir: str, *, python: str = "python", node_index: Optional[str] = None) -> list[str]:
    """The command that starts (and watches) the rollout servers of one node; see `rollout_node`."""
    argv = [python, "-m", ROLLOUT_NODE_MODULE, "--run-dir", run_dir]
    return argv + (["--node-index", node_index] if node_index is not None else [])


def needs_rollout_servers(job: str) -> bool:
    return job == "train"
