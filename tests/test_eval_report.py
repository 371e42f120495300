"""`dasd eval-report`: a run's report recomputed from its records, and the side-by-side of two runs (B - A)."""

from __future__ import annotations

import json

import pytest

from dasd_megatron.eval import EvalConfig, run_eval
from dasd_megatron.eval.cli import main
from dasd_megatron.eval.report import compare_report, load_run
from dasd_megatron.eval.testing import ScriptedGenerator, byte_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A solves aime24 problems 0-1 (one sample of two); run B solves problems 1-3 (both samples)."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data" / "aime24"
    data.mkdir(parents=True)
    data.joinpath("test.jsonl").write_text("".join(
        json.dumps({"id": i, "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    tok = byte_tokenizer()

    def a(req, j):
        ok = req.problem_id in (0, 1) and j == 0
        return f"Wait. \\boxed{{{req.problem_id + 1 if ok else 0}}}"

    def b(req, j):
        return "Maybe " + (f"\\boxed{{{req.problem_id + 1}}}" if req.problem_id in (1, 2, 3) else "no box")

    cfg = EvalConfig(model="scripted", benchmarks=("aime24",), n_samples=2, reward_workers=1)
    for name, fn in (("grpo", a), ("dasd", b)):
        run_eval(cfg, ScriptedGenerator(tok, fn), tok, str(root / name), data_dir=str(root / "data"),
                 progress=False, report=False)
    return root / "grpo", root / "dasd"


def test_single_run_report(runs, capsys):
    a, _ = runs
    assert main(["eval-report", str(a)]) == 0
    report = (a / "report.md").read_text()
    assert "| AIME24 | 4 | 25.0 | 50.0 |" in report           # Avg@2 = (1/2 + 1/2) / 4, Pass@2 = 2/4
    assert "| **macro** (1) |  | 25.0 | 50.0 |" in report
    assert "| AIME24 | 2 | 6 | 0 | 0 | 0 |" in report          # correct, incorrect, unparseable, ...
    assert (a / "pass_at_k.png").read_bytes()[:8] == PNG
    name, metrics, records = load_run(str(a))
    assert name == "grpo" and metrics["settings"]["n_samples"] == 2 and len(records["aime24"]) == 4


def test_side_by_side(runs, tmp_path):
    a, b = runs
    out = tmp_path / "cmp"
    assert main(["eval-report", str(a), str(b), "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "# Evaluation: grpo (A) vs dasd (B)" in report
    assert "| benchmark | Avg@2 A | Avg@2 B | Δ | Pass@2 A | Pass@2 B | Δ |" in report
    assert "| AIME24 | 25.0 | 75.0 | +50.0 | 50.0 | 75.0 | +25.0 |" in report
    # solved by both: 1; only A: 0; only B: 2, 3; neither: none
    assert "| AIME24 | 4 | 1 | 1 | 2 | 0 |" in report
    assert (out / "pass_at_k.png").read_bytes()[:8] == PNG
    default = main(["eval-report", str(a), str(b)])
    assert default == 0 and (a / "vs_dasd" / "report.md").exists()


def test_compare_handles_missing_benchmarks():
    def m(keys):
        b = {"problems": 1, "n": 2, "avg_at_n": 50.0, "pass_at_k": {"1": 50.0, "2": 100.0}, "mean_length": 3.0,
             "token_nll": 0.5, "markers_per_response": 1.0, "unparseable_pct": 0.0}
        per = {k: dict(b) for k in keys}
        macro = {"benchmarks": list(keys), "avg_at_n": 50.0, "pass_at_k": {"1": 50.0, "2": 100.0},
                 "mean_length": 3.0, "token_nll": 0.5, "markers_per_response": 1.0, "unparseable_pct": 0.0}
        return {"benchmarks": per, "macro": macro}

    text = compare_report(("a", m(["aime24", "aime25"])), ("b", m(["aime24"])))
    assert "| AIME25 | 50.0 | – | – |" in text and "| AIME24 | 50.0 | 50.0 | +0.0 |" in text


def test_report_of_a_folder_without_records(tmp_path, capsys):
    assert main(["eval-report", str(tmp_path)]) == 2
    assert "no records/ folder" in capsys.readouterr().err
