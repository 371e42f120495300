"""The evaluation report: Markdown tables per benchmark and macro, Pass@k curves, and a side-by-side of two runs.

`write_report([(name, metrics)], out_dir)` writes `report.md` and `pass_at_k.png` for one run;
`write_report([(name_a, metrics_a), (name_b, metrics_b)], out_dir, records=[records_a, records_b])` writes the
comparison: each metric for A, B and the difference B - A, and, from the per-problem records, how many problems
each run solves (at least one correct sample) that the other does not. `load_run(run_dir)` recomputes a run's
metrics from its records (what `dasd eval-report` does), so a report never depends on a stale `metrics.json`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

from dasd_megatron.eval.benchmarks import ALL_BENCHMARKS, BENCHMARKS
from dasd_megatron.eval.errors import EvalError
from dasd_megatron.eval.metrics import run_metrics
from dasd_megatron.eval.records import read_manifest, read_run_records
from dasd_megatron.reward import STATUSES

REPORT_FILE = "report.md"
PLOT_FILE = "pass_at_k.png"

NOTES = """\
Notes. Avg@n: mean over problems of the fraction of the n samples that are correct. Pass@k: the unbiased estimator
1 - C(n-c, k)/C(n, k), averaged over problems (Pass@1 = Avg@n). Macro: the unweighted mean over the benchmarks
listed. Answers: the last `\\boxed{}` of a response, checked with math-verify; a response without one is
"unparseable" and counts as wrong. Token NLL: the mean over response tokens of -log p of the sampled token as the
server reports it, a proxy for the mean token entropy (the servers do not return full distributions). Markers:
occurrences of wait, hmm, perhaps, maybe, actually, alternatively, seems, might, likely, check (whole words, any
case) per response."""


def _name(key: str) -> str:
    return BENCHMARKS[key].name if key in BENCHMARKS else key


def _f(x: Optional[float], digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _d(a: Optional[float], b: Optional[float], digits: int = 1) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "–"
    d = round(b - a, digits)
    return f"{d if d != 0 else 0.0:+.{digits}f}"  # no "-0.0"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _order(metrics_list: Sequence[dict]) -> list[str]:
    keys: list[str] = []
    for m in metrics_list:
        keys += [k for k in m["benchmarks"] if k not in keys]
    return sorted(keys, key=lambda k: ALL_BENCHMARKS.index(k) if k in ALL_BENCHMARKS else len(ALL_BENCHMARKS))


def _macro_label(m: dict) -> str:
    return f"**macro** ({len(m['macro'].get('benchmarks', []))})"


def _settings_line(m: dict) -> str:
    s = m.get("settings") or {}
    if not s:
        return ""
    return (f"model `{s.get('model')}`, n = {s.get('n_samples')}, temperature {s.get('temperature')}, top-p "
            f"{s.get('top_p')}, max new tokens {s.get('max_new_tokens')}, seed {s.get('seed')}")


def single_report(name: str, m: dict) -> str:
    """Markdown report of one run."""
    keys = _order([m])
    n = next(iter(m["benchmarks"].values()))["n"] if m["benchmarks"] else 0
    ks = [k for k in (m["macro"].get("pass_at_k") or {}) if k != "1"]
    lines = [f"# Evaluation: {name}", ""]
    if _settings_line(m):
        lines += [_settings_line(m), ""]
    lines += ["## Accuracy (%)", ""]
    rows = []
    for key in keys:
        b = m["benchmarks"][key]
        rows.append([_name(key), str(b["problems"]), _f(b["avg_at_n"])] + [_f(b["pass_at_k"].get(k)) for k in ks])
    if m["macro"].get("benchmarks"):
        rows.append([_macro_label(m), "", _f(m["macro"]["avg_at_n"])] + [_f(m["macro"]["pass_at_k"].get(k))
                                                                         for k in ks])
    lines += _table(["benchmark", "problems", f"Avg@{n}"] + [f"Pass@{k}" for k in ks], rows)
    lines += ["", "## Reasoning health", ""]
    rows = []
    for key in keys:
        b = m["benchmarks"][key]
        rows.append([_name(key), _f(b["mean_length"], 0), _f(b["truncated_pct"]), _f(b["token_nll"], 3),
                     _f(b["markers_per_response"], 2), _f(b["unparseable_pct"])])
    if m["macro"].get("benchmarks"):
        mm = m["macro"]
        rows.append([_macro_label(m), _f(mm["mean_length"], 0), _f(mm["truncated_pct"]), _f(mm["token_nll"], 3),
                     _f(mm["markers_per_response"], 2), _f(mm["unparseable_pct"])])
    lines += _table(["benchmark", "mean length (tokens)", "truncated %", "token NLL (entropy proxy)",
                     "markers / response", "unparseable %"], rows)
    lines += ["", "## Scoring (samples per status)", ""]
    rows = [[_name(k)] + [str(m["benchmarks"][k]["status_counts"].get(s, 0)) for s in STATUSES] for k in keys]
    lines += _table(["benchmark", *STATUSES], rows)
    lines += ["", f"![Pass@k]({PLOT_FILE})", "", NOTES, ""]
    return "\n".join(lines)


def _solved(records: Mapping[str, Sequence[dict]]) -> dict[tuple, bool]:
    return {(key, r["problem_id"], r.get("problem_hash")): r["num_correct"] > 0
            for key, recs in records.items() for r in recs}


def compare_report(a: tuple[str, dict], b: tuple[str, dict],
                   records: Optional[tuple[Mapping, Mapping]] = None) -> str:
    """Markdown side-by-side of runs A and B (differences are B - A)."""
    (na, ma), (nb, mb) = a, b
    keys = _order([ma, mb])
    lines = [f"# Evaluation: {na} (A) vs {nb} (B)", ""]
    for tag, m in (("A", ma), ("B", mb)):
        if _settings_line(m):
            lines.append(f"- {tag}: {_settings_line(m)}")
    lines += ["", "## Accuracy (%)", ""]

    def pair(ba: Optional[dict], bb: Optional[dict], field: str, digits: int = 1, k: Optional[str] = None):
        va = None if ba is None else (ba[field] if k is None else ba[field].get(k))
        vb = None if bb is None else (bb[field] if k is None else bb[field].get(k))
        return [_f(va, digits), _f(vb, digits), _d(va, vb, digits)]

    common_ks = sorted(set(ma["macro"].get("pass_at_k") or {}) & set(mb["macro"].get("pass_at_k") or {}), key=int)
    kmax = common_ks[-1] if common_ks else None
    entries = [(_name(k), ma["benchmarks"].get(k), mb["benchmarks"].get(k)) for k in keys]
    if ma["macro"].get("benchmarks") and mb["macro"].get("benchmarks"):
        entries.append(("**macro**", ma["macro"], mb["macro"]))
    ns = {b["n"] for m in (ma, mb) for b in m["benchmarks"].values()}
    avg = f"Avg@{ns.pop()}" if len(ns) == 1 else "Avg@n"
    header = ["benchmark", f"{avg} A", f"{avg} B", "Δ"]
    if kmax:
        header += [f"Pass@{kmax} A", f"Pass@{kmax} B", "Δ"]
    rows = []
    for label, ba, bb in entries:
        row = [label] + pair(ba, bb, "avg_at_n")
        if kmax:
            row += pair(ba, bb, "pass_at_k", k=kmax)
        rows.append(row)
    lines += _table(header, rows)
    if common_ks:
        lines += ["", "## Pass@k (%), A / B", ""]
        rows = []
        for label, ba, bb in entries:
            rows.append([label] + [f"{_f(None if ba is None else ba['pass_at_k'].get(k))} / "
                                   f"{_f(None if bb is None else bb['pass_at_k'].get(k))}" for k in common_ks])
        lines += _table(["benchmark"] + [f"Pass@{k}" for k in common_ks], rows)
    lines += ["", "## Reasoning health", ""]
    rows = []
    for label, ba, bb in entries:
        rows.append([label] + pair(ba, bb, "mean_length", 0) + pair(ba, bb, "token_nll", 3)
                    + pair(ba, bb, "markers_per_response", 2) + pair(ba, bb, "unparseable_pct"))
    lines += _table(["benchmark", "length A", "length B", "Δ", "NLL A", "NLL B", "Δ", "markers A", "markers B", "Δ",
                     "unparseable % A", "unparseable % B", "Δ"], rows)
    if records is not None:
        sa, sb = _solved(records[0]), _solved(records[1])
        lines += ["", "## Problems solved (at least one correct sample), on the problems both runs recorded", ""]
        rows = []
        for key in keys:
            common = [p for p in sa if p[0] == key and p in sb]
            both = sum(sa[p] and sb[p] for p in common)
            only_a = sum(sa[p] and not sb[p] for p in common)
            only_b = sum(sb[p] and not sa[p] for p in common)
            rows.append([_name(key), str(len(common)), str(both), str(only_a), str(only_b),
                         str(len(common) - both - only_a - only_b)])
        lines += _table(["benchmark", "common problems", "both", "only A", "only B", "neither"], rows)
    lines += ["", f"![Pass@k]({PLOT_FILE})", "", NOTES, ""]
    return "\n".join(lines)


def write_report(runs: Sequence[tuple[str, dict]], out_dir: str,
                 records: Optional[Sequence[Mapping]] = None) -> Path:
    """Write `report.md` and `pass_at_k.png` for one run or a side-by-side of two; returns the report's path."""
    from dasd_megatron.eval.plots import plot_pass_at_k

    if len(runs) not in (1, 2):
        raise ValueError(f"a report covers one or two runs, got {len(runs)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(runs) == 1:
        text = single_report(*runs[0])
    else:
        text = compare_report(runs[0], runs[1], None if records is None else (records[0], records[1]))
    plot_pass_at_k(runs, str(out / PLOT_FILE))
    path = out / REPORT_FILE
    path.write_text(text, encoding="utf-8")
    return path


def load_run(run_dir: str) -> tuple[str, dict, dict]:
    """`(name, metrics, records)` of a run folder, the metrics recomputed from all of its records."""
    records = read_run_records(run_dir)
    manifest = read_manifest(run_dir) or {}
    metrics = run_metrics(records, order=[k for k in ALL_BENCHMARKS if k in records]
                          + [k for k in records if k not in ALL_BENCHMARKS])
    if not metrics["benchmarks"]:
        raise EvalError(f"{run_dir}: no records yet. Fix: run `dasd eval --output {run_dir} ...` first")
    metrics["settings"] = manifest
    return Path(run_dir).resolve().name, metrics, records
