"""Malformed lines in JSON Lines files: located (file, line, JSON error), skipped and counted like other bad rows with
`data.on_bad_row=skip` (the default), one-line errors with the fix with `error`. Row numbers are line-stable: a
malformed line keeps its row number and the rows after it keep theirs, as if the line had been a bad row."""

from __future__ import annotations

import json
import logging

import pytest

from dasd_megatron.data import BadLineError, DataConfig, DataLoadError, load_math_dataset


def row(i: int) -> str:
    return json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} plus {i} #### {2 * i}"})


def write(path, lines) -> str:
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return str(path)


BROKEN = '{"question": "Broken", "answer": "x #### 1"'  # no closing brace


@pytest.fixture
def messy(tmp_path):
    """Rows 0..5 on lines 1..8: a blank line (not a row), a truncated object, an array, bytes that are not UTF-8."""
    return write(tmp_path / "train.jsonl", [
        row(0),            # line 1, row 0
        "",                # line 2, blank: not a row
        BROKEN,            # line 3, row 1
        row(2),            # line 4, row 2
        "[1, 2]",          # line 5, row 3
        b'{"question": "\xff"}',  # line 6, row 4
        "   ",             # line 7, blank
        row(5),            # line 8, row 5
    ])


def test_skip_counts_malformed_lines_as_bad_rows_with_file_and_line(messy, caplog):
    with caplog.at_level(logging.WARNING):
        ds = load_math_dataset(DataConfig(source=messy))  # on_bad_row=skip is the default
    assert DataConfig().on_bad_row == "skip"
    assert [(ex.index, ex.answer) for ex in ds] == [(0, "0"), (2, "4"), (5, "10")]
    assert (ds.num_rows, ds.malformed_lines, len(ds.bad_rows)) == (6, 3, 3)
    assert [(b.index, b.field) for b in ds.bad_rows] == [(1, "json"), (3, "json"), (4, "json")]
    reasons = [b.reason for b in ds.bad_rows]
    assert reasons[0] == f"line 3 of {messy}: not valid JSON (Expecting ',' delimiter at column 44)"
    assert reasons[1] == f"line 5 of {messy}: an array, not a JSON object"
    assert reasons[2].startswith(f"line 6 of {messy}: not UTF-8 text")
    assert f"skipping row 1: json: line 3 of {messy}: not valid JSON" in caplog.text
    assert "3 bad rows skipped in all (data.on_bad_row=skip)" in caplog.text
    assert "3 malformed JSON lines" in ds.summary()
    assert "Failed to load JSON" not in caplog.text  # datasets' own unlocated error line is not shown


def test_error_names_file_line_and_json_error_in_one_line(messy):
    with pytest.raises(BadLineError) as info:
        load_math_dataset(DataConfig(source=messy, on_bad_row="error"))
    e = info.value
    assert (e.path, e.line) == (messy, 3)
    assert str(e) == (f"data.source={messy!r}: line 3 of {messy}: not valid JSON (Expecting ',' delimiter at column "
                      "44); 2 more malformed lines (5, 6). Fix: repair or delete line 3, or set data.on_bad_row=skip to "
                      "leave malformed lines out (they are counted with the other bad rows)")
    assert "\n" not in str(e)
    assert isinstance(e, DataLoadError)


def test_malformed_and_parsed_bad_rows_share_one_numbering(tmp_path):
    src = write(tmp_path / "d.jsonl", [row(0), BROKEN, json.dumps({"question": "No gold", "answer": "none"}), row(3)])
    ds = load_math_dataset(DataConfig(source=src))
    assert [ex.index for ex in ds] == [0, 3]
    assert [(b.index, b.field) for b in ds.bad_rows] == [(1, "json"), (2, "answer")]
    # repairing the line changes nothing else: the other rows keep their numbers (records and resumes rely on them)
    fixed = load_math_dataset(DataConfig(source=write(tmp_path / "d.jsonl", [row(0), row(1), row(9), row(3)])))
    assert [ex.index for ex in fixed] == [0, 1, 2, 3]
    assert [(ex.index, ex.problem) for ex in ds] == [(ex.index, ex.problem) for ex in fixed if ex.index in (0, 3)]


def test_limit_counts_malformed_lines_and_ignores_lines_past_it(tmp_path):
    src = write(tmp_path / "d.jsonl", [row(0), BROKEN, row(2), row(3), "{oops"])
    ds = load_math_dataset(DataConfig(source=src, limit=3))
    assert (ds.num_rows, [ex.index for ex in ds], [b.index for b in ds.bad_rows]) == (3, [0, 2], [1])
    # a malformed line past the limit is never read, so it is no error even with on_bad_row=error
    ds = load_math_dataset(DataConfig(source=src, limit=1, on_bad_row="error"))
    assert ([ex.index for ex in ds], ds.bad_rows) == ([0], ())
    with pytest.raises(BadLineError, match=r"line 2 of .*; 1 more malformed line \(5\)"):
        load_math_dataset(DataConfig(source=src, on_bad_row="error"))


def test_rows_are_numbered_across_the_files_of_a_folder(tmp_path):
    write(tmp_path / "train-000.jsonl", [row(0), row(1)])
    second = write(tmp_path / "train-001.jsonl", ["", row(2), "not json", row(4)])
    ds = load_math_dataset(DataConfig(source=str(tmp_path), split="train"))
    assert [ex.index for ex in ds] == [0, 1, 2, 4]
    assert ds.bad_rows[0].index == 3 and ds.bad_rows[0].reason.startswith(f"line 3 of {second}: not valid JSON")
    with pytest.raises(BadLineError, match=r"line 3 of .*train-001\.jsonl: not valid JSON") as info:
        load_math_dataset(DataConfig(source=str(tmp_path), split="train", on_bad_row="error"))
    assert info.value.path == second


def test_json_document_syntax_error_is_always_an_error(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([json.loads(row(0)), json.loads(row(1))], indent=1))
    assert [ex.answer for ex in load_math_dataset(DataConfig(source=str(good)))] == ["0", "2"]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"question": "a", "answer": "x #### 1"},\n  {"question": "b" "answer": "x #### 2"}\n]\n')
    with pytest.raises(BadLineError, match=r"line 3 of .*bad\.json: not valid JSON \(Expecting ',' delimiter at "
                                           r"column 20\) in the JSON document\. Fix: repair line 3") as info:
        load_math_dataset(DataConfig(source=str(bad)))  # skip cannot drop a line out of one document
    assert info.value.line == 3


def test_json_lines_in_a_json_file_are_skipped_like_jsonl(tmp_path):
    src = write(tmp_path / "d.json", [row(0), "{]", row(2)])
    ds = load_math_dataset(DataConfig(source=src))
    assert [ex.index for ex in ds] == [0, 2] and ds.malformed_lines == 1


def test_no_valid_line_at_all(tmp_path):
    src = write(tmp_path / "d.jsonl", ["nope", "{also nope"])
    with pytest.raises(DataLoadError, match=r"none of its 2 rows is a JSON object \(first: line 1 of .*\)\. Fix: "):
        load_math_dataset(DataConfig(source=src))


def test_other_formats_keep_their_path(tmp_path):
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataLoadError, match=r"datasets could not read .* as parquet .*Fix: check the file's format"):
        load_math_dataset(DataConfig(source=str(bad)))
