"""The six benchmark files: row counts, gold fields, and answer extraction through the whole eval pipeline.

Every problem of every file goes through `run_eval` with a scripted generator (no server): sample 0 answers the
problem's gold in a `\\boxed{}` after some distracting boxed work, sample 1 answers with no box at all. So each
benchmark must come out at exactly Avg@2 = 50 % and Pass@2 = 100 %, with one correct and one unparseable sample
per problem: a gold read from the wrong field (Minerva's boxed solution, OlympiadBench's list) or a lost row fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dasd_megatron.eval import BENCHMARKS, EvalConfig, load_benchmark, run_eval
from dasd_megatron.eval.benchmarks import get_benchmark, parse_benchmarks, resolve_data_dir
from dasd_megatron.eval.errors import EvalError
from dasd_megatron.eval.records import read_run_records
from dasd_megatron.eval.testing import ScriptedGenerator, byte_tokenizer

DATA = Path(__file__).parents[1].parent / "shared" / "data"
ROWS = {"math500": 500, "minerva": 272, "olympiadbench": 675, "aime24": 30, "aime25": 30, "hmmt25": 30}
FIRST_GOLD = {"math500": "\\left( 3, \\frac{\\pi}{2} \\right)", "minerva": "1.6", "olympiadbench": "2",
              "aime24": "204", "aime25": "70", "hmmt25": "103"}

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared math data not found at {DATA}")


def _box_content(gold: str) -> str:
    return gold[1:-1] if len(gold) > 1 and gold.startswith("$") and gold.endswith("$") else gold


@needs_data
def test_row_counts_and_gold_fields():
    assert ROWS == {k: b.rows for k, b in BENCHMARKS.items()}
    for key, rows in ROWS.items():
        data = load_benchmark(key, str(DATA))
        assert len(data) == rows and not data.bad_rows, (key, data.summary())
        assert data.examples[0].answer == FIRST_GOLD[key], key
        assert all(ex.source == key for ex in data.examples)
    minerva = load_benchmark("minerva", str(DATA))
    ex = minerva.examples[0]
    assert "\\boxed{1.6}" in ex.solution.replace(" ", "")  # the gold is the boxed answer of the solution
    assert len(load_benchmark("aime24", str(DATA), limit=7)) == 7


@needs_data
def test_every_problem_of_every_benchmark_is_extracted_and_scored(tmp_path):
    tok = byte_tokenizer()
    golds = {(k, ex.index): ex.answers[0] for k in ROWS for ex in load_benchmark(k, str(DATA)).examples}

    def respond(req, j):
        if j == 1:
            return "Hmm, I am not sure. The answer might be 42 but I cannot finish."
        gold = golds[(req.benchmark, req.problem_id)]
        return (f"First, \\boxed{{-123456789}} was a wrong guess. Wait, let me check again.\n"
                f"Therefore the final answer is $\\boxed{{{_box_content(gold)}}}$.")

    gen = ScriptedGenerator(tok, respond)
    cfg = EvalConfig(model="scripted", n_samples=2, concurrency=8, reward_workers=2, reward_timeout_s=20.0)
    result = run_eval(cfg, gen, tok, str(tmp_path), data_dir=str(DATA), progress=False, report=False)
    assert result.generated == sum(ROWS.values()) == len(gen.requests)
    m = result.metrics
    assert list(m["benchmarks"]) == list(ROWS)
    for key, rows in ROWS.items():
        b = m["benchmarks"][key]
        assert b["problems"] == rows, key
        assert b["status_counts"] == {"correct": rows, "incorrect": 0, "unparseable": rows, "timeout": 0,
                                      "error": 0}, key
        assert b["avg_at_n"] == 50.0 and b["pass_at_k"] == {"1": 50.0, "2": 100.0}, key
        assert b["markers_per_response"] == 2.0  # "Wait", "check" | "Hmm", "might"
    assert m["macro"]["avg_at_n"] == 50.0 and m["macro"]["pass_at_k"]["2"] == 100.0
    recs = read_run_records(str(tmp_path))
    olymp = {r["problem_id"]: r for r in recs["olympiadbench"]}
    assert all(r["samples"][0]["extracted"] == _box_content(golds[("olympiadbench", pid)])
               for pid, r in olymp.items())


def test_names_hub_configs_and_data_dir(tmp_path, monkeypatch):
    assert parse_benchmarks("AIME25, math500,aime25") == ("math500", "aime25")
    assert get_benchmark("OlympiadBench").key == "olympiadbench"
    with pytest.raises(EvalError, match="unknown benchmark"):
        get_benchmark("gpqa")
    hub = get_benchmark("minerva").data_config(None)
    assert (hub.source, hub.split, hub.schema, hub.problem_field, hub.answer_field) == \
        ("math-ai/minervamath", "test", "plain", "question", "answer")
    ob = get_benchmark("olympiadbench").data_config(None)
    assert (ob.source, ob.subset, ob.split, ob.schema) == ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train",
                                                           "auto")
    with pytest.raises(EvalError, match="no folder"):
        get_benchmark("aime24").data_config(str(tmp_path))
    assert resolve_data_dir(str(tmp_path)) == str(tmp_path)
    assert resolve_data_dir(str(tmp_path), hub=True) is None
    monkeypatch.setenv("DASD_EVAL_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == str(tmp_path)
    with pytest.raises(EvalError, match="no such folder"):
        resolve_data_dir(str(tmp_path / "missing"))


def test_hub_minerva_columns_are_mapped(monkeypatch):
    """The hub copy of Minerva has question/answer columns; auto-detection would read it as GSM8K."""
    import datasets

    rows = {"question": ["What is 2+2?", "Speed of light?"], "answer": ["4", "3e8"]}
    calls = []

    def fake_load(name, subset=None, split=None, cache_dir=None):
        calls.append((name, subset, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_benchmark("minerva", None)
    assert calls == [("math-ai/minervamath", None, "test")]
    assert [(ex.problem, ex.answer) for ex in data.examples] == [("What is 2+2?", "4"), ("Speed of light?", "3e8")]
