"""Metrics of an evaluation, computed from the per-problem records only (so a resumed run, or `dasd eval-report`
on the folder later, gives exactly the same numbers).

Per benchmark (percentages in 0..100):

- `avg_at_n`: mean over problems of (correct samples / n): METHOD.md's Avg@16 for n = 16.
- `pass_at_k[k]`: mean over problems of the unbiased Pass@k (`dasd_megatron.eval.passk`).
- `status_counts`: samples per scoring status; `unparseable_pct` is the share without a usable boxed answer.
- `mean_length`: mean response length in tokens; `truncated_pct`: responses that hit `max_new_tokens`.
- `token_nll`: mean over all response tokens of -log p(token), the sampled token's log-prob as the server reports
  it. This is what we report for "mean token entropy": the servers return only the sampled token's log-prob, not
  the distribution, so the full-vocabulary entropy cannot be computed here. `-log p(y_t)` with `y_t` drawn from p is
  a one-sample Monte-Carlo estimate of the entropy H(p) at that step; but SGLang (by default) and the built-in server
  report log-probs of the temperature-scaled distribution *before* top-p truncation while sampling from the
  truncated one, so with top-p < 1 it is biased low against the entropy of the tempered distribution. Compare it
  between runs with the same sampling settings, and call it what it is: sampled-token NLL (an entropy proxy).
- `markers_per_response`: mean epistemic-marker occurrences per response (`dasd_megatron.eval.markers`), and
  `markers_by_word` the same per marker word.

Macro (`macro`): the unweighted mean over the benchmarks of the run of each of the numbers above (Pass@k for the
k every benchmark has). METHOD.md's macro is over all six benchmarks: `macro.benchmarks` lists which were averaged.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Optional, Sequence

from dasd_megatron.eval.errors import EvalError
from dasd_megatron.eval.markers import MARKERS
from dasd_megatron.eval.passk import default_ks, pass_at_k
from dasd_megatron.reward import STATUSES

MACRO_FIELDS = ("avg_at_n", "unparseable_pct", "mean_length", "truncated_pct", "token_nll", "markers_per_response")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def benchmark_metrics(records: Sequence[Mapping], ks: Optional[Sequence[int]] = None) -> dict:
    """Metrics of one benchmark's records (see module docstring); `ks` defaults to powers of two up to n."""
    if not records:
        raise EvalError("no records to compute metrics from. Fix: run `dasd eval` first (or widen --benchmarks)")
    ns = {int(r["n"]) for r in records}
    if len(ns) != 1:
        raise EvalError(f"records mix samples-per-problem values {sorted(ns)}; Pass@k needs one n. Fix: evaluate "
                        "into separate output folders")
    n = ns.pop()
    ks = [k for k in (ks or default_ks(n)) if k <= n]
    correct = []
    statuses: Counter = Counter()
    lengths, truncated, markers = [], [], []
    by_word: Counter = Counter()
    nll_sum, nll_tokens = 0.0, 0
    for r in records:
        samples = r["samples"]
        if len(samples) != n:
            raise EvalError(f"record of problem {r.get('problem_id')} has {len(samples)} samples, expected {n}")
        c = sum(s["status"] == "correct" for s in samples)
        correct.append(c)
        for s in samples:
            statuses[s["status"]] += 1
            lengths.append(s["tokens"])
            truncated.append(s["finish"] == "length")
            m = s.get("markers") or {}
            markers.append(sum(m.values()))
            by_word.update(m)
            if s.get("logprob_sum") is not None and s["tokens"]:
                nll_sum -= s["logprob_sum"]
                nll_tokens += s["tokens"]
    total = len(lengths)
    return {
        "problems": len(records),
        "samples": total,
        "n": n,
        "avg_at_n": 100.0 * _mean([c / n for c in correct]),
        "pass_at_k": {str(k): 100.0 * _mean([pass_at_k(n, c, k) for c in correct]) for k in ks},
        "solved_problems": sum(c > 0 for c in correct),
        "status_counts": {s: statuses.get(s, 0) for s in STATUSES},
        "unparseable_pct": 100.0 * statuses.get("unparseable", 0) / total,
        "mean_length": _mean(lengths),
        "truncated_pct": 100.0 * _mean([float(t) for t in truncated]),
        "token_nll": nll_sum / nll_tokens if nll_tokens else float("nan"),
        "markers_per_response": _mean(markers),
        "markers_by_word": {w: by_word.get(w, 0) / total for w in MARKERS},
    }


def macro_metrics(per_benchmark: Mapping[str, Mapping]) -> dict:
    """Unweighted means over benchmarks (see module docstring)."""
    if not per_benchmark:
        return {"benchmarks": []}
    vals = list(per_benchmark.values())
    common = set.intersection(*(set(m["pass_at_k"]) for m in vals))
    out = {"benchmarks": list(per_benchmark)}
    for f in MACRO_FIELDS:
        out[f] = _mean([m[f] for m in vals])
    out["pass_at_k"] = {k: _mean([m["pass_at_k"][k] for m in vals]) for k in sorted(common, key=int)}
    return out


def run_metrics(records: Mapping[str, Sequence[Mapping]], ks: Optional[Sequence[int]] = None,
                order: Optional[Iterable[str]] = None) -> dict:
    """`{"benchmarks": {key: metrics}, "macro": {...}}` for the benchmarks of `records` that have any, in `order`."""
    keys = [k for k in (order if order is not None else records) if records.get(k)]
    per = {k: benchmark_metrics(records[k], ks) for k in keys}
    return {"benchmarks": per, "macro": macro_metrics(per)}
