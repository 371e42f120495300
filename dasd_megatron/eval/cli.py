"""`dasd eval` and `dasd eval-report`.

    dasd eval --model CKPT_OR_HF_DIR --output runs/eval/q17b_dasd              # all six benchmarks, n = 16
    dasd eval --model /ckpts/iter_0000500 --output runs/eval/it500 --benchmarks aime24,aime25 --limit 5 --n-samples 4
    dasd eval --server-url http://node1:30000 --server-url http://node2:30000 --tokenizer /models/Qwen3-1.7B \\
        --output runs/eval/q17b                                                  # servers that are already running
    dasd eval --model CKPT --output runs/eval/heldout --data heldout.jsonl      # your own held-out set
    dasd eval --model CKPT --output runs/eval/gsm8k --data openai/gsm8k --subset main --schema gsm8k
    dasd eval-report runs/eval/grpo runs/eval/dasd                               # side-by-side (B - A)

`--model` takes a HF folder or a Megatron checkpoint (exported to a temporary HF folder first) and serves it with
SGLang or the built-in CPU server (`--backend`). Sampling defaults are METHOD.md's (temperature 0.6, top-p 0.95).
Benchmarks load from the local data folder when there is one (`--data-dir`, `DASD_EVAL_DATA_DIR`, or
../shared/data next to the repository), else from the Hugging Face hub (`--hub` forces the hub).

`--data` evaluates your own set: a .jsonl/.json/.parquet/.csv file or folder, or a hub id, read exactly as training
reads `data.source` (schemas dapo, gsm8k, math, minerva, olympiadbench, aime, plain, detected with `auto`; field
overrides `--problem-field`, `--answer-field`, `--solution-field`; rows that cannot be used are skipped and logged).
It is one more benchmark, named after the file (`--data-name` to choose): `records/<name>.jsonl`, its own row in
metrics.json and the report. With `--data`, only that set is evaluated unless `--benchmarks` is given too.

Everything lands in `--output`: `records/<benchmark>.jsonl` (one line per problem, written as soon as it is scored),
`metrics.json`, `report.md` and `pass_at_k.png`. If the run stops (a server died, Ctrl-C), rerun the same command:
recorded problems are skipped and the final metrics are those of the uninterrupted run. Exit status: 0 done,
1 incomplete (rerun to resume), 2 bad settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dasd_megatron.data.config import SCHEMAS

log = logging.getLogger("dasd.eval")


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4,8,16") from None


def add_eval_parsers(subparsers) -> None:
    """Add `eval` and `eval-report` to an argparse sub-parsers object; each handler is `args.func`."""
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on the math benchmarks (Avg@n, Pass@k, ...)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to evaluate")
    src = what.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model folder, training run folder (its newest checkpoint), or checkpoint "
                                     "folder to serve and evaluate")
    src.add_argument("--server-url", action="append", help="a running SGLang-compatible server (repeatable)")
    what.add_argument("--tokenizer", help="tokenizer folder (default: the model's HF folder / the server's model)")
    what.add_argument("--model-name", help="the model's name in the run identity (default: --model's path, or the "
                                           "served model's path)")
    p.add_argument("--output", required=True, help="run folder (records, metrics, report); rerun to resume")
    data = p.add_argument_group("benchmarks")
    data.add_argument("--benchmarks", help="comma-separated subset of math500, minerva, olympiadbench, aime24, "
                                           "aime25, hmmt25, or 'all' (default: all; none with --data)")
    data.add_argument("--limit", type=int, help="first N problems of each benchmark (quick runs)")
    data.add_argument("--data-dir", help="folder with the local benchmark copies (default: see above)")
    data.add_argument("--hub", action="store_true", help="load the benchmarks from the Hugging Face hub")
    own = p.add_argument_group("your own evaluation set (read like training's data.*)")
    own.add_argument("--data", metavar="PATH_OR_HUB_ID",
                     help="a .jsonl/.json/.parquet/.csv file or folder, or a hub id, evaluated as one more benchmark")
    own.add_argument("--data-name", help="its name in records/<name>.jsonl and the report (default: from the file)")
    own.add_argument("--schema", default="auto", choices=SCHEMAS, help="column layout (default: detected)")
    own.add_argument("--problem-field", help="column holding the problem (dotted for nested fields)")
    own.add_argument("--answer-field", help="column holding the gold answer (dotted, e.g. reward_model.ground_truth)")
    own.add_argument("--solution-field", help="column holding a worked solution")
    own.add_argument("--split", default="test", help="hub split, or the file-name prefix in a folder (default test)")
    own.add_argument("--subset", help="hub configuration name (openai/gsm8k needs 'main')")
    s = p.add_argument_group("sampling")
    s.add_argument("--n-samples", "-n", type=int, default=16, help="samples per problem (default 16)")
    s.add_argument("--temperature", type=float, default=0.6)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--max-new-tokens", type=int, default=32768)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--pass-k", type=_csv_ints, help="k values of Pass@k (default: powers of two up to n)")
    s.add_argument("--system-prompt", help="system message before the problem")
    s.add_argument("--instruction", help="the request after the problem (as training's data.prompt.instruction; "
                                         "default: think step by step and box the answer)")
    s.add_argument("--enable-thinking", choices=("true", "false"),
                   help="passed to the chat template (Qwen3); default: the template's default")
    s.add_argument("--chat-template", choices=("auto", "plain"), default="auto")
    sc = p.add_argument_group("scoring")
    sc.add_argument("--answer-line-fallback", action="store_true",
                    help="also accept a last 'Answer: ...' line when there is no \\boxed{} (off by default)")
    sc.add_argument("--last-number-fallback", action="store_true",
                    help="then also accept the response's last number (as training's reward.last_number_fallback; "
                         "the main job's recipe uses it)")
    sc.add_argument("--reward-workers", type=int, default=2, help="math-verify worker processes")
    sc.add_argument("--save-responses", action="store_true", help="store each response's text in the records")
    sv = p.add_argument_group("serving")
    sv.add_argument("--backend", choices=("auto", "sglang", "builtin"), default="auto",
                    help="server for --model: sglang when installed (auto), or the built-in CPU server")
    sv.add_argument("--num-servers", type=int, default=1)
    sv.add_argument("--tp-size", type=int, default=1, help="GPUs per SGLang server")
    sv.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra server flag, repeatable (e.g. --server-arg=--mem-fraction-static --server-arg=0.8)")
    sv.add_argument("--concurrency", type=int, default=32, help="problems generated at the same time")
    sv.add_argument("--request-timeout", type=float, default=3600.0, help="seconds for one problem's samples")
    sv.add_argument("--max-retries", type=int, default=5, help="retries of a failed request before giving up")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    r = subparsers.add_parser("eval-report", help="report of one eval run, or a side-by-side of two",
                              description="Recompute metrics from the records of RUN_A (and RUN_B) and write "
                                          "report.md and pass_at_k.png (differences are B - A).")
    r.add_argument("run_a", metavar="RUN_A")
    r.add_argument("run_b", metavar="RUN_B", nargs="?")
    r.add_argument("--output", help="where to write (default: RUN_A, or RUN_A/vs_<name of RUN_B>)")
    r.set_defaults(func=cmd_eval_report)


def eval_config(args, model_name: str):
    from dasd_megatron.data import PromptConfig
    from dasd_megatron.eval.benchmarks import ALL_BENCHMARKS, custom_data_config
    from dasd_megatron.eval.config import EvalConfig

    thinking = None if args.enable_thinking is None else args.enable_thinking == "true"
    names = args.benchmarks if args.benchmarks is not None else ("" if args.data else "all")
    benchmarks = ALL_BENCHMARKS if names.strip().lower() == "all" else tuple(n for n in names.split(",") if n.strip())
    data = ()
    if args.data is not None:
        data = (custom_data_config(args.data, name=args.data_name, split=args.split, subset=args.subset,
                                   schema=args.schema, problem_field=args.problem_field,
                                   answer_field=args.answer_field, solution_field=args.solution_field),)
    return EvalConfig(
        model=model_name, benchmarks=benchmarks, data=data, n_samples=args.n_samples, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed, pass_k=args.pass_k,
        limit=args.limit, concurrency=args.concurrency, answer_line_fallback=args.answer_line_fallback,
        last_number_fallback=args.last_number_fallback,
        reward_workers=args.reward_workers, save_responses=args.save_responses,
        prompt=PromptConfig(system_prompt=args.system_prompt, enable_thinking=thinking, instruction=args.instruction,
                            chat_template=args.chat_template),
    )


def _served_model_path(urls) -> str:
    from sglang_rollout.http_client import HttpClient
    from sglang_rollout.server_client import ServerClient

    try:
        info = ServerClient(urls[0], HttpClient()).model_info()
    except Exception as e:  # noqa: BLE001 - reported with the fix
        from dasd_megatron.eval.errors import EvalError

        raise EvalError(f"--server-url {urls[0]}: /model_info failed ({e}). Fix: check that the server is up") from e
    return str(info.get("model_path") or "")


def _run(args) -> int:
    from dasd_megatron.data import load_tokenizer
    from dasd_megatron.eval.benchmarks import resolve_data_dir
    from dasd_megatron.eval.errors import EvalError
    from dasd_megatron.eval.generation import RolloutGenerator, default_client_config
    from dasd_megatron.eval.runner import format_summary, pending_problems, run_eval
    from dasd_megatron.eval.serving import ServeOptions, check_model_path, served_model, tokenizer_source

    data_dir = resolve_data_dir(args.data_dir, args.hub)
    if args.data is None or args.benchmarks:
        print(f"benchmarks from {data_dir or 'the Hugging Face hub'}", file=sys.stderr)
    if args.data is not None:
        print(f"evaluation set {args.data}", file=sys.stderr)

    def finish(result) -> int:
        print(format_summary(result.metrics))
        print(f"records, metrics.json, report.md and pass_at_k.png in {args.output} ({result.generated} problems "
              f"generated, {result.resumed} resumed)")
        return 0

    def evaluate(cfg, urls, tokenizer_path, on_error=None) -> int:
        gen = RolloutGenerator(urls, default_client_config(cfg.n_samples, cfg.concurrency, len(urls),
                                                           request_timeout_s=args.request_timeout,
                                                           max_retries=args.max_retries),
                               on_server_error=on_error)
        return finish(run_eval(cfg, gen, load_tokenizer(tokenizer_path), args.output, data_dir=data_dir,
                               progress=not args.no_progress))

    if args.server_url:
        urls = list(args.server_url)
        cfg = eval_config(args, args.model_name or _served_model_path(urls))
        if pending_problems(cfg, args.output, data_dir) == 0:
            return finish(run_eval(cfg, None, None, args.output, data_dir=data_dir))
        tokenizer_path = args.tokenizer or cfg.model
        if not tokenizer_path or not os.path.isdir(tokenizer_path):
            raise EvalError(f"no local tokenizer for the served model ({tokenizer_path!r}). Fix: pass --tokenizer "
                            "with the model's HF folder")
        return evaluate(cfg, urls, tokenizer_path)
    model = check_model_path(args.model)
    cfg = eval_config(args, args.model_name or model)
    if pending_problems(cfg, args.output, data_dir) == 0:  # all recorded: no server needed
        return finish(run_eval(cfg, None, None, args.output, data_dir=data_dir))
    tokenizer_path = args.tokenizer or tokenizer_source(model)
    opts = ServeOptions(backend=args.backend, num_servers=args.num_servers, tp_size=args.tp_size,
                        extra_args=tuple(args.server_arg), log_dir=os.path.join(args.output, "server_logs"))
    os.makedirs(args.output, exist_ok=True)
    with served_model(model, opts, work_dir=args.output) as (urls, manager):
        return evaluate(cfg, urls, tokenizer_path, manager.report_failure)


def cmd_eval(args) -> int:
    from dasd_megatron.config import ConfigError
    from dasd_megatron.data import DataError
    from dasd_megatron.eval.errors import EvalError, EvalIncomplete

    try:
        return _run(args)
    except EvalIncomplete as e:
        print(f"dasd eval: incomplete: {e}", file=sys.stderr)
        return 1
    except (EvalError, ConfigError, DataError) as e:
        print(f"dasd eval: error: {e}", file=sys.stderr)
        return 2


def cmd_eval_report(args) -> int:
    from dasd_megatron.eval.errors import EvalError
    from dasd_megatron.eval.report import load_run, write_report

    try:
        runs = [load_run(args.run_a)] + ([load_run(args.run_b)] if args.run_b else [])
    except EvalError as e:
        print(f"dasd eval-report: error: {e}", file=sys.stderr)
        return 2
    out = args.output or (args.run_a if not args.run_b else os.path.join(args.run_a, f"vs_{runs[1][0]}"))
    path = write_report([(name, m) for name, m, _ in runs], out, records=[rec for _, _, rec in runs])
    print(f"report: {path}")
    return 0


def main(argv=None) -> int:
    """`python -m dasd_megatron.eval eval|eval-report ...` (the parsers `dasd eval` and `dasd eval-report` use)."""
    logging.basicConfig(level=os.environ.get("DASD_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m dasd_megatron.eval")
    add_eval_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
