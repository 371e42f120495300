"""`dasd report RUN_DIR [--out DIR]`: plots and a Markdown summary of a training run's `metrics.jsonl`.

Writes into `--out` (default `RUN_DIR/report/`) one PNG per plot and `report.md`, which embeds the PNGs by relative
path (so the folder can be copied or viewed anywhere):

| file                | what                                                                                        |
| ------------------- | ------------------------------------------------------------------------------------------- |
| `reward.png`        | `rollout/reward_mean` and `rollout/accuracy` over steps                                     |
| `eval.png`          | `eval/accuracy` at the evaluation steps (`train.eval_interval`; step 0 is before training)  |
| `loss.png`          | `loss/dasd` (or `loss/total`)                                                               |
| `entropy.png`       | mean student entropy (`router/entropy_mean` or `loss/entropy`)                              |
| `omega_deciles.png` | mean omega per student-entropy decile (`router/omega_mean_decile_{0..9}`): a heatmap over   |
|                     | steps x deciles, and bars of the last step and of the run's mean. Which deciles are pulled  |
|                     | (omega > 0) and which pushed (omega < 0) is the router's regime.                            |
| `router.png`        | `router/omega_pos_frac`, `router/omega_mean`, `router/gate_mean`                            |
| `kl.png`            | `loss/kl` (and `loss/forward_kl`)                                                           |
| `response_length.png` | `rollout/response_length_mean`                                                            |
| `markers.png`       | `rollout/epistemic_marker_density` (`dasd_megatron.eval.markers.epistemic_marker_density`)  |
| `offpolicy.png`     | `rollout/staleness_mean` (asynchronous rollouts), `loss/is_weight_mean`,                    |
|                     | `rollout/mismatch_kl_k3`: how far the samples are from the trained policy, and the IS weight|
| `timing.png`        | stacked `timing/*` phases with `timing/step_s` on top (an asynchronous run stacks the       |
|                     | trainer's own phases: generation ran in the background, the wait for it is stacked);        |
|                     | `throughput/tokens_per_s` below                                                             |

Curves show the raw values thin and a moving average (window = steps/10) thick. A metric that is absent (or never
finite) is skipped with a note in `report.md`, never an error. The summary table gives, per metric, the first and
last finite values and the trend: the mean of the last 20% of the steps against the mean of the first 20%.
Duplicate steps (a resumed run whose logger did not truncate) keep their last record; unparseable lines are
skipped and counted.

Rendering uses matplotlib's Agg canvas through `matplotlib.figure.Figure` (no pyplot, no global backend change).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from dasd_megatron.train.metrics_log import METRICS_FILE, read_metrics_jsonl

log = logging.getLogger(__name__)

__all__ = ["load_metrics", "build_report", "ReportResult", "add_report_parser", "cmd_report", "main"]

# ---------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Metrics:
    """The run's records sorted by step (one per step) and what loading them noticed."""

    records: list[dict]
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> np.ndarray:
        return np.array([r["step"] for r in self.records], dtype=float)

    def has(self, key: str) -> bool:
        return any(_as_float(r.get(key)) is not None and math.isfinite(_as_float(r.get(key))) for r in self.records)

    def pick(self, candidates: Sequence[str]) -> Optional[str]:
        """The first of `candidates` with at least one finite value."""
        return next((k for k in candidates if self.has(k)), None)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the records that carry `key`; null / non-numeric values are NaN."""
        rows = [(r["step"], _as_float(r[key])) for r in self.records if key in r]
        steps = np.array([s for s, _ in rows], dtype=float)
        vals = np.array([float("nan") if v is None else v for _, v in rows], dtype=float)
        return steps, vals


def _as_float(v) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def load_metrics(path: str) -> Metrics:
    """Read a `metrics.jsonl` (see `dasd_megatron.train.metrics_log`)."""
    records, bad = read_metrics_jsonl(path)
    notes = []
    if bad:
        notes.append(f"{bad} unparseable line(s) in `{os.path.basename(path)}` skipped")
    by_step: dict = {}
    for r in records:
        by_step[r["step"]] = r
    if len(by_step) < len(records):
        notes.append(f"{len(records) - len(by_step)} duplicate step record(s): the last record of each step is used")
    return Metrics(records=[by_step[s] for s in sorted(by_step)], notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# Summary


# (label, candidate keys): the rows of the summary table, in order.
SUMMARY_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward mean", ("rollout/reward_mean",)),
    ("accuracy", ("rollout/accuracy",)),
    ("eval accuracy", ("eval/accuracy",)),
    ("loss", ("loss/dasd", "loss/total")),
    ("student entropy", ("router/entropy_mean", "loss/entropy")),
    ("KL(student ‖ teacher)", ("loss/kl",)),
    ("omega > 0 fraction", ("router/omega_pos_frac",)),
    ("omega mean", ("router/omega_mean",)),
    ("response length", ("rollout/response_length_mean",)),
    ("epistemic markers / response", ("rollout/epistemic_marker_density",)),
    ("step time (s)", ("timing/step_s",)),
    ("tokens / s", ("throughput/tokens_per_s",)),
)
TREND_FRACTION = 0.2
_FLAT_REL = 0.01  # |change| below 1% of the larger magnitude reads as flat


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    a = abs(v)
    if a >= 1e4:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    return f"{v:.4g}"


@dataclass
class Trend:
    first: float
    last: float
    head_mean: float
    tail_mean: float
    window: int

    @property
    def arrow(self) -> str:
        d = self.tail_mean - self.head_mean
        if not math.isfinite(d):
            return "n/a"
        scale = max(abs(self.head_mean), abs(self.tail_mean))
        if abs(d) <= _FLAT_REL * scale or scale == 0:
            return "→ flat"
        rel = f" ({100 * d / abs(self.head_mean):+.1f}%)" if self.head_mean != 0 else ""
        return f"{'↑' if d > 0 else '↓'} {d:+.4g}{rel}"


def trend(values: np.ndarray, fraction: float = TREND_FRACTION) -> Optional[Trend]:
    """First/last finite values and the means of the first and last `fraction` of the finite values."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    w = max(1, int(round(fraction * v.size)))
    return Trend(first=float(v[0]), last=float(v[-1]), head_mean=float(v[:w].mean()), tail_mean=float(v[-w:].mean()),
                 window=w)


