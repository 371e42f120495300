"""Submit a recipe's job through nemo-run: check everything, write the run folder, build tasks and executors, and
either print what would run (dry run) or run it.

    from dasd_megatron.launch import SlurmSettings, resolve_recipe, submit
    recipe = resolve_recipe("qwen3_4b_dasd_2node_h100_bf16", ["train.steps=50"])
    submit(recipe, executor="slurm", slurm=SlurmSettings(account="my_acct", partition="batch"), dryrun=True)

Nothing is submitted or written unless every check passed. The run folder gets `config.json` and `launch.json`
(`dasd_megatron.launch.checks`); nemo-run's experiment folder (sbatch script, logs) lives under its job_dir.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dasd_megatron.config import ConfigError
from dasd_megatron.launch.checks import absolute_run_dir, check_recipe, write_run_files
from dasd_megatron.launch.command import (JOB_KINDS, needs_rollout_servers, rollout_node_argv, trainer_argv)
from dasd_megatron.launch.environment import job_env
from dasd_megatron.launch.executors import SlurmSettings, local_executor, slurm_executors
from dasd_megatron.launch.spec import Recipe

EXECUTORS = ("local", "slurm")


@dataclass
class Submission:
    """What `submit` did. `script` is the sbatch script (SLURM) or the command line (local) that runs / would run."""

    recipe: Recipe
    job: str
    executor: str
    dryrun: bool
    script: str
    run_dir: str
    experiment_dir: Optional[str] = None
    job_ids: list[str] = field(default_factory=list)
    state: Optional[str] = None
    """Final state ('SUCCEEDED', 'FAILED', ...) when the call waited for the job; None otherwise."""
    logs: list[str] = field(default_factory=list)


def _shell_arg(arg: str) -> str:
    """Quote for the sbatch script's shell, keeping `$VAR` / `$((...))` references expandable."""
    return f'"{arg}"' if "$" in arg else shlex.quote(arg)


def _script_task(argv: list[str], *, for_shell: bool):
    """A `run.Script` running `python -m module args...`."""
    import nemo_run as run

    python, dash_m, module, *args = argv
    assert dash_m == "-m", argv
    if for_shell:  # nemo-run joins the srun command with spaces, unquoted
        args = [_shell_arg(a) for a in args]
    return run.Script(path=module, args=args, entrypoint=python, m=True)


def _with_servers_task(trainer: list[str], servers: list[str]):
    """An inline script: start this node's rollout servers in the background, run the trainer, stop the servers."""
    import nemo_run as run

    body = "\n".join([
        "set -u",
        " ".join(_shell_arg(a) for a in servers) + " &",
        "servers=$!",
        " ".join(_shell_arg(a) for a in trainer),
        "rc=$?",
        'kill "$servers" 2>/dev/null; wait "$servers" 2>/dev/null',
        'exit "$rc"',
    ])
    return run.Script(inline=body)


def smoke_model_path(recipe: Recipe, slurm: Optional[SlurmSettings]) -> str:
    """The smoke job's model config folder; relative to the code root when the git packager ships the code."""
    from recipes.models import resolve_hf_config

    path = os.path.abspath(resolve_hf_config(recipe.config.model.hf_config))
    root = str(Path(__file__).resolve().parents[2])  # the checkout the git packager archives
    if slurm is not None and slurm.packager == "git" and path.startswith(root + os.sep):
        return os.path.relpath(path, root)
    return path


def build_tasks(recipe: Recipe, job: str, *, python: str, scheduler: str, smoke_steps: int,
                model_path: Optional[str] = None) -> list:
    """nemo-run tasks: [trainer] or, for a heterogeneous job, [trainer, rollout servers]."""
    trainer = trainer_argv(recipe, job, python=python, smoke_steps=smoke_steps, model_path=model_path)
    shell = scheduler == "slurm"
    if not needs_rollout_servers(job):
        return [_script_task(trainer, for_shell=shell)]
    servers = rollout_node_argv(recipe.config.run_dir, python=python)
    if recipe.placement.mode == "separate":
        return [_script_task(trainer, for_shell=shell), _script_task(servers, for_shell=shell)]
    return [_with_servers_task(trainer, servers)]


def _check_mounted(run_dir: str, mounts: tuple[str, ...]) -> None:
    """In a container the run folder must be a mounted path (every node writes and reads it)."""
    targets = [m.split(":")[1] if ":" in m else m for m in mounts]
    if not any(run_dir == t or run_dir.startswith(t.rstrip("/") + "/") for t in targets):
        raise ConfigError(f"run_dir={run_dir!r}: not inside any container mount {targets or '(none)'}; the job's "
                          "nodes could not share it. Fix: pass --container-mounts /shared:/shared and a run_dir "
                          "under it (run_dir=/shared/...)")


def _check_git_checkout() -> None:
    """The git packager archives the repository the submission runs in (nemo-run calls `git rev-parse`)."""
    d = os.getcwd()
    while not os.path.exists(os.path.join(d, ".git")):
        if os.path.dirname(d) == d:
            raise ConfigError(f"packager=git: {os.getcwd()} is not inside a git checkout, so there is nothing to "
                              "ship. Fix: run from the dasd-megatron checkout, or pass --packager none when the code "
                              "is installed where the job runs")
        d = os.path.dirname(d)


def _local_script(tasks: list, env: dict[str, str]) -> str:
    task = tasks[0]
    cmd = task.inline if task.inline else " ".join(shlex.quote(a) for a in [task.entrypoint, "-m", task.path, *task.args])
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()) + cmd + "\n"


