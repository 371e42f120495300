"""`dasd sweep-report SWEEP_DIR [SWEEP_DIR ...] [--out DIR]`: per-method means and 95% confidence intervals across
a sweep's seeds.

A sweep trains several recipes (methods: DASD, GRPO, OPSD, ablations) with several seeds each (`dasd sweep`). This
module reads what the runs wrote and compares the methods: for every quantity, the mean across seeds and the
half-width of the two-sided 95% Student-t interval (`mean_ci`; no interval with a single seed).

Inputs (written by `dasd sweep` and `dasd train`; everything but `sweep.json` may be absent):

- `SWEEP_DIR/sweep.json`: `{"recipes": [...], "seeds": [...], "overrides": [...], "runs": [{"recipe", "seed",
  "run_dir"}], "eval_data": path | null, "diversity": {"k", "temperature"} | null}`; a relative `run_dir` is
  relative to SWEEP_DIR (a run not listed defaults to `SWEEP_DIR/<recipe>/seed<s>`).
- `run_dir/metrics.jsonl`: one JSON line per step (step 0: the evaluation before training; a repeated step keeps its
  last line; unparseable lines are skipped). Read: `eval/accuracy`, `router/entropy_mean` (else `loss/entropy`),
  `rollout/response_length_mean`, `loss/kl`, `rollout/reward_mean`, `router/omega_mean_decile_{0..9}`.
- `run_dir/eval_records/step_XXXXXXXX.jsonl`: per evaluated answer `{"index", "problem", "kind", "extracted",
  "status"}`; accuracy by kind is read from the run's last such file (no kinds: no per-kind section).
- `run_dir/sweep_diversity/records/*.jsonl`: a `dasd eval` run (`dasd_megatron.eval.records`): Pass@k (k from
  `sweep.json`, the unbiased estimator), mean accuracy (num_correct / n) and distinct non-null answers per problem
  (and that divided by n), each averaged over problems.

A run is *missing* without metrics, *partial* when its last step is below its `train.steps` (from the run's
`config.json`; without one, below the largest last step among its method's runs), *finished* otherwise (a sweep
still in progress reports its running run as partial). Per-step curves use every run that has the step;
end-of-training quantities (`final`, `kinds`, `omega_by_entropy_decile`, `diversity`) use finished runs only, so
that a crashed run's early numbers are not averaged with the others' final ones.

Several sweep folders make one report (a setting search: each sweep the same recipes with other overrides): a method
is then a recipe plus the overrides of its sweep that the others do not share, and its name says them
(`dasd loss.beta=0.1`); `build_sweep_report` has the rules.

Outputs in `--out` (default `SWEEP_DIR/report/`, the first folder's): `summary.json` (the `SweepReport.summary`
dict, NaN as null), `sweep_report.md` (tables, the plots embedded by relative path, notes on whatever was skipped)
and the plots `accuracy.png`, `final.png`, `training.png`, `omega_deciles.png`, `diversity.png` (a plot without data
is skipped with a note, never an error); with `--archive`, `data/<sweep>/`: each sweep's `sweep.json` and its runs'
small files (no checkpoints), itself a sweep folder the report can be rebuilt from. Rendering uses
`matplotlib.figure.Figure` on an Agg canvas (no pyplot, no backend change).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dasd_megatron.sweep.runner import DIVERSITY_DIR, MANIFEST
from dasd_megatron.train.metrics_log import METRICS_FILE, read_jsonl_objects, read_metrics_jsonl

log = logging.getLogger(__name__)

__all__ = ["T_975", "t_975", "mean_ci", "display_names", "SweepReport", "build_sweep_report"]

SWEEP_MANIFEST = MANIFEST
EVAL_RECORDS_DIR = "eval_records"  # written by `Trainer.evaluate`
DIVERSITY_RECORDS = os.path.join(DIVERSITY_DIR, "records")
SUMMARY_FILE = "summary.json"
ARCHIVE_DIR = "data"  # `--archive`: the runs' small files, a sweep folder per sweep
REPORT_FILE = "sweep_report.md"
DECILES = 10
OMEGA_DECILE_KEY = "router/omega_mean_decile_{}"

# (summary key, label, candidate metric keys): the end-of-training metrics besides eval accuracy and reward.
FINAL_METRICS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("entropy", "student entropy", ("router/entropy_mean", "loss/entropy")),
    ("response_length", "response length", ("rollout/response_length_mean",)),
    ("kl", "KL(student ‖ teacher)", ("loss/kl",)),
)
EVAL_KEY = "eval/accuracy"
REWARD_KEY = "rollout/reward_mean"

# t_{0.975, df} for df = 1..30; 1.96 (the normal quantile) above.
T_975: tuple[float, ...] = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
                            2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
                            2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
NAN = float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` >= 1 degrees of freedom (table to 30, then 1.96)."""
    if df < 1:
        raise ValueError(f"t_975(df={df}): need df >= 1")
    return T_975[df - 1] if df <= len(T_975) else 1.96


