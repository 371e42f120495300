"""`MetricsLogger`: the per-step metrics sink of a training run (rank 0 only).

Every `log(step, metrics)` call writes the step's scalars to

- `RUN_DIR/metrics.jsonl`: one JSON object per line, `{"step": 12, "time": <unix seconds>, "<key>": value, ...}`.
  Non-finite numbers (NaN, +-inf) are written as `null`, so every line is strict JSON. Each line is flushed as it is
  written, so the file can be followed (and `dasd report` run on it) while training goes on.
- TensorBoard (`RUN_DIR/tb/`, `torch.utils.tensorboard.SummaryWriter`): one scalar per finite numeric value.
- Weights & Biases, when a `wandb` dict (`project`, `name`, `entity`, and optionally `id`, `group`, `tags`,
  `config`, any other `wandb.init` keyword) is given *and* the `wandb` package imports; otherwise one warning per
  process says it is not installed and the run goes on with JSONL and TensorBoard.

The logger is agnostic of key names; the training loop uses namespaced keys (DESIGN.md convention 7), among them
`rollout/reward_mean`, `rollout/accuracy`, `rollout/response_length_mean`, `rollout/epistemic_marker_density`,
`loss/dasd`, `loss/kl`, `router/omega_pos_frac`, `router/omega_mean_decile_{0..9}` and
`router/entropy_mean_decile_{0..9}` (the keys of `dasd_megatron.loss.metrics`), `timing/step_s`, `timing/rollout_s`,
`timing/train_s`, `timing/sync_s`, `throughput/tokens_per_s`.

Resume (`resume_step=k`, the step of the checkpoint being resumed): lines of `metrics.jsonl` with `step > k` are
dropped, as are unparseable lines (a line cut short by a kill), by writing the kept lines to a temporary file in the
same folder and renaming it over the original (atomic on POSIX). A run killed after logging step k+1 but before
checkpointing it therefore logs step k+1 exactly once. TensorBoard gets `purge_step=k+1`, which hides the orphaned
events of steps > k from readers.

`console_line(step, metrics)` formats the one console line per step (whichever of the usual keys are present).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "format_console_line", "read_metrics_jsonl", "METRICS_FILE", "TB_DIR"]

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
_RESERVED = ("step", "time")
_wandb_warned = False


def _to_number(value: Any) -> Any:
    """A plain Python scalar for `value` (tensors and numpy scalars via `.item()`); non-numbers are returned as is."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a multi-element tensor/array: not a scalar metric
            return value
    return value


def _jsonable(value: Any) -> Any:
    """JSON value of one metric: finite numbers as they are, non-finite as None, strings/None kept, else str()."""
    value = _to_number(value)
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _finite_float(value: Any) -> Optional[float]:
    """`value` as a finite float, or None (non-numeric or non-finite: not written to TensorBoard / W&B)."""
    value = _to_number(value)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


def read_jsonl_objects(path: str, keep=lambda obj: True) -> tuple[list[dict], int]:
    """The JSON-object lines of `path` that `keep` accepts (in file order) and the number of lines that were not
    (unparseable, not an object, or refused)."""
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict) and keep(obj):
                records.append(obj)
            else:
                bad += 1
    return records, bad


def read_metrics_jsonl(path: str) -> tuple[list[dict], int]:
    """The parseable metrics lines of `path` (JSON objects with a numeric `step`, in file order) and the number of
    lines that were not."""
    return read_jsonl_objects(path, lambda obj: isinstance(obj.get("step"), (int, float)))


