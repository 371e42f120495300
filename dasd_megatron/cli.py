"""The `dasd` command line.

    dasd train [--recipe R] [--nproc N] [key=value ...]  DASD training (rollouts, rewards, DASD step, weight sync)
    dasd smoke [--nproc N] [--steps K] [key=value ...]   train the policy model a few steps at a parallel layout
    dasd validate --world-size N [key=value ...]         check a config against a world size, start nothing
    dasd eval --model M --output DIR [--data D] [...]    Avg@n / Pass@k on the six DASD benchmarks or your own set
    dasd eval-report RUN_A [RUN_B]                       Markdown + Pass@k plots, side by side
    dasd sweep --recipes R1,R2 --seeds 3 --out DIR      every recipe x seed, locally or on SLURM; resumable
    dasd sweep-report DIR                                per-method means and 95% CIs across seeds, plots
    dasd report RUN_DIR [--out DIR]                      plots and a Markdown summary of a run's metrics.jsonl
    dasd export RUN_DIR [--step N] [--out DIR] [--teacher] [--adapter] [--base PATH]   the trained policy (or
                                                         teacher) as a HF folder; LoRA: merged, or a PEFT adapter
    dasd submit --recipe R --executor local|slurm [--dryrun] [key=value ...]   launch a recipe through nemo-run

Overrides are dotted config fields, e.g. `parallel.tensor=2 model.hf_config=/path/to/hf_model`. With `--nproc N`
and no torchrun environment, the command re-launches itself under `torch.distributed.run` with N processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from dasd_megatron.config import ConfigError, RunConfig, apply_overrides, to_dict
from dasd_megatron.data import DataError
from dasd_megatron.eval.cli import add_eval_parsers
from dasd_megatron.launch.cli import add_submit_parser
from dasd_megatron.launch.orphans import LAUNCHER_PID_ENV
from dasd_megatron.megatron_compat import quiet_known_warnings
from dasd_megatron.model.convert import export_summary, run_export
from dasd_megatron.model.hf_config import tiny_config
from dasd_megatron.model.hf_mapping import ConversionError
from dasd_megatron.model.pretrained import resolve_pretrained
from dasd_megatron.sweep.cli import add_sweep_parsers
from dasd_megatron.preflight import preflight
from dasd_megatron.testing.distributed import free_port
from dasd_megatron.train.metrics_log import read_metrics_jsonl
from dasd_megatron.train.run_report import add_report_parser, build_report
from recipes import get_recipe

# Imported inside the commands that train (`dasd_megatron.train.loop`, `dasd_megatron.train.smoke`): they import
# megatron-core, which only those commands need, and only after `quiet_known_warnings()`.

log = logging.getLogger("dasd")


def _default_model_dir(run_dir: str) -> str:
    """A tiny Qwen3-shaped HF config written into the run folder (random weights), for smoke runs."""
    d = os.path.join(run_dir, "tiny_qwen3")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "config.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(tiny_config("qwen3", num_hidden_layers=4, vocab_size=1024), f, indent=2)
    return d


def _with_default_model(cfg: RunConfig) -> RunConfig:
    """`cfg`, or with no `model.hf_config` the tiny random-weights model of smoke runs (`_default_model_dir`)."""
    if not cfg.model.hf_config:
        cfg = apply_overrides(cfg, [f"model.hf_config={_default_model_dir(cfg.run_dir)}"])
    return cfg


def _resolve(args) -> RunConfig:
    return _with_default_model(apply_overrides(RunConfig(), args.overrides))


def _world_size(nproc: int) -> int:
    """The world size the command will run at: torchrun's when under it, else `--nproc`."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else nproc


