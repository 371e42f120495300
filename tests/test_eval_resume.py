"""Resuming an interrupted evaluation from its per-problem records (scripted generator, a small local data folder).

A generator that dies after a few problems (as a server does) stops the run with `EvalIncomplete`, leaving exactly
the finished problems recorded; rerunning the same call generates only the missing problems and ends with the same
records and metrics as an uninterrupted run. Torn writes, corrupted lines, changed settings and changed data are
handled as documented in `dasd_megatron.eval.records`.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from dasd_megatron.eval import EvalConfig, EvalIncomplete, run_eval
from dasd_megatron.eval.errors import EvalError
from dasd_megatron.eval.records import read_records, read_run_records, records_path
from dasd_megatron.eval.testing import ScriptedGenerator, byte_tokenizer

N = 4


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    (d / "aime24").mkdir(parents=True)
    (d / "minerva_math").mkdir()
    with open(d / "aime24" / "test.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": i, "problem": f"Compute {i} * 7.", "answer": str(7 * i)}) + "\n")
    with open(d / "minerva_math" / "test.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"problem": f"Find x if x - {i} = 1.", "solution": f"x = \\boxed{{{i + 1}}}.",
                                "type": "algebra", "idx": i}) + "\n")
    return str(d)


def respond(req, j):
    """Deterministic mix of correct, wrong and answer-less responses of varying length."""
    h = int(hashlib.sha1(f"{req.benchmark}/{req.problem_id}/{j}".encode()).hexdigest(), 16)
    text = req.benchmark + ": " + "maybe " * (h % 5)
    gold = 7 * req.problem_id if req.benchmark == "aime24" else req.problem_id + 1
    if h % 3 == 0:
        return text + f"\\boxed{{{gold}}}"
    if h % 3 == 1:
        return text + f"\\boxed{{{gold + 1}}}"
    return text + "no idea"


def cfg(**kw):
    return EvalConfig(**{"model": "scripted", "benchmarks": ("aime24", "minerva"), "n_samples": N,
                         "concurrency": 2, "reward_workers": 1, **kw})


def run(tok, data_dir, out, gen=None, **kw):
    gen = gen or ScriptedGenerator(tok, respond)
    return run_eval(cfg(**kw), gen, tok, str(out), data_dir=data_dir, progress=False, report=False), gen


def sorted_records(out):
    return {k: sorted(v, key=lambda r: r["problem_id"]) for k, v in read_run_records(str(out)).items()}


def test_resume_after_the_generator_dies_gives_the_uninterrupted_metrics(tok, data_dir, tmp_path):
    ref, _ = run(tok, data_dir, tmp_path / "ref")
    assert ref.generated == 11 and 0 < ref.metrics["macro"]["avg_at_n"] < 100
    assert 0 < ref.metrics["benchmarks"]["aime24"]["status_counts"]["unparseable"] < 6 * N

    out = tmp_path / "run"
    dying = ScriptedGenerator(tok, respond, fail_after=4)
    with pytest.raises(EvalIncomplete, match="rerun the same command") as info:
        run(tok, data_dir, out, dying)
    assert info.value.recorded == 4 and info.value.failed >= 1
    first = read_run_records(str(out))
    assert sum(len(v) for v in first.values()) == 4
    assert not (out / "metrics.json").exists()

    again, gen = run(tok, data_dir, out)
    assert (again.generated, again.resumed) == (7, 4)
    done_before = {(k, r["problem_id"]) for k, v in first.items() for r in v}
    asked = {(r.benchmark, r.problem_id) for r in gen.requests}
    assert asked.isdisjoint(done_before) and len(asked) == 7
    assert again.metrics["benchmarks"] == ref.metrics["benchmarks"]
    assert again.metrics["macro"] == ref.metrics["macro"]
    assert sorted_records(out) == sorted_records(tmp_path / "ref")

    third, gen = run(tok, data_dir, out)  # nothing left: no generation, same numbers
    assert third.generated == 0 and gen.requests == [] and third.metrics == again.metrics
    assert json.loads((out / "metrics.json").read_text())["macro"] == ref.metrics["macro"]


def test_torn_last_line_is_cut_and_regenerated(tok, data_dir, tmp_path):
    out = tmp_path / "run"
    ref, _ = run(tok, data_dir, out)
    path = records_path(str(out), "minerva")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # crash in the middle of a write
    assert len(read_records(path)) == len(lines) - 1
    again, gen = run(tok, data_dir, out)
    assert again.generated == 1 and len(gen.requests) == 1
    assert again.metrics["benchmarks"] == ref.metrics["benchmarks"]
    assert all(json.loads(line) for line in path.read_text().splitlines())  # valid JSONL again


def test_limit_can_grow_and_the_metrics_cover_the_selection(tok, data_dir, tmp_path):
    out = tmp_path / "run"
    small, _ = run(tok, data_dir, out, limit=2)
    assert small.generated == 4 and small.metrics["benchmarks"]["aime24"]["problems"] == 2
    big, gen = run(tok, data_dir, out, limit=4)
    assert (big.generated, big.resumed) == (4, 4)
    assert {r.problem_id for r in gen.requests} == {2, 3}
    smaller, _ = run(tok, data_dir, out, limit=1)
    assert smaller.generated == 0 and smaller.metrics["benchmarks"]["aime24"]["problems"] == 1


def test_changed_settings_corruption_and_changed_data_are_refused(tok, data_dir, tmp_path):
    out = tmp_path / "run"
    run(tok, data_dir, out, limit=2)
    with pytest.raises(EvalError, match=r"temperature: recorded 0.6, now 1.0.*another --output"):
        run(tok, data_dir, out, limit=2, temperature=1.0)
    with pytest.raises(EvalError, match="n_samples"):
        run_eval(EvalConfig(model="scripted", benchmarks=("aime24",), n_samples=2), ScriptedGenerator(tok, respond),
                 tok, str(out), data_dir=data_dir, progress=False, report=False)

    path = records_path(str(out), "aime24")
    good = path.read_text()
    path.write_text("{not json\n" + good)
    with pytest.raises(EvalError, match="line 1 is not a valid record"):
        run(tok, data_dir, out, limit=2)

    recs = [json.loads(line) for line in good.splitlines()]
    recs[0]["problem_hash"] = "000000000000"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(EvalError, match="different problem text"):
        run(tok, data_dir, out, limit=2)