def truncate_jsonl_after(path: str, resume_step: int) -> tuple[int, int]:
    """Keep the lines of `path` with step <= resume_step (atomically); returns (kept, dropped)."""
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            s = line.strip()
            if not s:
                continue
            try:
                obj = json.loads(s)
                step = obj["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                dropped += 1
                continue
            if isinstance(step, (int, float)) and step <= resume_step:
                kept.append(s)
            else:
                dropped += 1
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for s in kept:
                f.write(s + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(kept), dropped


# (label, candidate keys in order of preference, format) of the console line; the first key present is shown.
_CONSOLE_FIELDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("loss", ("loss/dasd", "loss/total"), "{:.4f}"),
    ("reward", ("rollout/reward_mean",), "{:.3f}"),
    ("acc", ("rollout/accuracy",), "pct"),
    ("ent", ("router/entropy_mean", "loss/entropy"), "{:.3f}"),
    ("kl", ("loss/kl",), "{:.4f}"),
    ("w>0", ("router/omega_pos_frac",), "pct"),
    ("len", ("rollout/response_length_mean",), "{:.0f}"),
    ("eval", ("eval/accuracy",), "pct"),
    ("step", ("timing/step_s",), "secs"),
    ("tok/s", ("throughput/tokens_per_s",), "si"),
)


def _fmt(value: Any, how: str) -> str:
    v = _to_number(value)
    if isinstance(v, bool):
        v = float(v)
    if not isinstance(v, (int, float)):
        return str(v)
    v = float(v)
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if how == "pct":
        return f"{100.0 * v:.1f}%"
    if how == "secs":
        return f"{v:.2f}s" if v < 100 else f"{v:.0f}s"
    if how == "si":
        for unit, scale in (("M", 1e6), ("k", 1e3)):
            if abs(v) >= scale:
                return f"{v / scale:.1f}{unit}"
        return f"{v:.0f}"
    return how.format(v)


def format_console_line(step: int, metrics: Mapping[str, Any]) -> str:
    """`step 12 | loss 0.1234 | reward 0.531 | acc 47.0% | ent 0.812 | kl 0.0123 | w>0 80.0% | len 512 | step 12.30s
    | tok/s 4.5k`, with only the fields whose keys are present (`w>0`: fraction of tokens with omega > 0)."""
    parts = [f"step {int(step)}"]
    for label, keys, how in _CONSOLE_FIELDS:
        for k in keys:
            if k in metrics and metrics[k] is not None:
                parts.append(f"{label} {_fmt(metrics[k], how)}")
                break
    return " | ".join(parts)


class MetricsLogger:
    """Per-step metrics to JSONL, TensorBoard and (optionally) W&B; a no-op unless `enabled` (pass it only on the
    logging rank: `enabled=ctx.is_logging_rank`). Use as a context manager or call `close()`."""

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True,
                 wandb: Optional[Mapping[str, Any]] = None, resume_step: Optional[int] = None):
        self.run_dir = run_dir
        self.enabled = bool(enabled)
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = None
        self._tb = None
        self._wandb_run = None
        self._last_step: Optional[int] = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            kept, dropped = truncate_jsonl_after(self.path, int(resume_step))
            if dropped:
                log.info("resume at step %d: dropped %d line(s) of %s after that step (or unparseable), kept %d",
                         resume_step, dropped, self.path, kept)
        elif resume_step is None and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            log.warning("%s already has metrics and no resume step was given: appending to it", self.path)
        self._open_jsonl()
        if tensorboard:
            self._tb = self._open_tensorboard(resume_step)
        if wandb is not None:
            self._wandb_run = self._open_wandb(dict(wandb), resume_step)

    # --- sinks -------------------------------------------------------------------------------------------------
    def _open_jsonl(self) -> None:
        needs_newline = False
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"  # a line cut short by a kill: do not glue the next one to it
        self._file = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")

    def _open_tensorboard(self, resume_step: Optional[int]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is a declared dependency; a broken install should not stop training
            log.warning("TensorBoard logging disabled: %s. Fix: pip install tensorboard", e)
            return None
        purge = int(resume_step) + 1 if resume_step is not None else None
        return SummaryWriter(log_dir=os.path.join(self.run_dir, TB_DIR), purge_step=purge)

    def _open_wandb(self, cfg: dict, resume_step: Optional[int]):
        global _wandb_warned
        try:
            import wandb
        except ImportError:
            if not _wandb_warned:
                log.warning("W&B logging was requested (project=%r) but the `wandb` package is not installed; "
                            "logging to %s and TensorBoard only. Fix: pip install wandb",
                            cfg.get("project"), METRICS_FILE)
                _wandb_warned = True
            return None
        kwargs = {k: v for k, v in cfg.items() if v is not None}
        kwargs.setdefault("dir", self.run_dir)
        if resume_step is not None and "id" in kwargs:
            kwargs.setdefault("resume", "allow")
        return wandb.init(**kwargs)

    # --- API ---------------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one step's metrics to every sink (no-op when disabled)."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsLogger({self.run_dir!r}) is closed")
        bad = [k for k in _RESERVED if k in metrics]
        if bad:
            raise ValueError(f"metric keys {bad} are reserved by the JSONL record; use a namespaced key "
                             "such as 'timing/...'")
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            log.warning("metrics step %d logged after step %d: steps should increase", step, self._last_step)
        self._last_step = step
        record = {"step": step, "time": time.time()}
        for k, v in metrics.items():
            record[str(k)] = _jsonable(v)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        scalars = {k: f for k, f in ((str(k), _finite_float(v)) for k, v in metrics.items()) if f is not None}
        if self._tb is not None:
            for k, f in scalars.items():
                self._tb.add_scalar(k, f, global_step=step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)

    def console_line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """The one console line of a step (see `format_console_line`); works whether or not logging is enabled."""
        return format_console_line(step, metrics)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
