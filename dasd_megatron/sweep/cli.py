"""`dasd sweep` and `dasd sweep-report` (see `dasd_megatron.sweep.runner` and `dasd_megatron.sweep.report`)."""

from __future__ import annotations

import argparse
import sys

from dasd_megatron.errors import ConfigError
from dasd_megatron.launch.cli import add_slurm_arguments, slurm_settings


def add_sweep_parsers(subparsers) -> None:
    from dasd_megatron.sweep import runner

    p = subparsers.add_parser("sweep", help="train every recipe x seed (locally in turn, or as SLURM jobs); resumable",
                              description=runner.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", required=True, help="comma-separated registered recipes (dasd submit --list)")
    p.add_argument("--seeds", required=True, help="a count (3: seeds 1, 2, 3) or a list (1,7,42; '3,': seed 3 alone)")
    p.add_argument("--out", required=True, help="the sweep folder (OUT/<recipe>/seed<s> per run, OUT/sweep.json)")
    p.add_argument("--eval-data", help="held-out file every run evaluates on in the loop (all of it; the CPU "
                                       "easy-arithmetic recipes default to the method study's split)")
    p.add_argument("--diversity", type=int, default=0, metavar="K",
                   help="after training, sample K answers per held-out problem (dasd eval): Pass@K, distinct answers")
    p.add_argument("--diversity-temperature", type=float, default=0.7)
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--nproc", type=int, default=0, help="local: processes per run (default: the recipe's)")
    p.add_argument("--dryrun", action="store_true", help="check every run and print the plan; start nothing")
    p.add_argument("--python", help="SLURM: interpreter of the jobs (default 'python')")
    add_slurm_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.steps=16")
    p.set_defaults(func=cmd_sweep)

    r = subparsers.add_parser("sweep-report", help="per-method means and 95%% CIs over a sweep's seeds: plots, "
                                                   "Markdown, summary.json")
    r.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR",
                   help="a sweep's --out folder; several (a setting search) make one report, each method named by "
                        "the overrides its sweep does not share with the others")
    r.add_argument("--out", help="output folder (default: the first SWEEP_DIR/report)")
    r.add_argument("--archive", action="store_true",
                   help="also copy the runs' metrics, configs, last evaluation records and diversity records (no "
                        "checkpoints) into OUT/data/, a sweep folder per sweep: commit the report with its data and "
                        "rebuild it later with `dasd sweep-report OUT/data/*`")
    r.set_defaults(func=cmd_sweep_report)


def _default_eval_data(recipes) -> str | None:
    """The method study's split when every recipe trains on the shipped easy arithmetic."""
    from recipes import get_recipe
    from recipes.smollm2 import EASY_ARITHMETIC, EASY_ARITHMETIC_STUDY

    if all(get_recipe(r).config.data.source == EASY_ARITHMETIC for r in recipes):
        return EASY_ARITHMETIC_STUDY
    return None


def cmd_sweep(args) -> int:
    from dasd_megatron.sweep.runner import SweepSpec, check_sweep, parse_seeds, run_local, submit_slurm, write_manifest
    from recipes import list_recipes

    recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    unknown = [r for r in recipes if r not in list_recipes()]
    if unknown:
        raise ConfigError(f"--recipes: unknown {', '.join(unknown)}. Fix: see `dasd submit --list`")
    spec = SweepSpec(recipes=recipes, seeds=parse_seeds(args.seeds), out_dir=args.out, overrides=tuple(args.overrides),
                     eval_data=args.eval_data or _default_eval_data(recipes), diversity_k=args.diversity,
                     diversity_temperature=args.diversity_temperature)
    checked = check_sweep(spec, on_cluster=args.executor == "slurm")  # every run, before any starts
    print(f"sweep: {len(recipes)} recipes x {len(spec.seeds)} seeds = {len(checked)} runs -> {args.out}"
          + (f" | held-out {spec.eval_data}" if spec.eval_data else ""), flush=True)
    if args.dryrun and args.executor == "local":
        for run, recipe in checked:
            print(f"  {run.name}: dasd train --recipe {run.recipe} {' '.join(spec.run_overrides(run))}")
        return 0
    if args.executor == "slurm":
        if not args.dryrun:
            write_manifest(spec)
        submit_slurm(spec, checked, slurm_settings(args), dryrun=args.dryrun, python=args.python)
        return 0
    write_manifest(spec)
    failed = run_local(spec, checked, nproc=args.nproc or checked[0][1].trainer.procs_per_node,
                       echo=lambda s: print(s, flush=True))
    if failed:
        print(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}. Rerun the same command to resume them",
              file=sys.stderr)
        return 1
    print(f"sweep: all {len(checked)} runs done. Report: dasd sweep-report {args.out}")
    return 0


def cmd_sweep_report(args) -> int:
    from dasd_megatron.sweep.report import build_sweep_report

    try:
        rep = build_sweep_report(args.sweep_dirs, args.out, archive=args.archive)
    except (FileNotFoundError, ValueError) as e:
        print(f"dasd sweep-report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {rep.report_md}")
    for p in rep.plots:
        print(f"plot:   {p}")
    for p in rep.archived:
        print(f"data:   {p}")
    return 0
