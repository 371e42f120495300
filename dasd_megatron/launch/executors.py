"""nemo-run executors for a recipe: `run.LocalExecutor` on this machine, `run.SlurmExecutor` on a cluster.

On SLURM a job is one allocation. With colocated (or built-in) rollout servers it is a plain job of
`trainer.nodes` nodes; with `placement.mode = 'separate'` (and a job that needs servers) it is a heterogeneous job:
het group 0 = the trainer nodes (torchrun), het group 1 = the rollout nodes (one node runner per node), built from
two `SlurmExecutor`s with ``heterogeneous=True`` that nemo-run merges into one sbatch script with ``#SBATCH hetjob``.
Each node gets one task (``ntasks_per_node=1``) that starts its torchrun or its servers; GPU jobs ask for every GPU of
the node and exclusive nodes.

nemo-run is imported inside the functions: it takes seconds to import and the rest of the package does not need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from dasd_megatron.config import ConfigError
from dasd_megatron.launch.spec import Recipe


@dataclass(frozen=True)
class SlurmSettings:
    """Cluster-side settings of a SLURM submission (what the recipe cannot know)."""

    account: str
    partition: Optional[str] = None
    time: str = "04:00:00"
    container_image: Optional[str] = None
    """Pyxis/enroot image the tasks run in (None: run on the node's own environment)."""
    container_mounts: tuple[str, ...] = ()
    """`src:dst` mounts; the run folder's file system must be among them when it is not inside the image."""
    packager: Literal["git", "none"] = "git"
    """'git': nemo-run's GitArchivePackager ships the committed tree (`git archive HEAD`) into the job folder;
    'none': the code is already where the job runs (installed in the image or a shared virtual environment)."""
    python: str = "python"
    """Interpreter on the compute nodes (inside the container when there is one)."""
    socket_ifname: Optional[str] = None
    """NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, e.g. 'ib0' or '^lo,docker'; cluster specific."""
    ssh_host: Optional[str] = None
    """Submit over SSH to this login node (nemo-run SSHTunnel); None: sbatch runs on this machine."""
    ssh_user: Optional[str] = None
    job_dir: str = ""
    """Folder for nemo-run's experiment folders (sbatch scripts, logs) on the cluster; '' = nemo-run's default
    (NEMORUN_HOME/experiments) locally; required with ssh_host."""
    exclusive: Optional[bool] = None
    """Ask for whole nodes; None = yes for GPU recipes, no for CPU recipes."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every task."""

    def __post_init__(self) -> None:
        if not self.account:
            raise ConfigError("slurm.account='': SLURM needs an account. Fix: pass --account (or set DASD_SLURM_ACCOUNT)")
        if self.packager not in ("git", "none"):
            raise ConfigError(f"slurm.packager={self.packager!r}: unknown packager. Fix: use git or none")
        if self.ssh_host and not self.job_dir:
            raise ConfigError("slurm.job_dir='': submitting over SSH needs a job folder on the cluster. "
                              "Fix: pass --job-dir /shared/path/nemo_run")


def _packager(kind: str):
    import nemo_run as run

    return run.GitArchivePackager() if kind == "git" else run.Packager()


def _tunnel(s: SlurmSettings):
    import nemo_run as run

    if s.ssh_host:
        return run.SSHTunnel(host=s.ssh_host, user=s.ssh_user or "", job_dir=s.job_dir)
    return run.LocalTunnel(job_dir=s.job_dir)


def slurm_executor(s: SlurmSettings, *, nodes: int, gpus_per_node: int, cpus_per_task: Optional[int],
                   env: dict[str, str], heterogeneous: bool):
    """One `run.SlurmExecutor`: `nodes` nodes, one task per node."""
    import nemo_run as run

    exclusive = s.exclusive if s.exclusive is not None else gpus_per_node > 0
    return run.SlurmExecutor(
        account=s.account,
        partition=s.partition,
        time=s.time,
        nodes=nodes,
        ntasks_per_node=1,
        gpus_per_node=gpus_per_node or None,
        cpus_per_task=cpus_per_task,
        exclusive=True if exclusive else None,
        container_image=s.container_image,
        container_mounts=list(s.container_mounts),
        packager=_packager(s.packager),
        tunnel=_tunnel(s),
        env_vars=dict(env),
        heterogeneous=heterogeneous,
        wait_time_for_group_job=0,  # the trainer waits for the servers itself (rendezvous files)
        job_name_prefix="dasd-",
        poll_estimated_start_time=False,
    )


def slurm_executors(recipe: Recipe, s: SlurmSettings, env: dict[str, str], *, with_rollout_nodes: bool) -> list:
    """[trainer] or [trainer, rollout] executors for the recipe (the latter a heterogeneous job)."""
    t, p = recipe.trainer, recipe.placement
    het = with_rollout_nodes and p.mode == "separate"
    cpus = t.procs_per_node if t.accelerator == "cpu" else None  # one task runs all of torchrun's processes
    executors = [slurm_executor(s, nodes=t.nodes, gpus_per_node=t.gpus_per_node, cpus_per_task=cpus, env=env,
                                heterogeneous=het)]
    if het:
        executors.append(slurm_executor(s, nodes=p.nodes, gpus_per_node=p.gpus_per_node, cpus_per_task=None,
                                        env=env, heterogeneous=True))
    return executors


def local_executor(recipe: Recipe, env: dict[str, str]):
    """A `run.LocalExecutor` for the recipe; it must fit on this one machine."""
    if recipe.total_nodes != 1:
        raise ConfigError(
            f"executor=local: recipe {recipe.name!r} needs {recipe.total_nodes} nodes (trainer.nodes="
            f"{recipe.trainer.nodes}, placement.mode={recipe.placement.mode!r}, placement.nodes="
            f"{recipe.placement.nodes}); the local executor runs on this machine only. "
            "Fix: use --executor slurm, or override trainer.nodes=1 (and placement.mode=colocated)"
        )
    import nemo_run as run

    return run.LocalExecutor(ntasks_per_node=recipe.trainer.procs_per_node, env_vars=dict(env))