def _finite(v: Any) -> Optional[float]:
    """`v` as a float when it is a finite number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the two-sided 95% Student-t interval) of the finite `values`.

    Half-width = t_{0.975, n-1} * sample sd (ddof 1) / sqrt(n); NaN for fewer than 2 values (mean NaN for none).
    NaN (and None) values are ignored."""
    v = [f for f in (_finite(x) for x in values) if f is not None]
    n = len(v)
    if n == 0:
        return NAN, NAN
    mean = sum(v) / n
    if n < 2:
        return mean, NAN
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return mean, t_975(n - 1) * sd / math.sqrt(n)


def _stat(pairs: Sequence[tuple[int, float]]) -> dict:
    """`{"mean", "ci95", "values", "seeds"}` of (seed, value) pairs in seed order."""
    mean, ci = mean_ci([v for _, v in pairs])
    return {"mean": mean, "ci95": ci, "values": [float(v) for _, v in pairs], "seeds": [int(s) for s, _ in pairs]}


def _json_safe(obj: Any) -> Any:
    """`obj` with NaN / inf floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Run:
    recipe: str
    seed: int
    run_dir: str
    records: list[dict] = field(default_factory=list)  # one per step, sorted by step
    status: str = "missing"  # missing | partial | finished
    #: `train.steps` from the run's `config.json` (None when it has none)
    planned_steps: Optional[int] = None

    @property
    def last_step(self) -> Optional[int]:
        return int(self.records[-1]["step"]) if self.records else None

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of the steps with a finite `key`."""
        out = []
        for r in self.records:
            v = _finite(r.get(key))
            if v is not None:
                out.append((int(r["step"]), v))
        return out

    def pick(self, candidates: Sequence[str]) -> Optional[str]:
        return next((k for k in candidates if self.series(k)), None)

    def last(self, key: Optional[str]) -> Optional[float]:
        s = self.series(key) if key else []
        return s[-1][1] if s else None


def _load_manifest(sweep_dir: str) -> dict:
    path = os.path.join(sweep_dir, SWEEP_MANIFEST)
    if not os.path.isfile(path):
        why = "does not exist" if not os.path.isdir(sweep_dir) else f"has no {SWEEP_MANIFEST}"
        raise FileNotFoundError(f"{sweep_dir} {why}: it is not a sweep folder. Fix: run `dasd sweep --recipes ... "
                                f"--seeds ... --out {sweep_dir}` first (it writes {SWEEP_MANIFEST}), or pass the "
                                "--out folder of that sweep")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}). Fix: rerun the same `dasd sweep` command, which "
                         "rewrites it") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object. Fix: rerun the same `dasd sweep` command")
    return manifest


def _load_metrics(run: _Run, notes: list[str]) -> None:
    path = os.path.join(run.run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return
    try:
        records, bad = read_metrics_jsonl(path)
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"{run.recipe} seed {run.seed}: `{path}` unreadable ({type(e).__name__}: {e}); run counted as "
                     "missing")
        return
    if bad:
        notes.append(f"{run.recipe} seed {run.seed}: {bad} unparseable line(s) in `{METRICS_FILE}` skipped")
    by_step: dict[int, dict] = {}
    for r in records:
        by_step[int(r["step"])] = r  # a repeated step keeps its last line
    run.records = [by_step[s] for s in sorted(by_step)]
    try:
        with open(os.path.join(run.run_dir, "config.json")) as f:
            run.planned_steps = int(json.load(f)["train"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # judged against the method's other runs instead


_STEP_FILE = re.compile(r"^step_(\d+)\.jsonl$")


def _kind_accuracy(run: _Run, notes: list[str]) -> dict[str, float]:
    """{kind: fraction correct} at the run's last `eval_records/step_*.jsonl`; {} without records or kinds."""
    folder = os.path.join(run.run_dir, EVAL_RECORDS_DIR)
    if not os.path.isdir(folder):
        return {}
    steps = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := _STEP_FILE.match(name))]
    if not steps:
        return {}
    _, name = max(steps)
    try:
        rows, bad = read_jsonl_objects(os.path.join(folder, name))
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"{run.recipe} seed {run.seed}: `{EVAL_RECORDS_DIR}/{name}` unreadable ({e}); no accuracy by kind")
        return {}
    if bad:
        notes.append(f"{run.recipe} seed {run.seed}: {bad} unparseable line(s) in `{EVAL_RECORDS_DIR}/{name}` skipped")
    total: dict[str, int] = {}
    correct: dict[str, int] = {}
    for row in rows:
        kind = row.get("kind")
        if not isinstance(kind, str) or not kind:
            continue
        total[kind] = total.get(kind, 0) + 1
        correct[kind] = correct.get(kind, 0) + int(row.get("status") == "correct")
    return {k: correct[k] / total[k] for k in total}