def _relaunch_under_torchrun(nproc: int) -> int:
    """Run this same command under torchrun with `nproc` local processes."""
    argv, skip = [], False
    for a in sys.argv[1:]:  # drop --nproc (torchrun would take it for an abbreviation of its own flag)
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "-m", "dasd_megatron.cli", *argv]
    # The ranks exit when this process or torchrun's agent is gone, whatever killed it (SIGKILL included; torchrun
    # starts them in sessions of their own, out of reach of a signal to our process group): see launch/orphans.py
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):  # `kill <our pid>`: torchrun stops its ranks cleanly, then we return its status
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    in_main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)} if in_main else {}
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group): give it time to stop the ranks
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # its ranks follow it (PR_SET_PDEATHSIG)
            proc.wait()
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _resolve_train(args) -> RunConfig:
    if args.recipe:
        return get_recipe(args.recipe).with_overrides(args.overrides).config
    return apply_overrides(RunConfig(), args.overrides)


def cmd_train(args) -> int:
    """DASD training (see dasd_megatron/train/loop.py); with --nproc N, relaunched under torchrun."""
    cfg = _resolve_train(args)  # config errors surface here, before any process starts
    # the trainer's own start checks (dasd_megatron.preflight), in one line naming the field and the fix, before
    # torchrun starts any rank (the trainer runs the same function again at start)
    preflight(cfg, _world_size(args.nproc))
    if args.nproc > 1 and "RANK" not in os.environ:
        resolve_pretrained(cfg.model.hf_config)  # a hub id is fetched or materialised once, before the ranks start
        return _relaunch_under_torchrun(args.nproc)
    from dasd_megatron.train.loop import train  # megatron-core: see the imports

    t0 = time.perf_counter()
    try:
        history = train(cfg)
    except DataError as e:  # a bad row with data.on_bad_row=error, no usable example, ...: the message has the fix
        raise ConfigError(str(e)) from None
    if int(os.environ.get("RANK", "0")) == 0 and history:
        first, last = history[0], history[-1]
        evals = _eval_points(cfg.run_dir)
        acc = (f" | eval accuracy {evals[0][1]:.1%} (step {evals[0][0]}) -> {evals[-1][1]:.1%} (step {evals[-1][0]})"
               if len(evals) >= 2 else "")
        print(f"train: {len(history)} steps in {time.perf_counter() - t0:.0f} s | reward "
              f"{first.get('rollout/reward_mean', float('nan')):.3f} -> "
              f"{last.get('rollout/reward_mean', float('nan')):.3f}{acc} | run folder {cfg.run_dir}", flush=True)
        try:
            print(f"report: {build_report(cfg.run_dir, progress=False).report_md}", flush=True)
        except Exception as e:  # noqa: BLE001 - the run is done and saved; a plotting problem must not fail it
            print(f"report: not written ({type(e).__name__}: {e}); run `dasd report {cfg.run_dir}`", flush=True)
    return 0