def submit(recipe: Recipe, *, executor: str = "slurm", job: str = "train", slurm: Optional[SlurmSettings] = None,
           python: Optional[str] = None, dryrun: bool = False, wait: bool = False, smoke_steps: int = 8,
           experiments_dir: Optional[str] = None, te_available: Optional[bool] = None) -> Submission:
    """Check and launch `recipe`'s `job` ('train' or 'smoke') with the 'local' or 'slurm' executor.

    python: interpreter of the job (default: slurm.python on SLURM, this interpreter locally).
    wait: block until the job ends and report its state (local runs always wait).
    experiments_dir: where nemo-run keeps experiment folders (default NEMORUN_HOME; a temporary folder for dry runs).
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor={executor!r}: unknown executor. Fix: use one of {list(EXECUTORS)}")
    if job not in JOB_KINDS:
        raise ConfigError(f"job={job!r}: unknown job kind. Fix: use one of {list(JOB_KINDS)}")
    if executor == "slurm" and slurm is None:
        raise ConfigError("executor=slurm needs SLURM settings. Fix: pass --account (and --partition, ...)")
    recipe = absolute_run_dir(recipe)
    # the one preflight (dasd_megatron.preflight) at the recipe's world size, for this job; local: paths must exist here
    check_recipe(recipe, te_available=te_available, on_cluster=executor == "slurm", job=job)
    if executor == "slurm" and slurm.container_image:
        _check_mounted(recipe.config.run_dir, slurm.container_mounts)
    het = executor == "slurm" and needs_rollout_servers(job) and recipe.placement.mode == "separate"
    socket_ifname = slurm.socket_ifname if slurm else None
    env = job_env(recipe, scheduler=executor, heterogeneous=het, socket_ifname=socket_ifname,
                  extra=dict(slurm.env) if slurm else None)
    python = python or (slurm.python if executor == "slurm" else sys.executable)
    model_path = smoke_model_path(recipe, slurm) if job == "smoke" else None
    tasks = build_tasks(recipe, job, python=python, scheduler=executor, smoke_steps=smoke_steps,
                        model_path=model_path)
    if executor == "slurm":
        # a dry run does not package (the sbatch script does not depend on it); a real git packaging needs a checkout
        settings = dataclasses.replace(slurm, packager="none") if dryrun else slurm
        if settings.packager == "git":
            _check_git_checkout()
        executors = slurm_executors(recipe, settings, env, with_rollout_nodes=het)
    else:
        executors = [local_executor(recipe, env)]  # raises if the recipe does not fit one machine

    base = experiments_dir or (tempfile.mkdtemp(prefix="dasd-dryrun-") if dryrun else None)
    if base:
        base = os.path.abspath(base)
        for ex in executors:
            if executor == "slurm" and not slurm.ssh_host and not ex.tunnel.job_dir:
                ex.tunnel.job_dir = os.path.join(base, "experiments")
    if not dryrun:
        write_run_files(recipe, job=job, executor=executor)
    sub = Submission(recipe=recipe, job=job, executor=executor, dryrun=dryrun, script="",
                     run_dir=recipe.config.run_dir)
    try:
        _run_experiment(sub, tasks, executors, env, base=base, wait=wait)
    finally:
        if dryrun and not experiments_dir:
            shutil.rmtree(base, ignore_errors=True)
    return sub


def _run_experiment(sub: Submission, tasks: list, executors: list, env: dict[str, str], *, base: Optional[str],
                    wait: bool) -> None:
    import nemo_run as run

    title = sub.recipe.name
    with run.Experiment(title, base_dir=base, enable_goodbye_message=False, skip_status_at_exit=True,
                        clean_mode=sub.dryrun) as exp:
        if len(tasks) == 1:
            exp.add(tasks[0], executor=executors[0], name=f"{sub.job}")
        else:
            exp.add(tasks, executor=executors, name=f"{sub.job}")
        sub.experiment_dir = exp._exp_dir
        if sub.dryrun:
            exp.dryrun(log=False, delete_exp_dir=False)
            scripts = sorted(glob.glob(os.path.join(exp._exp_dir, "*_sbatch.sh")))
            sub.script = "".join(open(p).read() for p in scripts) if scripts else _local_script(tasks, env)
            for path in sorted(glob.glob(os.path.join(exp._exp_dir, "*", "scripts", "*.sh"))):
                sub.script += f"\n# ---- {os.path.relpath(path, exp._exp_dir)} (run by the srun above) ----\n"
                sub.script += open(path).read()
            return
        exp.run(detach=not wait and sub.executor == "slurm", tail_logs=False)
    sub.script = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(exp._exp_dir, "*_sbatch.sh"))))
    if sub.executor == "local":
        sub.script = _local_script(tasks, env)
    for job in exp.jobs:
        handles = getattr(job, "handles", None) or [job.handle]
        sub.job_ids += [h.rstrip("/").split("/")[-1] for h in handles if h]
        if wait or sub.executor == "local":
            sub.state = str(job.state).split(".")[-1]
    sub.logs = find_logs(sub.experiment_dir)


def find_logs(experiment_dir: str) -> list[str]:
    """The job's output files: `log-*.out` (SLURM, one per srun) or torchx's `*.log` (local)."""
    found = set()
    for pattern in ("log-*.out", "*.log", "sbatch_*.out"):
        found.update(glob.glob(os.path.join(experiment_dir, "**", pattern), recursive=True))
    return sorted(found)


__all__ = ["EXECUTORS", "SlurmSettings", "Submission", "build_tasks", "submit"]
