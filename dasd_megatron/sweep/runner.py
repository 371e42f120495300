"""`dasd sweep`: every recipe x seed as its own training run, one folder each, resumable.

    dasd sweep --recipes smollm2_135m_dasd_cpu,smollm2_135m_grpo_cpu --seeds 3 --out runs/sweep_a
    dasd sweep --recipes qwen3_8b_dasd_2node_2rollout_h100_bf16,qwen3_8b_grpo_2node_2rollout_h100_bf16 \\
        --seeds 1,2,3 --executor slurm --account A --partition P --out /lustre/me/sweeps/q8b train.steps=100
    dasd sweep-report runs/sweep_a

A run is `OUT/<recipe>/seed<s>`, trained with the recipe, the sweep's overrides and the seed in every field that
seeds something random (`SEED_FIELDS`: data order, rollout sampling, the trainer's RNG, the model's initialisation).
With `--eval-data` (default for the CPU easy-arithmetic recipes: the method study's held-out split) the in-loop
evaluation of every run uses that file (`train.eval_source`, all of it), and with `--diversity K` each finished run
is also evaluated by `dasd eval` with K samples per problem at `--diversity-temperature` (Pass@K, distinct answers).

Everything is checked before the first run starts: every run's config goes through the same preflight as `dasd
train` / `dasd submit` at its world size. `OUT/sweep.json` records the sweep; rerunning the same command resumes it:
finished runs are skipped (their last step is logged and, when the recipe checkpoints, its last checkpoint is
complete), a run that was killed resumes from its newest checkpoint (`dasd train` does that by itself), a finished
run without its diversity evaluation gets it (`dasd eval` resumes too). A different command on the same `--out` is
refused. Locally the runs go one after another, each `dasd train` a child that dies with the sweep; with `--executor
slurm` every unfinished run is submitted as its own job through nemo-run (`dasd submit`'s machinery), and a later
local `dasd sweep` with the same arguments (where the run folders are visible) adds the diversity evaluations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from dasd_megatron.errors import ConfigError

__all__ = ["SEED_FIELDS", "MANIFEST", "DIVERSITY_DIR", "SweepRun", "SweepSpec", "parse_seeds", "run_state",
           "check_sweep", "write_manifest", "run_local", "submit_slurm", "diversity_cmd"]

SEED_FIELDS = ("train.seed", "rollout.seed", "data.seed", "model.seed")
MANIFEST = "sweep.json"
DIVERSITY_DIR = "sweep_diversity"


@dataclass(frozen=True)
class SweepRun:
    recipe: str
    seed: int
    run_dir: str

    @property
    def name(self) -> str:
        return f"{self.recipe}/seed{self.seed}"


@dataclass(frozen=True)
class SweepSpec:
    recipes: tuple[str, ...]
    seeds: tuple[int, ...]
    out_dir: str
    overrides: tuple[str, ...] = ()
    eval_data: Optional[str] = None
    diversity_k: int = 0
    diversity_temperature: float = 0.7

    def __post_init__(self) -> None:
        if not self.recipes:
            raise ConfigError("--recipes: none given. Fix: pass --recipes R1,R2 (dasd submit --list shows them)")
        if len(set(self.recipes)) != len(self.recipes):
            raise ConfigError(f"--recipes {','.join(self.recipes)}: a recipe is named twice. Fix: name each once")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds {self.seeds}: need distinct seeds. Fix: e.g. --seeds 3 or --seeds 1,7,42")
        for o in self.overrides:
            key = o.split("=", 1)[0]
            if key in SEED_FIELDS or key == "run_dir":
                raise ConfigError(f"override {o!r}: the sweep sets {key} itself (per seed / per run). Fix: drop it")
        if self.diversity_k < 0 or self.diversity_k == 1:
            raise ConfigError(f"--diversity {self.diversity_k}: needs K >= 2 samples per problem (0: off)")
        if self.diversity_k and not self.eval_data:
            raise ConfigError("--diversity needs --eval-data (the problems to sample). Fix: pass --eval-data FILE")
        if self.diversity_temperature <= 0:
            raise ConfigError(f"--diversity-temperature {self.diversity_temperature}: must be > 0 (diversity of "
                              "greedy answers is 1)")

    def runs(self) -> list[SweepRun]:
        """Seed-major (every recipe with the first seed, then the second, ...): a sweep cut short compares every
        method on the seeds it finished."""
        return [SweepRun(r, s, os.path.join(os.path.abspath(self.out_dir), r, f"seed{s}"))
                for s in self.seeds for r in self.recipes]

    def run_overrides(self, run: SweepRun) -> list[str]:
        """The overrides `dasd train --recipe run.recipe` gets for `run`."""
        out = list(self.overrides) + [f"{f}={run.seed}" for f in SEED_FIELDS]
        if self.eval_data:
            out += [f"train.eval_source={os.path.abspath(self.eval_data)}", "train.eval_limit=1000000"]
        return out + [f"run_dir={run.run_dir}"]

    def manifest(self) -> dict:
        """`sweep.json` (what `dasd sweep-report` reads)."""
        return {"recipes": list(self.recipes), "seeds": list(self.seeds), "overrides": list(self.overrides),
                "eval_data": os.path.abspath(self.eval_data) if self.eval_data else None,
                "diversity": ({"k": self.diversity_k, "temperature": self.diversity_temperature}
                              if self.diversity_k else None),
                "runs": [{"recipe": r.recipe, "seed": r.seed, "run_dir": r.run_dir} for r in self.runs()]}


def parse_seeds(text: str) -> tuple[int, ...]:
    """``3`` -> seeds 1, 2, 3; ``1,7,42`` -> those seeds; ``3,`` -> seed 3 alone."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a count (3) or a list (1,7,42)") from None
    if len(values) == 1 and "," not in str(text):
        if values[0] < 1:
            raise ConfigError(f"--seeds {text!r}: the count must be >= 1")
        return tuple(range(1, values[0] + 1))
    if any(v < 0 for v in values):
        raise ConfigError(f"--seeds {text!r}: seeds must be >= 0")
    return tuple(values)


