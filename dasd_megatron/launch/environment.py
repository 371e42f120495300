"""Environment variables of a job's processes (trainer and rollout servers alike).

| variable | value | why |
| --- | --- | --- |
| `DASD_RUN_DIR` | the absolute run folder | the rollout node runner and the trainer meet there (rendezvous files) |
| `DASD_RECIPE` | the recipe name | logs and the node runner |
| `NCCL_CUMEM_ENABLE` | `placement.nccl_cumem_enable` (0 by default) | SGLang runs with 0; the weight-update NCCL group spans trainer and servers, so both must agree |
| `NCCL_SOCKET_IFNAME`, `GLOO_SOCKET_IFNAME` | `--socket-ifname` (cluster specific, unset by default) | which network interface NCCL/gloo bootstrap over |
| `CUDA_DEVICE_MAX_CONNECTIONS` | 1 (GPU recipes) | megatron's tensor/sequence-parallel communication overlap needs in-order kernel launch |
| `OMP_NUM_THREADS` | 1 (CPU recipes) | torchrun's processes share the node's cores |
| `DASD_RDZV_HOST` | SLURM: the first trainer node (`$head_node_ip`; `$het_group_host_0` in a heterogeneous job) | torchrun c10d rendezvous on several nodes |
| `DASD_RDZV_PORT` | SLURM: `20000 + SLURM_JOB_ID % 10000` | a rendezvous port per job, so jobs sharing a node do not collide |
| `DASD_PORT_OFFSET` | SLURM: `(SLURM_JOB_ID % 100) * 100`; locally 0 | added to every rollout-server port (`placement.base_port + i * port_stride`) |

In the sbatch script nemo-run writes each variable as an unquoted `export KEY=value` after it has set
`head_node_ip` / `het_group_host_<i>`, so the shell expressions above are evaluated once, on the batch node.
"""

from __future__ import annotations

from typing import Optional

from dasd_megatron.launch.spec import Recipe

SLURM_RDZV_PORT = "$((20000 + SLURM_JOB_ID % 10000))"
SLURM_PORT_OFFSET = "$(((SLURM_JOB_ID % 100) * 100))"


def job_env(recipe: Recipe, *, scheduler: str, heterogeneous: bool = False, socket_ifname: Optional[str] = None,
            extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of every process of the job; `scheduler` is 'slurm' or 'local'."""
    env = {
        "DASD_RUN_DIR": recipe.config.run_dir,
        "DASD_RECIPE": recipe.name,
        "NCCL_CUMEM_ENABLE": "1" if recipe.placement.nccl_cumem_enable else "0",
    }
    if recipe.trainer.accelerator == "gpu":
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    else:
        env["OMP_NUM_THREADS"] = "1"
    if socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = socket_ifname
        env["GLOO_SOCKET_IFNAME"] = socket_ifname
    if scheduler == "slurm":
        env["DASD_RDZV_HOST"] = "$het_group_host_0" if heterogeneous else "$head_node_ip"
        env["DASD_RDZV_PORT"] = SLURM_RDZV_PORT
        env["DASD_PORT_OFFSET"] = SLURM_PORT_OFFSET
    elif scheduler == "local":
        env["DASD_PORT_OFFSET"] = "0"
    else:
        raise ValueError(f"scheduler={scheduler!r}: use 'slurm' or 'local'")
    env.update(extra or {})
    return env