def _tail_mean(m: Metrics, key: str) -> Optional[float]:
    if not m.has(key):
        return None
    t = trend(m.series(key)[1])
    return t.tail_mean if t else None


def _decile_keys(m: Metrics, prefixes: Sequence[str]) -> Optional[list[str]]:
    for p in prefixes:
        keys = [f"{p}{k}" for k in range(10)]
        if any(m.has(k) for k in keys):
            return keys
    return None


OMEGA_DECILE_PREFIXES = ("router/omega_mean_decile_",)
ENTROPY_DECILE_PREFIXES = ("router/entropy_mean_decile_", "router/entropy_decile_")


def _decile_matrix(m: Metrics, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, [steps x 10] values) over the records that carry any of `keys` (NaN where one is missing)."""
    rows = [r for r in m.records if any(k in r for k in keys)]
    steps = np.array([r["step"] for r in rows], dtype=float)
    mat = np.array([[_as_float(r.get(k)) if _as_float(r.get(k)) is not None else np.nan for k in keys]
                    for r in rows], dtype=float).reshape(len(rows), len(keys))
    return steps, mat


def _col_nanmean(mat: np.ndarray) -> np.ndarray:
    """Column means over the finite entries (NaN for a column without any), without numpy's empty-slice warning."""
    ok = np.isfinite(mat)
    cnt = ok.sum(axis=0)
    tot = np.where(ok, mat, 0.0).sum(axis=0)
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def router_regime(m: Metrics) -> list[str]:
    """Sentences on the router's regime (last 20% of steps), from omega > 0 fraction and the omega deciles."""
    out = []
    pos = _tail_mean(m, "router/omega_pos_frac")
    neg = _tail_mean(m, "router/omega_neg_frac")
    absm = _tail_mean(m, "router/omega_abs_mean")
    if pos is not None:
        if absm is not None and absm < 1e-6:
            regime = "omega is 0 everywhere: the GRPO special case (no distillation signal)"
        elif pos >= 0.999:
            regime = ("every token is pulled toward the teacher (omega > 0 everywhere): uniform self-distillation "
                      "(the OPSD-style `omega == +1` special case) or a degenerate threshold")
        elif pos <= 0.001 and (neg is None or neg >= 0.999):
            regime = "every token is pushed away from the teacher (omega < 0 everywhere): the `omega == -1` case"
        elif pos > 0.5:
            regime = ("most tokens are pulled toward the teacher and a high-entropy minority is pushed away: the "
                      "`convention=upper` regime (about 80% pulled at rho = 0.2)")
        else:
            regime = ("most tokens are pushed away from the teacher and a low-entropy minority is pulled: the "
                      "`convention=lower` regime (about 20% pulled at rho = 0.2)")
        out.append(f"omega > 0 on {100 * pos:.1f}% of tokens (mean of the last 20% of steps): {regime}.")
    else:
        out.append("`router/omega_pos_frac` was not logged: the pulled fraction is unknown.")
    keys = _decile_keys(m, OMEGA_DECILE_PREFIXES)
    if keys:
        _, mat = _decile_matrix(m, keys)
        w = max(1, int(round(TREND_FRACTION * mat.shape[0])))
        tail = _col_nanmean(mat[-w:])
        if np.isfinite(tail).any():
            signs = "".join("+" if v > 0 else "-" if v < 0 else ("0" if v == 0 else "?") for v in tail)
            fin = tail[np.isfinite(tail)]
            mono = bool(np.all(np.diff(fin) <= 1e-6))
            out.append(f"Sign of mean omega per entropy decile 0 (lowest entropy) .. 9 (highest), last 20% of steps: "
                       f"`{signs}` (values {', '.join(_fmt(float(v)) for v in tail)}); omega "
                       f"{'decreases' if mono else 'does NOT decrease monotonically'} with entropy"
                       f"{'' if mono else ' (the tanh router should make it non-increasing)'}.")
    else:
        out.append("`router/omega_mean_decile_*` was not logged: no per-decile view of the router.")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Plots: each returns the figure (saved by the caller) or None with a note.


