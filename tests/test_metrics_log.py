"""MetricsLogger: JSONL + TensorBoard written and readable, resume truncation, non-finite values, console line."""

from __future__ import annotations

import json
import logging
import math
import sys
import types

import pytest

from dasd_megatron.train import metrics_log
from dasd_megatron.train.metrics_log import MetricsLogger, format_console_line, read_metrics_jsonl


def _tb_scalars(tb_dir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]  # strict: every line must parse


def test_jsonl_and_tensorboard_written_and_readable(tmp_path):
    import torch

    with MetricsLogger(str(tmp_path), enabled=True) as ml:
        for step in range(1, 4):
            ml.log(step, {"rollout/reward_mean": 0.1 * step, "loss/dasd": torch.tensor(1.0 / step),
                          "loss/num_tokens": 128, "router/omega_pos_frac": 0.8})
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(isinstance(r["time"], float) for r in rows)
    assert rows[1]["rollout/reward_mean"] == pytest.approx(0.2)
    assert rows[2]["loss/dasd"] == pytest.approx(1 / 3)
    assert rows[0]["loss/num_tokens"] == 128
    tb = _tb_scalars(str(tmp_path / "tb"), "rollout/reward_mean")
    assert [s for s, _ in tb] == [1, 2, 3]
    assert [v for _, v in tb] == pytest.approx([0.1, 0.2, 0.3], rel=1e-6)
    assert _tb_scalars(str(tmp_path / "tb"), "loss/dasd")[0] == (1, pytest.approx(1.0))


def test_nonfinite_values_are_null_in_jsonl_and_skipped_in_tensorboard(tmp_path):
    with MetricsLogger(str(tmp_path)) as ml:
        ml.log(1, {"loss/kl": float("nan"), "loss/dasd": 0.5, "x/inf": float("inf"), "x/ninf": -math.inf})
        ml.log(2, {"loss/kl": 0.25, "loss/dasd": 0.4, "x/inf": 1.0, "x/ninf": 2.0})
    raw = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows[0]["loss/kl"] is None and rows[0]["x/inf"] is None and rows[0]["x/ninf"] is None
    assert rows[0]["loss/dasd"] == 0.5
    assert _tb_scalars(str(tmp_path / "tb"), "loss/kl") == [(2, 0.25)]
    assert [s for s, _ in _tb_scalars(str(tmp_path / "tb"), "loss/dasd")] == [1, 2]


def test_resume_drops_steps_after_checkpoint_atomically(tmp_path):
    with MetricsLogger(str(tmp_path)) as ml:
        for step in range(1, 6):  # steps 1..5 logged; checkpoint at 3; killed after logging 4 and 5
            ml.log(step, {"loss/dasd": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss/da')  # a line cut short by the kill
    with MetricsLogger(str(tmp_path), resume_step=3) as ml:
        assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        for step in range(4, 6):
            ml.log(step, {"loss/dasd": 10.0 * step})
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss/dasd"] for r in rows] == [1.0, 2.0, 3.0, 40.0, 50.0]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # temp file renamed, not left behind
    # TensorBoard: purge_step hides the orphaned events of the first attempt's steps 4 and 5.
    assert _tb_scalars(str(tmp_path / "tb"), "loss/dasd") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_append_after_partial_line_without_resume_keeps_lines_separate(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')
    with MetricsLogger(str(tmp_path), tensorboard=False) as ml:
        ml.log(3, {"a": 3})
    records, bad = read_metrics_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 3] and bad == 1


def test_disabled_logger_writes_nothing(tmp_path):
    ml = MetricsLogger(str(tmp_path / "run"), enabled=False)
    ml.log(1, {"loss/dasd": 1.0})
    ml.close()
    assert not (tmp_path / "run").exists()
    assert ml.console_line(1, {"loss/dasd": 1.0}) == "step 1 | loss 1.0000"


def test_reserved_keys_rejected(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as ml, pytest.raises(ValueError, match="reserved"):
        ml.log(1, {"time": 3.0})


def test_wandb_missing_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setattr(metrics_log, "_wandb_warned", False)
    with caplog.at_level(logging.WARNING, logger=metrics_log.__name__):
        for i in range(2):
            with MetricsLogger(str(tmp_path / str(i)), tensorboard=False, wandb={"project": "dasd"}) as ml:
                ml.log(1, {"a": 1.0})
    warnings = [r for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "pip install wandb" in warnings[0].getMessage()
    assert _lines(tmp_path / "1" / "metrics.jsonl")[0]["a"] == 1.0


def test_wandb_used_when_importable(tmp_path, monkeypatch):
    calls = {}

    class Run:
        def log(self, data, step):
            calls.setdefault("log", []).append((step, data))

        def finish(self):
            calls["finish"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.setdefault("init", kw) and Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(str(tmp_path), tensorboard=False,
                       wandb={"project": "p", "name": "n", "entity": None}) as ml:
        ml.log(7, {"loss/dasd": 0.5, "loss/kl": float("nan")})
    assert calls["init"] == {"project": "p", "name": "n", "dir": str(tmp_path)}
    assert calls["log"] == [(7, {"loss/dasd": 0.5})]
    assert calls["finish"] is True


def test_console_line_all_keys_and_missing_keys():
    full = {"loss/dasd": 0.12345, "rollout/reward_mean": 0.53125, "rollout/accuracy": 0.47,
            "router/entropy_mean": 0.8123, "loss/kl": 0.01234, "router/omega_pos_frac": 0.8,
            "rollout/response_length_mean": 511.6, "timing/step_s": 12.3, "throughput/tokens_per_s": 4500.0}
    assert format_console_line(12, full) == ("step 12 | loss 0.1235 | reward 0.531 | acc 47.0% | ent 0.812 | "
                                             "kl 0.0123 | w>0 80.0% | len 512 | step 12.30s | tok/s 4.5k")
    assert format_console_line(3, {}) == "step 3"
    # aliases (loss/total, loss/entropy), a NaN, a None and unrelated keys
    line = format_console_line(4, {"loss/total": float("nan"), "loss/entropy": 1.5, "loss/kl": None, "foo/bar": 1})
    assert line == "step 4 | loss nan | ent 1.500"