# -- state of a run ---------------------------------------------------------------------------------------------------
def _last_logged_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    last = -1
    if not os.path.exists(path):
        return last
    with open(path) as f:
        for line in f:
            try:
                last = max(last, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a killed run
    return last


def run_state(run: SweepRun, steps: int, checkpoint_interval: int, diversity: bool) -> str:
    """'done' (trained, and diversity-evaluated if asked), 'evaluate' (trained, diversity evaluation missing),
    'resume' (started, unfinished) or 'new'."""
    last = _last_logged_step(run.run_dir)
    final_ckpt = os.path.join(run.run_dir, "checkpoints", f"step_{steps:08d}", "dasd_meta.json")
    if last >= steps and (checkpoint_interval == 0 or os.path.exists(final_ckpt)):
        if diversity and not os.path.exists(os.path.join(run.run_dir, DIVERSITY_DIR, "metrics.json")):
            return "evaluate"
        return "done"
    return "resume" if os.path.exists(run.run_dir) else "new"


# -- checks and manifest ----------------------------------------------------------------------------------------------
def check_sweep(spec: SweepSpec, *, on_cluster: bool = False) -> list[tuple[SweepRun, object]]:
    """Every run's recipe, resolved with its overrides and through the preflight at its world size (what `dasd
    train` and `dasd submit` check): a bad run fails here, before any run starts, with the run named."""
    from dasd_megatron.launch.checks import check_recipe, resolve_recipe

    if spec.eval_data and not os.path.exists(spec.eval_data):
        raise ConfigError(f"--eval-data {spec.eval_data!r}: no such file. Fix: point it at a held-out file")
    out = []
    for run in spec.runs():
        try:
            recipe = resolve_recipe(run.recipe, spec.run_overrides(run))
            check_recipe(recipe, on_cluster=on_cluster, job="train")
        except ConfigError as e:
            raise ConfigError(f"sweep run {run.name}: {e}") from None
        if spec.eval_data and not recipe.config.train.eval_interval:
            raise ConfigError(f"sweep run {run.name}: --eval-data is evaluated in the loop, but the recipe has "
                              "train.eval_interval=0. Fix: add train.eval_interval=N to the sweep's overrides")
        out.append((run, recipe))
    return out


def write_manifest(spec: SweepSpec) -> str:
    """Write `OUT/sweep.json`, or check that the one there is this sweep's (a rerun resumes it)."""
    os.makedirs(spec.out_dir, exist_ok=True)
    path = os.path.join(spec.out_dir, MANIFEST)
    mine = spec.manifest()
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        if theirs != mine:
            diff = [k for k in mine if theirs.get(k) != mine[k]]
            raise ConfigError(f"{path} holds another sweep (it differs in {', '.join(diff)}). Fix: rerun with the "
                              "same recipes, seeds and overrides to resume it, or choose another --out")
        return path
    with open(path + ".tmp", "w") as f:
        json.dump(mine, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


# -- local runs -------------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    from sglang_rollout.supervise import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)


def _child(cmd: list[str], log_path: str) -> int:
    """Run `cmd` with its output appended to `log_path`; the child is killed if this process dies (a killed sweep
    leaves no training behind that a resumed sweep would race)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent).returncode


def diversity_cmd(spec: SweepSpec, run: SweepRun, recipe) -> list[str]:
    """`dasd eval` of the run's newest checkpoint on the held-out file, with the run's prompt and reward rules."""
    cfg = recipe.config
    p, rw = cfg.data.prompt, cfg.reward
    cmd = [sys.executable, "-m", "dasd_megatron.cli", "eval", "--model", run.run_dir,
           "--output", os.path.join(run.run_dir, DIVERSITY_DIR), "--data", os.path.abspath(spec.eval_data),
           "--data-name", "heldout", "--schema", cfg.data.schema, "--n-samples", str(spec.diversity_k),
           "--pass-k", f"1,{spec.diversity_k}", "--temperature", str(spec.diversity_temperature),
           "--top-p", "1.0", "--max-new-tokens", str(cfg.train.max_response_tokens), "--seed", str(run.seed),
           "--chat-template", p.chat_template, "--backend", "builtin", "--no-progress"]
    if p.instruction:
        cmd += ["--instruction", p.instruction]
    if p.system_prompt:
        cmd += ["--system-prompt", p.system_prompt]
    if rw.answer_line_fallback:
        cmd.append("--answer-line-fallback")
    if rw.last_number_fallback:
        cmd.append("--last-number-fallback")
    return cmd


def run_local(spec: SweepSpec, checked: Sequence[tuple[SweepRun, object]], *, nproc: int,
              echo: Callable[[str], None] = print) -> list[str]:
    """Train (and evaluate) the unfinished runs one after another; returns the names of the runs that failed (the
    others still ran). Each run's output is in `RUN/logs/sweep.log`."""
    failed = []
    t_sweep = time.perf_counter()
    for i, (run, recipe) in enumerate(checked, 1):
        t = recipe.config.train
        state = run_state(run, t.steps, t.checkpoint_interval, bool(spec.diversity_k))
        head = f"[{i}/{len(checked)}] {run.name}"
        if state == "done":
            echo(f"{head}: done, skipped")
            continue
        log_path = os.path.join(run.run_dir, "logs", "sweep.log")
        t0 = time.perf_counter()
        if state in ("new", "resume"):
            echo(f"{head}: {'resuming' if state == 'resume' else 'training'} {t.steps} steps -> {run.run_dir}")
            cmd = [sys.executable, "-m", "dasd_megatron.cli", "train", "--recipe", run.recipe,
                   "--nproc", str(nproc), *spec.run_overrides(run)]
            if _child(cmd, log_path) != 0:
                echo(f"{head}: training FAILED (see {log_path}); going on with the next run")
                failed.append(run.name)
                continue
        if spec.diversity_k:
            echo(f"{head}: diversity evaluation ({spec.diversity_k} samples per problem)")
            if _child(diversity_cmd(spec, run, recipe), log_path) != 0:
                echo(f"{head}: diversity evaluation FAILED (see {log_path}); rerun the sweep to resume it")
                failed.append(run.name)
                continue
        echo(f"{head}: done in {time.perf_counter() - t0:.0f} s (sweep {time.perf_counter() - t_sweep:.0f} s)")
    return failed


def submit_slurm(spec: SweepSpec, checked: Sequence[tuple[SweepRun, object]], slurm, *, dryrun: bool,
                 python: Optional[str] = None, echo: Callable[[str], None] = print) -> list:
    """Submit every unfinished run as its own SLURM job (nemo-run, `dasd submit`'s machinery); returns the
    submissions. Runs that are done are skipped; a resubmitted run resumes from its newest checkpoint."""
    from dasd_megatron.launch.submit import submit

    subs = []
    for run, recipe in checked:
        t = recipe.config.train
        if run_state(run, t.steps, t.checkpoint_interval, False) == "done":
            echo(f"{run.name}: done, skipped")
            continue
        sub = submit(recipe, executor="slurm", slurm=slurm, dryrun=dryrun, python=python)
        echo(f"{run.name}: {'dry run' if dryrun else 'job ' + ' '.join(sub.job_ids)} -> {sub.run_dir}")
        if dryrun:
            echo(sub.script)
        subs.append(sub)
    return subs