def _diversity(run: _Run, k: Optional[int], notes: list[str]) -> Optional[dict[str, float]]:
    """Pass@k, accuracy, distinct answers (and / n) of the run's diversity evaluation, or None without one."""
    folder = os.path.join(run.run_dir, DIVERSITY_RECORDS)
    if not os.path.isdir(folder):
        return None
    done = os.path.join(os.path.dirname(folder), "metrics.json")  # `dasd eval` writes it when it has finished
    if not os.path.isfile(done):
        notes.append(f"{run.recipe} seed {run.seed}: diversity evaluation not finished (no `{done}`); left out "
                     "(rerun `dasd sweep` with the same arguments to complete it)")
        return None
    files = sorted(f for f in os.listdir(folder) if f.endswith(".jsonl"))
    if not files:
        return None
    from dasd_megatron.eval.passk import pass_at_k  # imports torch through dasd_megatron.eval: only when needed
    from dasd_megatron.eval.records import dedupe, read_records

    records: list[dict] = []
    for name in files:
        path = os.path.join(folder, name)
        try:
            records += dedupe(read_records(path), path)
        except (OSError, ValueError) as e:
            notes.append(f"{run.recipe} seed {run.seed}: diversity records `{name}` unreadable ({e}); skipped")
    passes, accs, distinct, frac = [], [], [], []
    skipped = 0
    for rec in records:
        n, c = rec.get("n"), rec.get("num_correct")
        samples = rec.get("samples") if isinstance(rec.get("samples"), list) else []
        if isinstance(n, bool) or not isinstance(n, int) or not isinstance(c, int) or n < 1 or not 0 <= c <= n:
            skipped += 1
            continue
        kk = k if k is not None else n
        if kk > n:
            skipped += 1
            continue
        passes.append(pass_at_k(n, c, kk))
        accs.append(c / n)
        answers = {s.get("extracted") for s in samples if isinstance(s, dict) and s.get("extracted") is not None}
        distinct.append(float(len(answers)))
        frac.append(len(answers) / n)
    if skipped:
        notes.append(f"{run.recipe} seed {run.seed}: {skipped} diversity record(s) without usable n / num_correct "
                     f"(or with fewer than k={k} samples) skipped")
    if not passes:
        return None
    return {"pass_at_k": float(np.mean(passes)), "accuracy": float(np.mean(accs)),
            "distinct_answers": float(np.mean(distinct)), "distinct_fraction": float(np.mean(frac))}


def display_names(recipes: Sequence[str]) -> dict[str, str]:
    """Short names: the recipes without the `_`-separated prefix and suffix they all share
    (`smollm2_135m_dasd_cpu`, `smollm2_135m_grpo_cpu` -> `dasd`, `grpo`); the full names for a single recipe."""
    recipes = list(recipes)
    if len(recipes) < 2:
        return {r: r for r in recipes}
    toks = [r.split("_") for r in recipes]
    q = 0
    while all(len(t) > q + 1 for t in toks) and len({t[-1 - q] for t in toks}) == 1:
        q += 1
    p = 0
    while all(len(t) > p + q + 1 for t in toks) and len({t[p] for t in toks}) == 1:
        p += 1
    names = ["_".join(t[p:len(t) - q]) for t in toks]
    if any(not n for n in names) or len(set(names)) != len(names):
        return {r: r for r in recipes}
    return dict(zip(recipes, names))


# ---------------------------------------------------------------------------------------------------------------
# Aggregation


@dataclass
class _Method:
    recipe: str
    name: str
    key: str  # its key in summary["methods"]: the recipe (one sweep), else the recipe and its own overrides
    runs: list[_Run]  # in seed order
    kinds: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> {kind: accuracy}
    diversity: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> diversity numbers

    @property
    def present(self) -> list[_Run]:
        return [r for r in self.runs if r.records]

    @property
    def finished(self) -> list[_Run]:
        return [r for r in self.runs if r.status == "finished"]


def _per_step(runs: Sequence[_Run], keys_of: Callable[[_Run], Optional[str]]) -> dict[int, list[tuple[int, float]]]:
    """{step: [(seed, value)]} over `runs` of the key `keys_of(run)` picks for each run."""
    out: dict[int, list[tuple[int, float]]] = {}
    for run in runs:
        key = keys_of(run)
        for step, v in (run.series(key) if key else []):
            out.setdefault(step, []).append((run.seed, v))
    return dict(sorted(out.items()))


def _method_summary(m: _Method, k: Optional[int]) -> dict:
    fin = m.finished
    eval_acc = {str(s): _stat(p) for s, p in _per_step(m.present, lambda r: EVAL_KEY).items()}
    final = {"eval_accuracy": _stat([(r.seed, v) for r in fin if (v := r.last(EVAL_KEY)) is not None])}
    for key, _, cands in FINAL_METRICS:
        final[key] = _stat([(r.seed, v) for r in fin if (v := r.last(r.pick(cands))) is not None])
    final["reward"] = _stat([(r.seed, float(np.mean([v for _, v in s]))) for r in fin if (s := r.series(REWARD_KEY))])

    kinds: dict[str, dict] = {}
    for kind in dict.fromkeys(kk for r in fin for kk in m.kinds.get(r.seed, {})):
        kinds[kind] = _stat([(r.seed, m.kinds[r.seed][kind]) for r in fin if kind in m.kinds.get(r.seed, {})])

    omega = None
    per_decile = []
    for d in range(DECILES):
        vals = [v for r in fin if (v := r.last(OMEGA_DECILE_KEY.format(d))) is not None]
        per_decile.append(float(np.mean(vals)) if vals else NAN)
    if any(math.isfinite(v) for v in per_decile):
        omega = per_decile

    diversity = None
    div_runs = [r for r in fin if r.seed in m.diversity]
    if div_runs:
        diversity = {"k": k}
        for key in ("pass_at_k", "accuracy", "distinct_answers", "distinct_fraction"):
            diversity[key] = _stat([(r.seed, m.diversity[r.seed][key]) for r in div_runs])
    return {"name": m.name, "seeds": [r.seed for r in fin],
            "missing": [r.seed for r in m.runs if r.status == "missing"],
            "partial": [r.seed for r in m.runs if r.status == "partial"], "eval_accuracy": eval_acc, "final": final,
            "kinds": kinds, "omega_by_entropy_decile": omega, "diversity": diversity}


