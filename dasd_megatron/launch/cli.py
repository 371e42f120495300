"""`dasd submit`: launch a recipe's job locally or on SLURM through nemo-run.

    dasd submit --list
    dasd submit --recipe tiny_qwen3_dasd_cpu --executor local --job smoke
    dasd submit --recipe qwen3_4b_dasd_2node_h100_bf16 --executor slurm --account ACCT --partition batch \\
        --container-image nvcr.io/my/dasd:latest --container-mounts /lustre:/lustre --socket-ifname ib0 \\
        --dryrun train.steps=100 run_dir=/lustre/me/runs/q4b

Everything is checked before anything is submitted (a bad field, or a layout the recipe's nodes cannot hold, exits
with status 2 and a message naming the field and the fix). `--dryrun` prints the sbatch script (or the local
command) and submits nothing. Overrides: run-config fields (`parallel.tensor=2`), `trainer.*` and `placement.*`.
`python -m dasd_megatron.launch submit ...` runs the same parser.
"""

from __future__ import annotations

import argparse
import os
import sys

from dasd_megatron.config import ConfigError

# The job kinds and executors, repeated here so that `dasd --help` does not import the launch machinery.
_JOBS = ("train", "smoke")
_EXECUTORS = ("local", "slurm")


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `submit` sub-command to an argparse sub-parsers object; its handler is `args.func`."""
    p = subparsers.add_parser("submit", help="launch a recipe locally or on SLURM (nemo-run)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="registered recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="print the registered recipes and exit")
    p.add_argument("--executor", choices=_EXECUTORS, default="slurm")
    p.add_argument("--job", choices=_JOBS, default="train",
                   help="train: the DASD loop; smoke: a few steps at the recipe's layout on random data")
    p.add_argument("--dryrun", action="store_true", help="print what would run; submit and write nothing")
    p.add_argument("--wait", action="store_true", help="SLURM: wait for the job to end and exit 1 unless it succeeded")
    p.add_argument("--smoke-steps", type=int, default=8, help="optimizer steps of a smoke job")
    p.add_argument("--experiments-dir", help="where nemo-run keeps experiment folders (default: NEMORUN_HOME)")
    p.add_argument("--python", help="interpreter of the job (default: SLURM 'python', locally this one)")
    add_slurm_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=2 trainer.nodes=2")
    p.set_defaults(func=cmd_submit)
    return p


def add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    """The SLURM settings of `dasd submit` (and `dasd sweep --executor slurm`); read back by `slurm_settings`."""
    s = p.add_argument_group("SLURM")
    s.add_argument("--account", default=os.environ.get("DASD_SLURM_ACCOUNT"), help="(env DASD_SLURM_ACCOUNT)")
    s.add_argument("--partition", default=os.environ.get("DASD_SLURM_PARTITION"), help="(env DASD_SLURM_PARTITION)")
    s.add_argument("--time", default="04:00:00", help="wall-clock limit, HH:MM:SS")
    s.add_argument("--container-image", help="pyxis/enroot image to run the tasks in")
    s.add_argument("--container-mounts", default="", help="comma-separated src:dst mounts")
    s.add_argument("--packager", choices=("git", "none"), default="git",
                   help="git: ship `git archive HEAD` with the job; none: code is installed where the job runs")
    s.add_argument("--socket-ifname", help="NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, e.g. ib0")
    s.add_argument("--ssh-host", help="submit over SSH to this login node")
    s.add_argument("--ssh-user")
    s.add_argument("--job-dir", default="", help="experiment folder on the cluster (required with --ssh-host)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment (repeatable)")


def slurm_settings(args):
    """`SlurmSettings` from the arguments `add_slurm_arguments` added."""
    from dasd_megatron.launch.executors import SlurmSettings

    env = {}
    for item in args.env:
        if "=" not in item:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    return SlurmSettings(
        account=args.account or "", partition=args.partition, time=args.time,
        container_image=args.container_image,
        container_mounts=tuple(m for m in args.container_mounts.split(",") if m),
        packager=args.packager, python=args.python or "python", socket_ifname=args.socket_ifname,
        ssh_host=args.ssh_host, ssh_user=args.ssh_user, job_dir=args.job_dir, env=env,
    )


def cmd_submit(args) -> int:
    from dasd_megatron.launch.checks import resolve_recipe

    if args.list:
        from recipes import get_recipe, list_recipes

        for name in list_recipes():
            print(f"{name:45s} {get_recipe(name).description}")
        return 0
    if not args.recipe:
        raise ConfigError("--recipe is required. Fix: pass --recipe NAME (dasd submit --list shows them)")
    recipe = resolve_recipe(args.recipe, args.overrides)
    slurm = slurm_settings(args) if args.executor == "slurm" else None
    from dasd_megatron.launch.submit import submit

    sub = submit(recipe, executor=args.executor, job=args.job, slurm=slurm, python=args.python, dryrun=args.dryrun,
                 wait=args.wait, smoke_steps=args.smoke_steps, experiments_dir=args.experiments_dir)
    if sub.dryrun:
        print(sub.script)
        print(f"# dry run: nothing submitted; the run folder would be {sub.run_dir}", file=sys.stderr)
        return 0
    print(f"recipe:      {sub.recipe.name} ({sub.job}, {sub.executor})")
    print(f"run folder:  {sub.run_dir}")
    print(f"experiment:  {sub.experiment_dir}")
    print(f"job ids:     {' '.join(sub.job_ids)}")
    for log in sub.logs:
        print(f"log:         {log}")
    if sub.state is not None:
        print(f"state:       {sub.state}")
        return 0 if sub.state == "SUCCEEDED" else 1
    return 0


def main(argv=None) -> int:
    """`python -m dasd_megatron.launch submit ...` (the same parser `dasd submit` gets)."""
    parser = argparse.ArgumentParser(prog="python -m dasd_megatron.launch")
    add_submit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"dasd: config error: {e}", file=sys.stderr)
        return 2
