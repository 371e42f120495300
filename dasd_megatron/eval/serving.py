"""Serving the model under evaluation: a HF folder or a Megatron checkpoint, on SGLang or the built-in server.

`served_model(model, ServeOptions(...))` is a context manager yielding the server URLs (and the `ServerManager`):

- a HF folder (has `config.json`) is served as is;
- a training run folder (its newest checkpoint), a training checkpoint or a Megatron distributed checkpoint
  (written by `tools/convert_hf.py import`) is first exported to a temporary HF folder inside `work_dir` with
  `dasd export CKPT --out TMP` (a separate process: megatron's parallel state stays out of this one), served, and
  removed afterwards;
- backend `sglang` launches `python -m sglang.launch_server`, `builtin` the CPU stand-in
  (`python -m sglang_rollout.builtin_server`), `auto` picks sglang when it is importable and says so.

Servers are supervised by `sglang_rollout.manager.ServerManager`: one that dies is restarted, and the rollout
client retries its requests. `tokenizer_source` names where the tokenizer of a model comes from.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

from dasd_megatron.eval.errors import EvalError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sglang", "builtin")


@dataclass(frozen=True)
class ServeOptions:
    backend: str = "auto"
    num_servers: int = 1
    tp_size: int = 1
    extra_args: tuple[str, ...] = ()
    """Extra command-line flags for each server (e.g. `--mem-fraction-static 0.8` for SGLang)."""
    log_dir: Optional[str] = None
    startup_timeout_s: float = 900.0
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise EvalError(f"--backend {self.backend!r}: unknown. Fix: use one of {', '.join(BACKENDS)}")
        if self.num_servers < 1 or self.tp_size < 1:
            raise EvalError(f"--num-servers {self.num_servers} / --tp-size {self.tp_size}: must be >= 1")


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    chosen = "sglang" if importlib.util.find_spec("sglang") is not None else "builtin"
    log.warning("--backend auto: serving with %s (%s)", chosen,
                "sglang is installed" if chosen == "sglang" else "sglang is not installed; the built-in CPU server")
    return chosen


def is_megatron_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json"))


def is_hf_folder(path: str) -> bool:
    """config.json and weights (a training run folder also has a config.json: its RunConfig)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith((".safetensors", ".bin")) for name in os.listdir(path))


def _checkpoint(path: str, shown: str):
    """The checkpoint a non-HF `--model` names (`dasd_megatron.model.convert.resolve_checkpoint`)."""
    from dasd_megatron.model.convert import resolve_checkpoint
    from dasd_megatron.model.hf_mapping import ConversionError

    try:
        return resolve_checkpoint(path)
    except ConversionError as e:
        raise EvalError(f"--model {shown}: {e}") from None


def check_model_path(model: str) -> str:
    """The absolute path of the model to evaluate: a HF folder as is; a training run folder resolves to its newest
    complete checkpoint (`RUN/checkpoints/step_N`); a checkpoint folder as is. An error says what a valid one is."""
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.isdir(path):
        raise EvalError(f"--model {model}: no such folder. Fix: give a HF model folder (config.json + safetensors), "
                        "a training run folder or one of its checkpoints, or a Megatron checkpoint folder")
    if is_hf_folder(path):
        return path
    return _checkpoint(path, model).checkpoint_dir


def tokenizer_source(model: str) -> str:
    """Where the tokenizer of `model` lives: the HF folder itself, or the checkpoint's (its `hf/` folder, or the
    model its run trained)."""
    path = check_model_path(model)
    if is_hf_folder(path):
        return path
    return _checkpoint(path, model).hf_dir


def export_checkpoint(ckpt: str, out_dir: str) -> str:
    """Megatron checkpoint -> HF folder at `out_dir` (via `dasd export`, in its own process: megatron's parallel
    state stays out of this one)."""
    cmd = [sys.executable, "-m", "dasd_megatron.cli", "export", ckpt, "--out", out_dir]
    log.warning("exporting the Megatron checkpoint %s to %s for serving", ckpt, out_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise EvalError(f"exporting {ckpt} to HF failed (exit {proc.returncode}): {tail}\nFix: check that "
                        f"`{' '.join(cmd)}` works on its own")
    return out_dir


@contextlib.contextmanager
def served_model(model: str, opts: ServeOptions, work_dir: str) -> Iterator[tuple[list[str], object]]:
    """Serve `model` (see module docstring) for the duration of the block; yields `(urls, manager)`."""
    from dasd_megatron.testing.distributed import free_port
    from sglang_rollout.manager import ManagerConfig, ServerConfig, ServerManager

    path = check_model_path(model)
    backend = resolve_backend(opts.backend)
    tmp = None
    try:
        if not is_hf_folder(path):
            os.makedirs(work_dir, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".hf_export-", dir=work_dir)
            path = export_checkpoint(path, os.path.join(tmp, "hf"))
        servers = []
        for i in range(opts.num_servers):
            gpu_ids = tuple(range(i * opts.tp_size, (i + 1) * opts.tp_size)) if backend == "sglang" else None
            log_file = os.path.join(opts.log_dir, f"server_{i}.log") if opts.log_dir else None
            try:
                servers.append(ServerConfig(model_path=path, port=free_port(), backend=backend,
                                            tp_size=opts.tp_size, gpu_ids=gpu_ids if opts.num_servers > 1 else None,
                                            log_file=log_file, extra_args=tuple(opts.extra_args)))
            except ValueError as e:  # e.g. --tp-size 2 with the built-in server
                raise EvalError(str(e)) from None
        manager = ServerManager(ManagerConfig(servers=tuple(servers), startup_timeout_s=opts.startup_timeout_s,
                                              max_restarts=opts.max_restarts))
        with manager:
            yield manager.urls, manager
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