# ---------------------------------------------------------------------------------------------------------------
# Plots: each returns (figure, None) or (None, note).


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (8.0, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _mean_ci_arrays(stats: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([s["mean"] for s in stats], dtype=float)
    ci = np.array([s["ci95"] for s in stats], dtype=float)
    return mean, np.where(np.isfinite(ci), ci, 0.0)


def _plot_accuracy(methods: Sequence[_Method], summary: dict):
    fig, axes = _figure()
    ax = axes[0, 0]
    drawn = 0
    for i, m in enumerate(methods):
        acc = summary[m.key]["eval_accuracy"]
        if not acc:
            continue
        steps = np.array([int(s) for s in acc], dtype=float)
        mean, ci = _mean_ci_arrays(list(acc.values()))
        ax.plot(steps, mean, color=f"C{i}", marker="o", lw=2, label=f"{m.name} (n={len(m.present)})")
        ax.fill_between(steps, mean - ci, mean + ci, color=f"C{i}", alpha=0.2, lw=0)
        drawn += 1
    if not drawn:
        return None, f"no `{EVAL_KEY}` in any run: accuracy plot skipped"
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("held-out accuracy (mean across seeds, band: 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, None


def _bars(ax, methods: Sequence[_Method], stats: Sequence[dict], ylabel: str, title: str) -> None:
    x = np.arange(len(methods))
    mean, ci = _mean_ci_arrays(stats)
    ax.bar(x, np.nan_to_num(mean), yerr=ci, capsize=4, color=[f"C{i}" for i in range(len(methods))], alpha=0.8)
    for i, s in enumerate(stats):  # the seeds themselves
        ax.scatter([x[i]] * len(s["values"]), s["values"], color="k", s=10, zorder=3)
        if not math.isfinite(s["mean"]):
            ax.text(x[i], 0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [m.name for m in methods], rotation=20 if len(methods) > 4 else 0, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")


def _plot_final(methods: Sequence[_Method], summary: dict):
    stats = [summary[m.key]["final"]["eval_accuracy"] for m in methods]
    kinds = list(dict.fromkeys(k for m in methods for k in summary[m.key]["kinds"]))
    has_acc = any(math.isfinite(s["mean"]) for s in stats)
    if not has_acc and not kinds:
        return None, f"no final `{EVAL_KEY}` in any finished run: final-accuracy plot skipped"
    fig, axes = _figure(1, 2 if kinds else 1, size=(13.0 if kinds else 7.0, 4.5))
    _bars(axes[0, 0], methods, stats, "held-out accuracy", "final held-out accuracy (bars: mean, 95% CI; dots: seeds)")
    if kinds:
        ax = axes[0, 1]
        x = np.arange(len(kinds))
        w = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            st = [summary[m.key]["kinds"].get(k, {"mean": NAN, "ci95": NAN}) for k in kinds]
            mean, ci = _mean_ci_arrays(st)
            ax.bar(x - 0.4 + w * (i + 0.5), np.nan_to_num(mean), width=w, yerr=ci, capsize=3, color=f"C{i}",
                   alpha=0.8, label=m.name)
        ax.set_xticks(x, kinds, fontsize=8)
        ax.set_ylabel("accuracy")
        ax.set_title("final accuracy by problem kind (95% CI)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return fig, None


def _plot_training(methods: Sequence[_Method], summary: dict):
    fig, axes = _figure(1, 3, size=(15.0, 4.2))
    drawn = 0
    for j, (_, label, cands) in enumerate(FINAL_METRICS):
        ax = axes[0, j]
        for i, m in enumerate(methods):
            per_step = _per_step(m.present, lambda r, c=cands: r.pick(c))
            if not per_step:
                continue
            steps = np.array(list(per_step), dtype=float)
            stats = [_stat(p) for p in per_step.values()]
            mean, ci = _mean_ci_arrays(stats)
            ax.plot(steps, mean, color=f"C{i}", lw=1.8, label=m.name, marker="." if steps.size < 30 else None)
            ax.fill_between(steps, mean - ci, mean + ci, color=f"C{i}", alpha=0.15, lw=0)
            drawn += 1
        ax.set_title(f"{label} ({' / '.join(cands)})", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if not drawn:
        return None, "no entropy / response length / KL in any run: training plot skipped"
    return fig, None


def _plot_omega(methods: Sequence[_Method], summary: dict):
    rows = [(i, m, summary[m.key]["omega_by_entropy_decile"]) for i, m in enumerate(methods)]
    rows = [r for r in rows if r[2] is not None]
    if not rows:
        return None, "no `router/omega_mean_decile_*` in any finished run: omega-by-entropy-decile plot skipped"
    fig, axes = _figure(size=(8.0, 4.5))
    ax = axes[0, 0]
    for i, m, omega in rows:
        ax.plot(range(DECILES), omega, color=f"C{i}", marker="o", lw=1.8, label=m.name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(DECILES))
    ax.set_xlabel("student-entropy decile (0 = lowest entropy)")
    ax.set_ylabel("mean omega (+ pulled toward the teacher, - pushed away)")
    ax.set_title("router regime at the last step (mean across seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, None


def _plot_diversity(methods: Sequence[_Method], summary: dict):
    rows = [m for m in methods if summary[m.key]["diversity"]]
    if not rows:
        return None, "no diversity evaluation (`sweep_diversity/records/`) in any finished run: diversity plot skipped"
    k = summary[rows[0].key]["diversity"]["k"]
    fig, axes = _figure(1, 2, size=(12.0, 4.5))
    _bars(axes[0, 0], rows, [summary[m.key]["diversity"]["pass_at_k"] for m in rows], f"Pass@{k}",
          f"Pass@{k} (mean over problems; 95% CI across seeds)")
    _bars(axes[0, 1], rows, [summary[m.key]["diversity"]["distinct_answers"] for m in rows],
          "distinct answers per problem", "distinct non-null answers among the samples (95% CI)")
    return fig, None


# (file stem, section title, plot function)
PLOTS: tuple[tuple[str, str, Callable], ...] = (
    ("accuracy", "Held-out accuracy over training", _plot_accuracy),
    ("final", "Final held-out accuracy", _plot_final),
    ("training", "Entropy, response length and KL over training", _plot_training),
    ("omega_deciles", "Router: omega by entropy decile", _plot_omega),
    ("diversity", "Diversity: Pass@k and distinct answers", _plot_diversity),
)


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _fmt(s: Optional[dict], pct: bool = False) -> str:
    """`mean ± ci95` of a stat (percent for accuracies); `n/a` without values, `(1 seed)` without an interval."""
    if not s or not math.isfinite(s["mean"]):
        return "n/a"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    mean = f"{scale * s['mean']:.1f}{unit}" if pct else f"{s['mean']:.4g}"
    if not math.isfinite(s["ci95"]):
        return f"{mean} (1 seed)"
    ci = f"{scale * s['ci95']:.1f}%" if pct else f"{s['ci95']:.2g}"
    return f"{mean} ± {ci}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _markdown(sweep_dirs: Sequence[str], manifest: dict, methods: Sequence[_Method], summary: dict,
              k: Optional[int], sections: list[str], notes: list[str], seeds: Sequence[int]) -> list[str]:
    ms = summary["methods"]
    overrides = manifest.get("overrides") or []
    div = manifest.get("diversity")
    title = " + ".join(os.path.basename(os.path.abspath(d)) for d in sweep_dirs)
    lines = [f"# Sweep report: {title}", "",
             (f"- Sweep folder: `{os.path.abspath(sweep_dirs[0])}`" if len(sweep_dirs) == 1 else
              "- Sweep folders: " + ", ".join(f"`{os.path.abspath(d)}`" for d in sweep_dirs)),
             f"- Generated: {dt.datetime.now().isoformat(timespec='seconds')}", "",
             "## What was compared", "",
             "- Methods (recipes): " + ", ".join(f"**{m.name}** (`{m.recipe}`)" if m.name != m.recipe
                                                 else f"`{m.recipe}`" for m in methods),
             f"- Seeds: {', '.join(str(s) for s in seeds) or 'none'}",
             ("- Overrides (every run; a method's own follow its name): " if len(sweep_dirs) > 1 else
              "- Overrides (every run): ") + (" ".join(f"`{o}`" for o in overrides) if overrides else "none"),
             f"- Held-out data: `{manifest['eval_data']}`" if manifest.get("eval_data")
             else "- Held-out data: each recipe's own evaluation set",
             (f"- Diversity evaluation: {div.get('k')} samples per problem at temperature {div.get('temperature')}"
              if isinstance(div, dict) else "- Diversity evaluation: off"), "",
             "### Runs", ""]
    rows = []
    for m in methods:
        top = max((r.last_step for r in m.present), default=None)
        for r in m.runs:
            status = {"missing": f"missing (no `{METRICS_FILE}`)", "finished": f"finished (step {r.last_step})",
                      "partial": f"partial (step {r.last_step} of {r.planned_steps or top})"}[r.status]
            rows.append([m.name, str(r.seed), f"`{r.run_dir}`", status])
    lines += _table(["method", "seed", "run folder", "status"], rows) + [""]

    lines += ["## Summary", "",
              "Mean ± half-width of the 95% Student-t confidence interval across seeds (finished runs, value at each "
              "run's last step; reward: mean over the training steps).", ""]
    pk = f"Pass@{k}" if k is not None else "Pass@k"
    rows = []
    for m in methods:
        s = ms[m.key]
        f, d = s["final"], s["diversity"] or {}
        rows.append([m.name, f"{len(s['seeds'])}/{len(m.runs)}", _fmt(f["eval_accuracy"], pct=True),
                     _fmt(f["reward"]), _fmt(f["entropy"]), _fmt(f["response_length"]), _fmt(f["kl"]),
                     _fmt(d.get("pass_at_k"), pct=True), _fmt(d.get("distinct_answers"))])
    lines += _table(["method", "seeds (finished/planned)", "final accuracy", "reward", "entropy", "length", "KL",
                     pk, "distinct answers"], rows) + [""]

    kinds = list(dict.fromkeys(kk for m in methods for kk in ms[m.key]["kinds"]))
    if kinds:
        lines += ["## Accuracy by problem kind", "", "At each finished run's last evaluation (`eval_records/`).", ""]
        lines += _table(["method"] + kinds, [[m.name] + [_fmt(ms[m.key]["kinds"].get(kk), pct=True)
                                                         for kk in kinds] for m in methods]) + [""]

    steps = sorted({int(s) for m in methods for s in ms[m.key]["eval_accuracy"]})
    if steps:
        lines += ["## Held-out accuracy per evaluation step", "",
                  "Every run that reached the step (partial runs included; n = runs).", ""]
        rows = []
        for step in steps:
            row = [str(step)]
            for m in methods:
                st = ms[m.key]["eval_accuracy"].get(str(step))
                row.append(f"{_fmt(st, pct=True)} (n={len(st['values'])})" if st else "n/a")
            rows.append(row)
        lines += _table(["step"] + [m.name for m in methods], rows) + [""]

    omega_rows = [[m.name] + [f"{v:+.3f}" if math.isfinite(v) else "n/a" for v in omega]
                  for m in methods if (omega := ms[m.key]["omega_by_entropy_decile"]) is not None]
    if omega_rows:
        lines += ["## Mean omega by student-entropy decile", "",
                  "Last step, mean across finished seeds (+: pulled toward the teacher, -: pushed away).", ""]
        lines += _table(["method"] + [f"d{d}" for d in range(DECILES)], omega_rows) + [""]

    div_rows = [m for m in methods if ms[m.key]["diversity"]]
    if div_rows:
        lines += ["## Diversity", "", f"`dasd eval` of each finished run's final policy; {pk}: the unbiased estimator, "
                  "distinct answers: distinct non-null extracted answers per problem.", ""]
        lines += _table(["method", pk, "accuracy", "distinct answers", "distinct / n"],
                        [[m.name, _fmt(ms[m.key]["diversity"]["pass_at_k"], pct=True),
                          _fmt(ms[m.key]["diversity"]["accuracy"], pct=True),
                          _fmt(ms[m.key]["diversity"]["distinct_answers"]),
                          _fmt(ms[m.key]["diversity"]["distinct_fraction"])] for m in div_rows]) + [""]

    lines += ["## Plots", ""] + (sections or ["No plot could be drawn (see Notes).", ""])
    lines += ["## Notes", ""] + ([f"- {n}" for n in notes] or ["- every run finished and every metric was present"])
    return lines


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class SweepReport:
    out_dir: str
    summary: dict  # also written as summary.json (NaN as null)
    plots: list[str]  # paths of the PNGs written
    report_md: str  # path of sweep_report.md
    notes: list[str] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)  # the sweep folders written under out_dir/data (archive=True)


def _int_list(values: Any) -> list[int]:
    return [int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)] \
        if isinstance(values, list) else []


@dataclass
class _Sweep:
    """One sweep folder's manifest, read: its recipes, seeds, listed run folders and settings."""
    folder: str
    manifest: dict
    recipes: list[str]
    seeds: list[int]
    listed: dict[tuple[str, int], str]
    overrides: list[str]
    k: Optional[int]


def _read_sweep(sweep_dir: str) -> _Sweep:
    manifest = _load_manifest(sweep_dir)
    recipes = list(dict.fromkeys(r for r in manifest.get("recipes") or [] if isinstance(r, str)))
    seeds = list(dict.fromkeys(_int_list(manifest.get("seeds"))))
    listed: dict[tuple[str, int], str] = {}
    for run in manifest.get("runs") or []:
        if isinstance(run, dict) and isinstance(run.get("recipe"), str) and isinstance(run.get("run_dir"), str) \
                and isinstance(run.get("seed"), int):
            listed[(run["recipe"], run["seed"])] = run["run_dir"]
            recipes += [] if run["recipe"] in recipes else [run["recipe"]]
            seeds += [] if run["seed"] in seeds else [run["seed"]]
    div = manifest.get("diversity")
    k = int(div["k"]) if isinstance(div, dict) and isinstance(div.get("k"), int) and div["k"] >= 1 else None
    overrides = [o for o in manifest.get("overrides") or [] if isinstance(o, str)]
    return _Sweep(sweep_dir, manifest, recipes, seeds, listed, overrides, k)


def _run_dir(sw: _Sweep, recipe: str, seed: int) -> str:
    rd = sw.listed.get((recipe, seed)) or os.path.join(recipe, f"seed{seed}")
    return rd if os.path.isabs(rd) else os.path.join(sw.folder, rd)


def _copy(src: str, dst: str) -> None:
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return  # the report regenerated from its own archive
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)


def _archive(sweeps: Sequence[_Sweep], dest: str) -> list[str]:
    """Copy what the report reads, without checkpoints, into `dest/<sweep name>/`: each a sweep folder of its own
    (`sweep.json` with relative run folders; per run `metrics.jsonl`, `config.json`, the last `eval_records/` file and
    the finished diversity evaluation), so `dasd sweep-report dest/*` rebuilds the report where the runs are gone."""
    written, names = [], set()
    for sw in sweeps:
        name = os.path.basename(os.path.abspath(sw.folder)) or "sweep"
        while name in names:
            name += "_"
        names.add(name)
        root = os.path.join(dest, name)
        runs = []
        for recipe in sw.recipes:
            for seed in sw.seeds:
                src, rel = _run_dir(sw, recipe, seed), os.path.join(recipe, f"seed{seed}")
                files = [f for f in (METRICS_FILE, "config.json") if os.path.isfile(os.path.join(src, f))]
                if METRICS_FILE not in files:
                    continue
                evals = os.path.join(src, EVAL_RECORDS_DIR)
                steps = [n for n in os.listdir(evals) if _STEP_FILE.match(n)] if os.path.isdir(evals) else []
                files += [os.path.join(EVAL_RECORDS_DIR, max(steps))] if steps else []
                records = os.path.join(src, DIVERSITY_RECORDS)
                if os.path.isfile(os.path.join(src, DIVERSITY_DIR, "metrics.json")) and os.path.isdir(records):
                    files.append(os.path.join(DIVERSITY_DIR, "metrics.json"))
                    files += [os.path.join(DIVERSITY_RECORDS, n) for n in sorted(os.listdir(records))
                              if n.endswith(".jsonl")]
                for f in files:
                    _copy(os.path.join(src, f), os.path.join(root, rel, f))
                runs.append({"recipe": recipe, "seed": seed, "run_dir": rel})
        manifest = dict(sw.manifest, runs=runs, archived_from=os.path.abspath(sw.folder))
        if os.path.isfile(os.path.join(root, SWEEP_MANIFEST)) and os.path.samefile(
                os.path.join(root, SWEEP_MANIFEST), os.path.join(sw.folder, SWEEP_MANIFEST)):
            continue  # regenerated from this archive: leave it as it is
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, SWEEP_MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        written.append(root)
    return written


def _check_comparable(sweeps: Sequence[_Sweep]) -> None:
    """Several sweeps go into one report only when their accuracies and Pass@k mean the same thing."""
    evals = {s.folder: s.manifest.get("eval_data") for s in sweeps}
    if len(set(evals.values())) > 1:
        raise ValueError("the sweeps evaluate on different held-out data ("
                         + "; ".join(f"{d}: {e or 'each recipe its own'}" for d, e in evals.items())
                         + "), so their accuracies are not comparable. Fix: report them separately, or rerun with "
                           "the same --eval-data")
    ks = {s.folder: s.k for s in sweeps if s.k is not None}
    if len(set(ks.values())) > 1:
        raise ValueError("the sweeps' diversity evaluations draw different numbers of samples ("
                         + "; ".join(f"{d}: k={k}" for d, k in ks.items()) + "), so their Pass@k differ in k. "
                         "Fix: report them separately, or rerun with the same --diversity K")


def build_sweep_report(sweep_dirs: str | Sequence[str], out_dir: Optional[str] = None, *,
                       archive: bool = False) -> SweepReport:
    """Aggregate the sweep in `sweep_dirs` (see the module docstring) into `out_dir` (default `SWEEP_DIR/report`).

    Several sweep folders (a setting search: the same recipe with other overrides in each) make one report: a method
    is a recipe with the overrides of its sweep that not every sweep shares (its name says them), and a method met in
    two sweeps with the same overrides (seeds split across folders) pools its seeds. Their held-out data and diversity
    k must agree (ValueError otherwise). The default output is then the first folder's `report/`.

    `archive`: also copy the runs' small files into `out_dir/data/` (`_archive`): a report that can be committed
    with its data and rebuilt from it (`dasd sweep-report out_dir/data/*`) once the run folders are gone.

    Raises FileNotFoundError when a folder has no `sweep.json`; anything else missing is a note."""
    dirs = [sweep_dirs] if isinstance(sweep_dirs, str) else list(dict.fromkeys(sweep_dirs))
    if not dirs:
        raise ValueError("no sweep folder given. Fix: pass the --out folder of a `dasd sweep`")
    sweeps = [_read_sweep(d) for d in dirs]
    _check_comparable(sweeps)
    notes: list[str] = []
    common = [o for o in sweeps[0].overrides if all(o in s.overrides for s in sweeps)]
    k = next((s.k for s in sweeps if s.k is not None), None)
    manifest = dict(sweeps[0].manifest, overrides=common,
                    diversity=next((s.manifest["diversity"] for s in sweeps if s.k is not None), None))

    # method key -> (recipe, its own overrides, [(seed, run_dir)])
    groups: dict[str, tuple[str, list[str], list[tuple[int, str]]]] = {}
    for sw in sweeps:
        own = [o for o in sw.overrides if o not in common]
        if not sw.recipes:
            notes.append(f"`{os.path.join(sw.folder, SWEEP_MANIFEST)}` lists no recipes: nothing to compare")
        for recipe in sw.recipes:
            key = recipe if len(sweeps) == 1 else " ".join([recipe] + own)
            runs = groups.setdefault(key, (recipe, own, []))[2]
            for seed in sw.seeds:
                if any(s == seed for s, _ in runs):
                    notes.append(f"{key} seed {seed}: in more than one sweep; `{sw.folder}`'s copy left out")
                    continue
                if (recipe, seed) not in sw.listed:
                    notes.append(f"{recipe} seed {seed}: not in `{SWEEP_MANIFEST}` runs; looked in "
                                 f"`{os.path.join(recipe, f'seed{seed}')}`")
                runs.append((seed, _run_dir(sw, recipe, seed)))
    seeds = sorted(dict.fromkeys(seed for _, _, runs in groups.values() for seed, _ in runs))

    short = display_names(list(dict.fromkeys(recipe for recipe, _, _ in groups.values())))
    methods: list[_Method] = []
    for key, (recipe, own, seed_dirs) in groups.items():
        runs = []
        for seed, rd in sorted(seed_dirs):
            run = _Run(recipe, seed, rd)
            _load_metrics(run, notes)
            runs.append(run)
        top = max((r.last_step for r in runs if r.records), default=None)
        for r in runs:
            # finished: reached the run's own train.steps (its config.json), else the method's furthest run
            end = r.planned_steps if r.planned_steps is not None else top
            r.status = "missing" if not r.records else "partial" if r.last_step < end else "finished"
        m = _Method(recipe, " ".join([short[recipe]] + own), key, runs)
        for r in m.finished:
            if acc := _kind_accuracy(r, notes):
                m.kinds[r.seed] = acc
            if (d := _diversity(r, k, notes)) is not None:
                m.diversity[r.seed] = d
        methods.append(m)
    if k is None and any(m.diversity for m in methods):
        notes.append(f"`{SWEEP_MANIFEST}` has no diversity k: Pass@k uses each problem's n (Pass@n)")
    sweep_dir = dirs[0]
    div = manifest.get("diversity")
    recipes = list(dict.fromkeys(m.recipe for m in methods))

    summary = {"sweep_dir": os.path.abspath(sweep_dir), "sweep_dirs": [os.path.abspath(d) for d in dirs],
               "recipes": recipes, "seeds": seeds, "overrides": common, "eval_data": manifest.get("eval_data"),
               "diversity_settings": div if isinstance(div, dict) else None,
               "methods": {m.key: _method_summary(m, k) for m in methods}}

    for m in methods:
        s = summary["methods"][m.key]
        if s["missing"]:
            notes.append(f"{m.name}: no `{METRICS_FILE}` for seed(s) {', '.join(map(str, s['missing']))} (missing "
                         "runs; rerun `dasd sweep` with the same arguments to resume)")
        if s["partial"]:
            notes.append(f"{m.name}: seed(s) {', '.join(map(str, s['partial']))} stopped early (partial): shown in the "
                         "per-step curves, left out of the final numbers")
        if m.present and not s["eval_accuracy"]:
            notes.append(f"{m.name}: no `{EVAL_KEY}` in any run")
        for key, _, cands in FINAL_METRICS:
            if m.finished and not s["final"][key]["values"]:
                notes.append(f"{m.name}: no {' / '.join(f'`{c}`' for c in cands)} in the finished runs")
        if m.finished and not s["final"]["reward"]["values"]:
            notes.append(f"{m.name}: no `{REWARD_KEY}` in the finished runs")
    if methods and not any(summary["methods"][m.key]["kinds"] for m in methods):
        notes.append(f"no accuracy by kind: no `{EVAL_RECORDS_DIR}/step_*.jsonl` with problem kinds in the finished "
                     "runs (per-kind section skipped)")
    if methods and not any(summary["methods"][m.key]["diversity"] for m in methods):
        notes.append("no diversity evaluation (`sweep_diversity/records/*.jsonl`) in the finished runs (diversity "
                     "section skipped; `dasd sweep --diversity K` adds it)")

    out_dir = out_dir or os.path.join(sweep_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    plots, sections = [], []
    ms = summary["methods"]
    for stem, title, fn in PLOTS:
        if not methods:
            break
        try:
            fig, note = fn(methods, ms)
        except Exception as e:  # one broken plot must not lose the others
            log.exception("sweep plot %s failed", stem)
            fig, note = None, f"{title} plot failed: {type(e).__name__}: {e}"
        if fig is None:
            notes.append(note)
            continue
        png = os.path.join(out_dir, f"{stem}.png")
        fig.savefig(png, dpi=110)
        plots.append(png)
        sections += [f"### {title}", "", f"![{title}]({stem}.png)", ""]

    with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(_json_safe(summary), f, indent=2, allow_nan=False)
        f.write("\n")
    md = os.path.join(out_dir, REPORT_FILE)
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(_markdown(dirs, manifest, methods, summary, k, sections, notes, seeds)) + "\n")
    archived = _archive(sweeps, os.path.join(out_dir, ARCHIVE_DIR)) if archive else []
    return SweepReport(out_dir=out_dir, summary=summary, plots=plots, report_md=md, notes=notes, archived=archived)
