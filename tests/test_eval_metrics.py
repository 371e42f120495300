"""Per-benchmark and macro metrics from hand-written records, epistemic-marker counting, and config validation."""

from __future__ import annotations

import pytest

from dasd_megatron.config import ConfigError
from dasd_megatron.eval.config import EvalConfig
from dasd_megatron.eval.errors import EvalError
from dasd_megatron.eval.markers import count_markers
from dasd_megatron.eval.metrics import benchmark_metrics, run_metrics


def sample(status, tokens=10, finish="stop", logprob_sum=-5.0, markers=None):
    return {"extracted": None, "status": status, "tokens": tokens, "finish": finish, "logprob_sum": logprob_sum,
            "markers": markers or {}}


def record(pid, statuses, **kw):
    samples = [sample(s, **kw) for s in statuses]
    return {"benchmark": "x", "problem_id": pid, "n": len(samples),
            "num_correct": sum(s == "correct" for s in statuses), "samples": samples}


def test_counts_markers_as_whole_words_any_case():
    text = ("Wait, WAIT... waiting. Hmm hmmm. Perhaps maybe; Actually alternatively it seems it might likely "
            "work. Let me check. Checked? check-in. MAYBE")
    assert count_markers(text) == {"wait": 2, "hmm": 1, "perhaps": 1, "maybe": 2, "actually": 1,
                                   "alternatively": 1, "seems": 1, "might": 1, "likely": 1, "check": 2}
    assert count_markers("") == {} and count_markers("awaited unlikely rechecked") == {}


def test_benchmark_metrics_by_hand():
    recs = [
        record(0, ["correct", "incorrect", "unparseable", "correct"], tokens=10, logprob_sum=-5.0,
               markers={"wait": 2}),
        record(1, ["incorrect", "incorrect", "timeout", "unparseable"], tokens=30, finish="length",
               logprob_sum=-3.0),
    ]
    m = benchmark_metrics(recs)
    assert m["problems"] == 2 and m["samples"] == 8 and m["n"] == 4
    assert m["avg_at_n"] == pytest.approx(100 * (0.5 + 0) / 2)
    # problem 0: c=2 of 4 -> pass@2 = 1 - C(2,2)/C(4,2) = 5/6; problem 1: 0
    assert m["pass_at_k"] == pytest.approx({"1": 25.0, "2": 100 * 5 / 12, "4": 50.0})
    assert m["status_counts"] == {"correct": 2, "incorrect": 3, "unparseable": 2, "timeout": 1, "error": 0}
    assert m["unparseable_pct"] == 25.0 and m["solved_problems"] == 1
    assert m["mean_length"] == 20.0 and m["truncated_pct"] == 50.0
    assert m["token_nll"] == pytest.approx((4 * 5 + 4 * 3) / (4 * 10 + 4 * 30))  # token-weighted
    assert m["markers_per_response"] == pytest.approx(2 * 4 / 8)
    assert m["markers_by_word"]["wait"] == pytest.approx(1.0) and m["markers_by_word"]["hmm"] == 0


def test_macro_is_unweighted_over_benchmarks_and_follows_order():
    big = [record(i, ["correct", "correct"]) for i in range(10)]      # 100 %
    small = [record(0, ["incorrect", "unparseable"])]                  # 0 %
    out = run_metrics({"math500": big, "aime24": small, "empty": []}, order=["aime24", "math500", "empty"])
    assert list(out["benchmarks"]) == ["aime24", "math500"]
    assert out["macro"]["benchmarks"] == ["aime24", "math500"]
    assert out["macro"]["avg_at_n"] == 50.0                      # not (10 * 100 + 0) / 11
    assert out["macro"]["pass_at_k"] == {"1": 50.0, "2": 50.0}


def test_inconsistent_records_are_refused():
    with pytest.raises(EvalError, match="mix samples-per-problem"):
        benchmark_metrics([record(0, ["correct"]), record(1, ["correct", "correct"])])
    bad = record(0, ["correct", "correct"])
    bad["samples"].pop()
    with pytest.raises(EvalError, match="has 1 samples, expected 2"):
        benchmark_metrics([bad])
    with pytest.raises(EvalError, match="no records"):
        benchmark_metrics([])


def test_eval_config_defaults_and_errors():
    cfg = EvalConfig()
    assert (cfg.n_samples, cfg.temperature, cfg.top_p) == (16, 0.6, 0.95)
    assert cfg.benchmarks == ("math500", "minerva", "olympiadbench", "aime24", "aime25", "hmmt25")
    assert cfg.ks == (1, 2, 4, 8, 16)
    assert EvalConfig(benchmarks=("HMMT_feb_2025", "minerva_math", "aime24")).benchmarks == \
        ("minerva", "aime24", "hmmt25")
    assert EvalConfig(n_samples=4, pass_k=(4, 1)).ks == (1, 4)
    with pytest.raises(ConfigError, match=r"eval.top_p=1.5"):
        EvalConfig(top_p=1.5)
    with pytest.raises(ConfigError, match=r"eval.n_samples=0"):
        EvalConfig(n_samples=0)
    with pytest.raises(ConfigError, match=r"eval.pass_k"):
        EvalConfig(n_samples=4, pass_k=(8,))
    with pytest.raises(EvalError, match="unknown benchmark 'gsm8k'"):
        EvalConfig(benchmarks=("gsm8k",))
    # what a resume must match, and what it may change
    assert EvalConfig(limit=3, concurrency=1).identity() == EvalConfig().identity()
    assert EvalConfig(seed=1).identity() != EvalConfig().identity()
