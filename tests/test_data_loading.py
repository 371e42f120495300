"""Loading every shared math data file: row counts, schema detection, problem/answer/solution extraction; hub names
passed through to `datasets.load_dataset`; the offline error; local path errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dasd_megatron.data import DataConfig, DataLoadError, load_math_dataset
from dasd_megatron.data import loading

DATA = Path(__file__).parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared math data not found at {DATA} (the project's "
                                "shared/ folder sits next to the repository)")

# folder, split, rows, schema detected by `auto`, does every example carry a reference solution
FILES = [
    ("aime24", "test", 30, "math", True),
    ("aime25", "test", 30, "aime", False),
    ("hmmt_feb_2025", "test", 30, "aime", False),
    ("math500", "test", 500, "math", True),
    ("minerva_math", "test", 272, "minerva", True),
    ("olympiadbench", "test", 675, "olympiadbench", True),
    ("gsm8k", "train", 7473, "gsm8k", True),
    ("gsm8k", "test", 1319, "gsm8k", True),
    ("dapo_math_17k", "train", 17917, "dapo", False),
]


@needs_data
@pytest.mark.parametrize("folder, split, rows, schema, has_solution", FILES, ids=[f"{f[0]}-{f[1]}" for f in FILES])
def test_every_shared_file_loads_completely(folder, split, rows, schema, has_solution):
    ds = load_math_dataset(DataConfig(source=str(DATA / folder), split=split))
    assert (ds.num_rows, len(ds), ds.schema, ds.name) == (rows, rows, schema, folder)
    assert ds.bad_rows == () and ds.duplicates == 0  # the shared files have no unusable row
    assert [ex.index for ex in ds] == list(range(rows))
    for ex in ds:
        assert ex.problem.strip() == ex.problem and ex.problem
        assert all(a.strip() for a in ex.answers)
        assert (ex.solution is not None) == has_solution
        assert ex.source == folder


@needs_data
def test_field_extraction_per_schema():
    def first(folder, split="test", i=0):
        return load_math_dataset(DataConfig(source=str(DATA / folder), split=split))[i]

    ex = first("aime24")
    assert ex.answer == "204" and ex.problem.startswith("Every morning Aya") and r"\framebox{204}" in ex.solution
    assert first("aime25").answer == "70"
    assert first("hmmt_feb_2025", i=2).answer == r"\frac{1}{576}"
    ex = first("math500")
    assert ex.answer == r"\left( 3, \frac{\pi}{2} \right)" and ex.problem.startswith("Convert the point $(0,3)$")
    assert [first("minerva_math", i=i).answer for i in (0, 1)] == ["1.6", "4.5e33"]  # last \boxed of the solution
    ex = first("olympiadbench")
    assert ex.answer == "2" and ex.problem.startswith("Xenia and Sergey") and ex.solution.startswith("Sergey can")
    ex = first("gsm8k", "train")
    assert ex.answer == "72" and ex.problem.startswith("Natalia sold clips")
    assert ex.solution == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April "
                           "and May.")
    ex = first("dapo_math_17k", "train")
    assert ex.answer == "34" and ex.problem.startswith("In triangle $ABC$") and ex.solution is None


@needs_data
def test_olympiadbench_multi_part_answer_and_gsm8k_golds():
    ob = load_math_dataset(DataConfig(source=str(DATA / "olympiadbench")))
    assert "$(1,8,19), (2,7,13), (4,5,7)$" in {ex.answer for ex in ob}
    gsm = load_math_dataset(DataConfig(source=str(DATA / "gsm8k" / "train.jsonl")))
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", ex.answer) for ex in gsm)  # '1,080' -> '1080'
    assert not any("<<" in ex.solution or "####" in ex.solution for ex in gsm)
    assert next(ex for ex in gsm if ex.index == 345).answer == "1080"


@needs_data
def test_dapo_wrappers_dedupe_and_limit():
    src = str(DATA / "dapo_math_17k" / "dapo_math_17k.parquet")
    ds = load_math_dataset(DataConfig(source=src))
    assert ds.stripped_instructions == 20  # the Chinese rows' trailing 'Answer: \boxed{}' instruction
    assert not any("让我们一步一步地思考" in ex.problem or "Answer:" in ex.problem for ex in ds)
    assert any(ex.problem.startswith("Solve the following equation in positive numbers:") for ex in ds)
    deduped = load_math_dataset(DataConfig(source=src, dedupe=True))
    assert (len(deduped), deduped.duplicates) == (17267, 650)
    limited = load_math_dataset(DataConfig(source=src, limit=10))
    assert (limited.num_rows, len(limited)) == (10, 10)


def test_hub_name_is_passed_to_load_dataset(monkeypatch):
    import datasets

    calls = []
    rows = [{"data_source": "DAPO", "prompt": [{"role": "user", "content": (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is $1+1$?\n\n"
        'Remember to put your answer on its own line after "Answer:".')}],
        "reward_model": {"ground_truth": "2", "style": "rule"}}]

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_math_dataset(DataConfig(source="BytedTsinghua-SIA/DAPO-Math-17k", split="train", cache_dir="/tmp/c"))
    assert calls == [("BytedTsinghua-SIA/DAPO-Math-17k", None, {"split": "train", "cache_dir": "/tmp/c"})]
    assert (ds.name, ds.schema, ds[0].problem, ds[0].answer) == ("BytedTsinghua-SIA/DAPO-Math-17k", "dapo",
                                                                 "What is $1+1$?", "2")
    load_math_dataset(DataConfig(source="openai/gsm8k", subset="main", split="test", schema="dapo"))
    assert calls[-1] == ("openai/gsm8k", "main", {"split": "test", "cache_dir": None})


def test_hub_name_offline_says_use_a_local_file():
    import datasets

    assert datasets.config.HF_HUB_OFFLINE, "tests/conftest.py sets HF_HUB_OFFLINE=1 before datasets is imported"
    with pytest.raises(DataLoadError, match=r"data\.source='openai/gsm8k'.*Fix: use a local file"):
        load_math_dataset(DataConfig(source="openai/gsm8k", subset="main"))


def test_local_path_errors(tmp_path):
    with pytest.raises(DataLoadError, match=r"data\.source=.*no such file or folder"):
        load_math_dataset(DataConfig(source=str(tmp_path / "missing.jsonl")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataLoadError, match="unknown file type '.txt'"):
        load_math_dataset(DataConfig(source=str(tmp_path / "notes.txt")))
    with pytest.raises(DataLoadError, match="the folder has no"):
        load_math_dataset(DataConfig(source=str(tmp_path)))
    (tmp_path / "train.jsonl").write_text('{"problem": "p", "answer": "1"}\n')
    (tmp_path / "test.jsonl").write_text('{"problem": "q", "answer": "2"}\n{"problem": "r", "answer": "3"}\n')
    assert [ex.problem for ex in load_math_dataset(DataConfig(source=str(tmp_path), split="test"))] == ["q", "r"]
    with pytest.raises(DataLoadError, match=r"data\.split='validation': no file .* starts with it"):
        load_math_dataset(DataConfig(source=str(tmp_path), split="validation"))
    with pytest.raises(DataLoadError, match=r"data\.source='': .*Fix: set data\.source"):
        load_math_dataset(DataConfig())


def test_source_resolution_and_names(tmp_path):
    assert not loading.is_local("BytedTsinghua-SIA/DAPO-Math-17k")
    assert loading.is_local("./x.jsonl") and loading.is_local("data/train.parquet")
    f = tmp_path / "math500" / "test.jsonl"
    f.parent.mkdir()
    f.write_text("")
    assert loading.default_name(str(f)) == "math500"
    assert loading.default_name(str(tmp_path / "math500")) == "math500"
    assert loading.default_name("openai/gsm8k") == "openai/gsm8k"