def _figure(nrows: int = 1, ncols: int = 1, size=(8.0, 4.0)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _smooth(v: np.ndarray) -> Optional[np.ndarray]:
    """Trailing moving average over the finite values (window = n/10), or None for series under 20 points."""
    n = v.size
    w = n // 10
    if w < 2:
        return None
    out = np.full(n, np.nan)
    for i in range(n):
        seg = v[max(0, i - w + 1): i + 1]
        seg = seg[np.isfinite(seg)]
        if seg.size:
            out[i] = seg.mean()
    return out


def _lines(ax, m: Metrics, keys: Sequence[str], labels: Optional[Sequence[str]] = None) -> int:
    """Plot each present key (raw thin + moving average thick); returns how many were plotted."""
    drawn = 0
    for i, key in enumerate(keys):
        if not m.has(key):
            continue
        s, v = m.series(key)
        label = labels[i] if labels else key
        color = f"C{i}"
        sm = _smooth(v)
        ax.plot(s, v, color=color, lw=1.0, alpha=0.4 if sm is not None else 1.0, marker="." if s.size < 30 else None,
                label=label if sm is None else f"{label} (raw)")
        if sm is not None:
            ax.plot(s, sm, color=color, lw=2.0, label=f"{label} (moving avg)")
        drawn += 1
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def _simple(title: str, candidates: Sequence[Sequence[str]], ylabel: str = ""):
    """A one-axes plot of, for each group of alias keys, the first one present."""

    def plot(m: Metrics):
        keys = [m.pick(c) for c in candidates]
        keys = [k for k in keys if k]
        if not keys:
            return None, f"no {' / '.join('`' + c + '`' for g in candidates for c in g)} in metrics: {title} skipped"
        fig, ax = _figure()
        _lines(ax[0, 0], m, keys)
        ax[0, 0].set_title(title)
        ax[0, 0].set_ylabel(ylabel)
        return fig, None

    return plot


def plot_omega_deciles(m: Metrics):
    keys = _decile_keys(m, OMEGA_DECILE_PREFIXES)
    if not keys:
        return None, "no `router/omega_mean_decile_*` in metrics: omega-by-entropy-decile plot skipped"
    steps, mat = _decile_matrix(m, keys)
    fig, axes = _figure(1, 2, size=(12.0, 4.5))
    ax = axes[0, 0]
    if steps.size == 1:
        edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    else:
        mid = (steps[1:] + steps[:-1]) / 2
        edges = np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])
    mesh = ax.pcolormesh(edges, np.arange(11) - 0.5, np.ma.masked_invalid(mat.T), cmap="RdBu", vmin=-1, vmax=1,
                         shading="flat")
    fig.colorbar(mesh, ax=ax, label="mean omega (+ pull toward teacher, - push away)")
    ax.set_xlabel("step")
    ax.set_ylabel("student-entropy decile (0 = lowest)")
    ax.set_yticks(range(10))
    ax.set_facecolor("0.8")  # missing cells show grey, not the white of omega = 0
    ax.set_title("mean omega per entropy decile over steps" + ("" if np.isfinite(mat).all() else " (grey: missing)"))

    ax = axes[0, 1]
    last_idx = next((i for i in range(mat.shape[0] - 1, -1, -1) if np.isfinite(mat[i]).any()), None)
    avg = _col_nanmean(mat)
    x = np.arange(10)
    if last_idx is not None:
        ax.bar(x - 0.2, np.nan_to_num(mat[last_idx]), width=0.4, color="C0",
               label=f"last step ({int(steps[last_idx])})")
    ax.bar(x + 0.2, np.nan_to_num(avg), width=0.4, color="C1", alpha=0.8, label="mean over steps")
    ax.axhline(0, color="k", lw=0.8)
    ent_keys = _decile_keys(m, ENTROPY_DECILE_PREFIXES)
    labels = [str(k) for k in range(10)]
    if ent_keys and last_idx is not None:
        _, ent = _decile_matrix(m, ent_keys)
        ent_rows = [i for i in range(ent.shape[0]) if np.isfinite(ent[i]).any()]
        if ent_rows:
            e = ent[ent_rows[-1]]
            labels = [f"{k}\n{float(e[k]):.3g}" if np.isfinite(e[k]) else str(k) for k in range(10)]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("student-entropy decile\n(below it: the decile's mean entropy at the last step)")
    ax.set_ylabel("mean omega")
    ax.set_title("router regime: which deciles are pulled (+) / pushed (-)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig, None


_TIMING_ORDER = ("timing/rollout_s", "timing/reward_s", "timing/score_s", "timing/train_s", "timing/sync_s",
                 "timing/eval_s", "timing/checkpoint_s")


def plot_timing(m: Metrics):
    keys = sorted({k for r in m.records for k in r if k.startswith("timing/")})
    keys = [k for k in keys if m.has(k)]
    if "timing/rollout_wait_s" in keys:  # asynchronous rollouts: generation and rewards overlapped the step
        keys = [k for k in keys if k not in ("timing/rollout_s", "timing/reward_s")]
    phases = [k for k in _TIMING_ORDER if k in keys] + [k for k in keys if k not in _TIMING_ORDER
                                                        and k != "timing/step_s"]
    has_step = "timing/step_s" in keys
    tput = m.has("throughput/tokens_per_s")
    if not phases and not has_step and not tput:
        return None, "no `timing/*` or `throughput/tokens_per_s` in metrics: timing plot skipped"
    n_ax = 1 + int(bool(tput and (phases or has_step)))
    fig, axes = _figure(n_ax, 1, size=(8.0, 3.5 * n_ax))
    ax = axes[0, 0]
    if phases or has_step:
        steps = m.steps
        if phases:
            stack = [np.nan_to_num(np.array([_as_float(r.get(k)) or 0.0 for r in m.records], dtype=float))
                     for k in phases]
            ax.stackplot(steps, stack, labels=[k.split("/", 1)[1] for k in phases], alpha=0.8)
        if has_step:
            s, v = m.series("timing/step_s")
            ax.plot(s, v, color="k", lw=1.5, label="step_s (total)")
        ax.set_ylabel("seconds")
        ax.set_title("time per step by phase")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    if tput:
        ax = axes[-1, 0]
        _lines(ax, m, ["throughput/tokens_per_s"], ["tokens / s"])
        ax.set_title("throughput")
        ax.set_ylabel("tokens / s")
    return fig, None


# (file stem, section title, plot function)
PLOTS: tuple[tuple[str, str, Callable], ...] = (
    ("reward", "Reward and accuracy",
     _simple("reward and accuracy", [("rollout/reward_mean",), ("rollout/accuracy",)], "mean over rollouts")),
    ("eval", "Evaluation", _simple("accuracy on the evaluation problems (train.eval_source)",
                                   [("eval/accuracy",)], "fraction correct")),
    ("loss", "Loss", _simple("training loss", [("loss/dasd", "loss/total")])),
    ("entropy", "Student entropy", _simple("mean student token entropy", [("router/entropy_mean", "loss/entropy")],
                                           "nats")),
    ("omega_deciles", "Router: omega by entropy decile", plot_omega_deciles),
    ("router", "Router: pulled fraction and mean omega",
     _simple("router", [("router/omega_pos_frac",), ("router/omega_mean",), ("router/gate_mean",)])),
    ("kl", "KL to the teacher", _simple("KL(student ‖ teacher) per token", [("loss/kl",), ("loss/forward_kl",)],
                                        "nats")),
    ("response_length", "Response length", _simple("mean response length", [("rollout/response_length_mean",)],
                                                   "tokens")),
    ("markers", "Epistemic-marker density",
     _simple("epistemic markers per response", [("rollout/epistemic_marker_density",)], "markers / response")),
    ("offpolicy", "Off-policy: staleness, IS weight, mismatch",
     _simple("samples vs the trained policy", [("rollout/staleness_mean",), ("loss/is_weight_mean",),
                                               ("rollout/mismatch_kl_k3",)])),
    ("timing", "Timing", plot_timing),
)


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class ReportResult:
    out_dir: str
    report_md: str
    plots: list[str]  # absolute paths of the PNGs written
    notes: list[str]
    num_steps: int


def _summary_table(m: Metrics) -> tuple[list[str], list[str]]:
    rows, notes = [], []
    w = None
    for label, cands in SUMMARY_METRICS:
        key = m.pick(cands)
        if key is None:
            notes.append(f"{' / '.join('`' + c + '`' for c in cands)} not logged: '{label}' left out of the summary")
            continue
        t = trend(m.series(key)[1])
        w = t.window
        rows.append(f"| {label} | `{key}` | {_fmt(t.first)} | {_fmt(t.last)} | {_fmt(t.head_mean)} | "
                    f"{_fmt(t.tail_mean)} | {t.arrow} |")
    head = [f"Trend: mean of the last 20% of steps against the mean of the first 20%"
            f"{f' ({w} step(s) each)' if w else ''}; '→ flat' when they differ by under 1%.", "",
            "| metric | key | first | last | first 20% mean | last 20% mean | trend |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    return (head + rows if rows else ["No summary metric was logged."]), notes


def build_report(run_dir: str, out_dir: Optional[str] = None, *, progress: Optional[bool] = None) -> ReportResult:
    """Render the plots and `report.md` of `run_dir` into `out_dir` (default `run_dir/report`).

    Raises FileNotFoundError when there is no `metrics.jsonl`; `progress=None` shows a bar only on a terminal."""
    from tqdm import tqdm

    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}. Fix: pass the run folder of a training run "
                                "(the one holding metrics.jsonl)")
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    m = load_metrics(path)
    notes = list(m.notes)
    plots, sections = [], []
    if m.records:
        for stem, title, fn in tqdm(PLOTS, desc="report plots", unit="plot", disable=None if progress is None
                                    else not progress, leave=False):
            try:
                fig, note = fn(m)
            except Exception as e:  # one broken plot must not lose the others
                log.exception("plot %s failed", stem)
                fig, note = None, f"{title} plot failed: {type(e).__name__}: {e}"
            if fig is None:
                notes.append(note)
                continue
            png = os.path.join(out_dir, f"{stem}.png")
            fig.savefig(png, dpi=110)
            plots.append(png)
            rel = os.path.relpath(png, out_dir).replace(os.sep, "/")
            sections += [f"### {title}", "", f"![{title}]({rel})", ""]
    else:
        notes.append(f"`{METRICS_FILE}` has no records: nothing to plot")

    steps = m.steps
    times = [r["time"] for r in m.records if isinstance(r.get("time"), (int, float))]
    lines = [f"# Run report: {os.path.basename(os.path.abspath(run_dir))}", "",
             f"- Run folder: `{os.path.abspath(run_dir)}`",
             f"- Metrics: `{METRICS_FILE}`, {len(m.records)} step(s)"
             + (f" (steps {int(steps[0])} to {int(steps[-1])})" if len(steps) else ""),
             ]
    if len(times) >= 2:
        lines.append(f"- Wall-clock from first to last record: {_dt.timedelta(seconds=round(max(times) - min(times)))}")
    lines += [f"- Generated: {_dt.datetime.now().isoformat(timespec='seconds')}", ""]
    table, table_notes = _summary_table(m) if m.records else (["No records."], [])
    notes += table_notes
    lines += ["## Summary", ""] + table + [""]
    lines += ["## Router regime", ""] + ([f"- {s}" for s in router_regime(m)] if m.records else ["No records."])
    lines += ["", "## Plots", ""] + (sections or ["No plot could be drawn (see Notes).", ""])
    lines += ["## Notes", ""] + ([f"- {n}" for n in notes] or ["- every metric the report knows was present"])
    md = os.path.join(out_dir, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return ReportResult(out_dir=out_dir, report_md=md, plots=plots, notes=notes, num_steps=len(m.records))


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `report` sub-command to an argparse sub-parsers object; its handler is `args.func`."""
    p = subparsers.add_parser("report", help="plots and a Markdown summary of a run's metrics.jsonl",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run folder (holds metrics.jsonl)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args) -> int:
    try:
        res = build_report(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"dasd report: {e}", file=sys.stderr)
        return 1
    print(f"report: {res.report_md} ({res.num_steps} steps, {len(res.plots)} plots)")
    for n in res.notes:
        print(f"note: {n}")
    return 0


def main(argv=None) -> int:
    """`python -m dasd_megatron.train.run_report RUN_DIR [--out DIR]` (the same parser `dasd report` gets)."""
    parser = argparse.ArgumentParser(prog="python -m dasd_megatron")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
