"""Evaluation of checkpoints on the six DASD math benchmarks (METHOD.md, "Evaluation protocol").

    from dasd_megatron.eval import EvalConfig, RolloutGenerator, default_client_config, run_eval

    cfg = EvalConfig(model="/models/q17b", benchmarks=("aime24", "math500"), n_samples=16)
    gen = RolloutGenerator(["http://127.0.0.1:30000"], default_client_config(cfg.n_samples, cfg.concurrency))
    result = run_eval(cfg, gen, tokenizer, run_dir="runs/eval/q17b", data_dir=resolve_data_dir())

Modules: `benchmarks` (the six sets, local files or hub), `config` (`EvalConfig`), `generation` (the `Generator`
interface and its rollout-client adapter), `serving` (serve a HF folder or Megatron checkpoint), `runner`
(`run_eval`: generate, score, record, resume), `records` (per-problem JSONL), `passk` (unbiased Pass@k), `markers`
(epistemic markers), `metrics`, `report` and `plots` (Markdown and PNG), `cli` (`dasd eval`, `dasd eval-report`),
`testing` (byte tokenizer, scripted generator).
"""

from dasd_megatron.eval.benchmarks import ALL_BENCHMARKS, BENCHMARKS, Benchmark, load_benchmark, resolve_data_dir
from dasd_megatron.eval.config import EvalConfig
from dasd_megatron.eval.errors import EvalError, EvalIncomplete
from dasd_megatron.eval.generation import (Completion, GenerationRequest, Generator, RolloutGenerator,
                                           default_client_config)
from dasd_megatron.eval.markers import MARKERS, count_markers
from dasd_megatron.eval.metrics import benchmark_metrics, macro_metrics, run_metrics
from dasd_megatron.eval.passk import default_ks, mean_pass_at_k, pass_at_k
from dasd_megatron.eval.records import read_records, read_run_records
from dasd_megatron.eval.report import load_run, write_report
from dasd_megatron.eval.runner import EvalResult, pending_problems, run_eval

__all__ = [
    "ALL_BENCHMARKS", "BENCHMARKS", "Benchmark", "Completion", "EvalConfig", "EvalError", "EvalIncomplete",
    "EvalResult", "GenerationRequest", "Generator", "MARKERS", "RolloutGenerator", "benchmark_metrics",
    "count_markers", "default_client_config", "default_ks", "load_benchmark", "load_run", "macro_metrics",
    "mean_pass_at_k", "pass_at_k", "pending_problems", "read_records", "read_run_records", "resolve_data_dir",
    "run_eval", "run_metrics", "write_report",
]
