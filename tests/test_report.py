"""`dasd report`: plots + report.md from a synthetic metrics.jsonl; missing keys; epistemic-marker density."""

from __future__ import annotations

import argparse
import math
import os
import re

import numpy as np
import pytest

from dasd_megatron.eval.markers import MARKER_REGEX, epistemic_marker_density
from dasd_megatron.train.metrics_log import MetricsLogger
from dasd_megatron.train.run_report import add_report_parser, build_report, load_metrics, trend

ALL_PLOTS = {"reward", "loss", "entropy", "omega_deciles", "router", "kl", "response_length", "markers", "offpolicy",
             "timing"}


def _synthetic_run(run_dir, steps: int = 30, *, full: bool = True) -> None:
    """A DASD-looking run: reward rising, entropy falling, upper-convention router (deciles 0-7 pulled, 8-9 pushed)."""
    rng = np.random.default_rng(0)
    with MetricsLogger(str(run_dir), tensorboard=False) as ml:
        for s in range(1, steps + 1):
            f = s / steps
            m = {"rollout/reward_mean": 0.2 + 0.4 * f + 0.02 * rng.standard_normal(),
                 "rollout/accuracy": 0.15 + 0.4 * f,
                 "loss/dasd": 0.5 - 0.3 * f,
                 "router/omega_pos_frac": 0.8 + 0.01 * rng.standard_normal()}
            if full:
                m.update({"router/entropy_mean": 1.2 - 0.4 * f, "loss/kl": 0.05 + 0.01 * f,
                          "router/omega_mean": 0.3, "router/gate_mean": 0.6,
                          "rollout/response_length_mean": 400 + 200 * f,
                          "rollout/epistemic_marker_density": 3.5 + f,
                          "timing/rollout_s": 6.0, "timing/train_s": 4.0, "timing/sync_s": 0.5,
                          "timing/step_s": 10.6, "throughput/tokens_per_s": 4000 + 500 * f,
                          "rollout/staleness_mean": 1.0, "loss/is_weight_mean": 1.0 - 0.05 * f,
                          "rollout/mismatch_kl_k3": 1e-3 * (1 + f)})
                for k in range(10):
                    m[f"router/omega_mean_decile_{k}"] = math.tanh((7.5 - k) / 2) * (0.3 + 0.5 * f)
                    m[f"router/entropy_mean_decile_{k}"] = 0.05 * (k + 1) ** 1.5
                if s == 7:
                    m["loss/kl"] = float("nan")  # a non-finite value in the middle of a series
            ml.log(s, m)


def test_report_full_run(tmp_path):
    run = tmp_path / "run"
    _synthetic_run(run)
    res = build_report(str(run), progress=False)
    assert res.out_dir == str(run / "report") and res.num_steps == 30
    names = {os.path.splitext(os.path.basename(p))[0] for p in res.plots}
    assert names == ALL_PLOTS
    for p in res.plots:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 10_000
    md = open(res.report_md).read()
    for section in ("# Run report: run", "## Summary", "## Router regime", "## Plots", "## Notes"):
        assert section in md
    for stem in ALL_PLOTS:  # embedded by relative path, and the file is there
        assert f"]({stem}.png)" in md
    assert "steps 1 to 30" in md
    # reward row: first/last 20% means of a rising series -> an up arrow
    row = next(line for line in md.splitlines() if line.startswith("| reward mean |"))
    assert "↑" in row
    row = next(line for line in md.splitlines() if line.startswith("| step time (s) |"))
    assert "→ flat" in row
    assert "`convention=upper` regime" in md
    assert "`++++++++--`" in md and "decreases with entropy" in md


def test_report_missing_keys_still_reports(tmp_path):
    run = tmp_path / "run"
    _synthetic_run(run, steps=12, full=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("garbage line\n")
    out = tmp_path / "elsewhere"
    res = build_report(str(run), str(out), progress=False)
    assert res.out_dir == str(out)
    names = {os.path.splitext(os.path.basename(p))[0] for p in res.plots}
    assert names == {"reward", "loss", "router"}
    md = open(res.report_md).read()
    assert "## Notes" in md
    for missing in ("`loss/kl`", "`router/omega_mean_decile_*`", "`rollout/epistemic_marker_density`",
                    "`timing/*`", "`rollout/response_length_mean`"):
        assert missing in md
    assert "1 unparseable line(s)" in md
    assert "omega > 0 on" in md  # the pulled fraction is there even without deciles


def test_report_empty_and_absent(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    res = build_report(str(tmp_path), progress=False)
    assert res.plots == [] and "no records" in open(res.report_md).read()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        build_report(str(tmp_path / "nope"))


def test_report_cli(tmp_path, capsys):
    _synthetic_run(tmp_path / "run", steps=5)
    parser = argparse.ArgumentParser(prog="dasd")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    assert "5 steps" in capsys.readouterr().out
    assert (tmp_path / "o" / "report.md").exists()
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    assert args.func(args) == 1


def test_load_metrics_dedupes_steps_last_wins(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "a": 1}\n{"step": 1, "a": 0}\n{"step": 2, "a": 5}\n')
    m = load_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["a"] for r in m.records] == [0, 5]
    assert any("duplicate" in n for n in m.notes)


def test_trend_windows():
    t = trend(np.array([1.0, np.nan, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
    assert (t.first, t.last, t.window, t.head_mean, t.tail_mean) == (1.0, 10.0, 2, 1.5, 9.5)
    assert t.arrow.startswith("↑ +8")
    assert trend(np.array([np.nan])) is None


@pytest.mark.parametrize("text,count", [
    ("Wait, that is wrong. wait... WAIT!", 3),
    ("Hmm, perhaps maybe actually. Alternatively it seems it might likely work; let me check.", 9),
    ("checked checking checks recheck", 0),       # "check" matches only the word itself
    ("re-check the check-in", 2),                  # a hyphen is a word boundary
    ("maybelline waiting hmmm seemsly mighty unlikely check_answer", 0),
    ("Maybe. MAYBE? maybe!", 3),
    ("", 0),
])
def test_marker_counts_word_boundaries(text, count):
    assert epistemic_marker_density([text]) == count
    assert len(re.findall(MARKER_REGEX, text, re.IGNORECASE)) == count  # the documented regex is the one counted


def test_marker_density_is_mean_per_response():
    assert epistemic_marker_density(["wait wait", "hmm", "nothing here", "check it, maybe"]) == pytest.approx(5 / 4)
    assert math.isnan(epistemic_marker_density([]))
    assert MARKER_REGEX == r"\b(wait|hmm|perhaps|maybe|actually|alternatively|seems|might|likely|check)\b"