def _eval_points(run_dir: str) -> list[tuple[int, float]]:
    """(step, eval/accuracy) of every evaluation in the run's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    records = read_metrics_jsonl(path)[0] if os.path.exists(path) else []
    return [(int(r["step"]), float(r["eval/accuracy"])) for r in records
            if isinstance(r.get("eval/accuracy"), (int, float))]


def cmd_validate(args) -> int:
    """The trainer's preflight (dasd_megatron.preflight) at `--world-size`: data is checked when given; the weights
    of a model when one is given (with none, the layout is checked on the tiny random model of smoke runs)."""
    cfg = apply_overrides(RunConfig(), args.overrides)
    named_model = bool(cfg.model.hf_config)
    cfg = _with_default_model(cfg)
    preflight(cfg, args.world_size, need_data=False, need_weights=named_model)
    print(f"OK: {json.dumps(to_dict(cfg))}")
    return 0


def cmd_smoke(args) -> int:
    """A few optimizer steps of next-token training on a fixed random batch (dasd_megatron/train/smoke.py): proves
    the layout end to end; with --nproc N, relaunched under torchrun."""
    cfg = _resolve(args)  # config errors surface here, before any process starts
    if args.nproc > 1 and "RANK" not in os.environ:
        preflight(cfg, args.nproc, job="smoke")  # what run_smoke checks at start, before any process starts
        return _relaunch_under_torchrun(args.nproc)
    from dasd_megatron.train.smoke import run_smoke  # megatron-core: see the imports

    run_smoke(cfg, steps=args.steps, micro_batches=args.micro_batches, lr=args.lr)
    return 0


def cmd_export(args) -> int:
    """A run's newest (or `--step`) checkpoint, or any checkpoint folder, -> a Hugging Face folder."""
    logging.getLogger("dasd_megatron").setLevel(logging.WARNING)
    try:
        stats = run_export(args.path, args.out, step=args.step, teacher=args.teacher, dtype=args.dtype,
                           hf_config=args.hf_config, overwrite=args.overwrite, base=args.base, adapter=args.adapter)
    except ConversionError as e:
        print(f"dasd export: error: {e}", file=sys.stderr)
        return 2
    print(export_summary(stats))
    lora = stats.get("lora")
    if lora and lora["mode"] == "adapter":
        print(f"load it with peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({lora['base']!r}), "
              f"{stats['out_dir']!r}); or export it merged (without --adapter) for `dasd eval`")
    else:
        print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({stats['out_dir']!r}); evaluate it: "
              f"dasd eval --model {stats['out_dir']} --output runs/eval/NAME")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dasd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("smoke", help="train the policy model a few steps at a parallel layout (CPU or GPU)")
    s.add_argument("--nproc", type=int, default=1, help="processes to launch (torchrun) when not already under one")
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step per DP rank")
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tensor=2")
    s.set_defaults(func=cmd_smoke)
    t = sub.add_parser("train", help="DASD training: rollouts, rewards, the routed self-distillation step, sync")
    t.add_argument("--recipe", help="a registered recipe (see `dasd submit --list`); overrides apply on top")
    t.add_argument("--nproc", type=int, default=1, help="processes to launch (torchrun) when not already under one")
    t.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=10")
    t.set_defaults(func=cmd_train)
    v = sub.add_parser("validate", help="check a config for a world size without starting anything")
    v.add_argument("--world-size", type=int, required=True)
    v.add_argument("overrides", nargs="*")
    v.set_defaults(func=cmd_validate)
    e = sub.add_parser("export", help="a run's trained policy (or teacher) -> a Hugging Face folder",
                       description="Export the newest (or --step) checkpoint of a run, or a checkpoint folder, as a "
                                   "Hugging Face folder (safetensors, config, tokenizer) that transformers, SGLang "
                                   "and `dasd eval` load. Default output: RUN_DIR/export/step_N (-teacher). A LoRA "
                                   "run's checkpoint is merged into its base model (W + alpha/rank B A), or with "
                                   "--adapter written as a PEFT adapter folder.")
    e.add_argument("path", metavar="RUN_DIR", help="a run folder, or a checkpoint folder (RUN_DIR/checkpoints/step_N)")
    e.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    e.add_argument("--out", help="output folder (default: RUN_DIR/export/step_N)")
    e.add_argument("--teacher", action="store_true", help="export the EMA/frozen teacher instead of the policy")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="output dtype (default: the checkpoint's)")
    e.add_argument("--hf-config", help="HF folder for config/tokenizer (default: the checkpoint's own)")
    e.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    e.add_argument("--adapter", action="store_true",
                   help="LoRA checkpoints: write the adapter alone as a PEFT folder (adapter_config.json + "
                        "adapter_model.safetensors + tokenizer) instead of the merged model; reads no base weights "
                        "(default output: RUN_DIR/export/step_N-adapter)")
    e.add_argument("--base", metavar="PATH",
                   help="LoRA checkpoints: the base HF folder, when it is no longer where the run read it (default: "
                        "the recorded one; its weights' fingerprint must match the recorded one)")
    e.set_defaults(func=cmd_export)
    add_submit_parser(sub)
    add_report_parser(sub)
    add_eval_parsers(sub)
    add_sweep_parsers(sub)
    return p


def main(argv=None) -> int:
    quiet_known_warnings()
    logging.basicConfig(level=os.environ.get("DASD_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"dasd: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
