"""Turning `data.source` into a `datasets.Dataset`: local files by format, anything else by hub name.

Resolution of `source`:

- an existing file: `load_dataset(<format>, data_files=<file>, split="train")`, format from the extension
  (.jsonl/.json -> json, .parquet, .csv); `data.split` is not used (a file is one split).
- an existing folder: its data files (same extensions, not recursive); one file is used as is; with several, the
  ones whose name starts with `data.split` (gsm8k/train.jsonl for split=train).
- something that looks like a path (starts with `/`, `.`, `~`, or ends in a data-file extension) but does not
  exist: an error naming the path.
- otherwise a hub name: `load_dataset(source, subset, split=split)`. Without network (or with HF_DATASETS_OFFLINE=1)
  this fails with an error that says to use a local file.

Malformed JSON lines (`read_rows`): `datasets` reads a JSON Lines file as a whole and fails on the first line that is
not a JSON object, without saying which. When it fails on a .jsonl/.json file, the file is scanned line by line
(only then: a clean file costs nothing extra) for the lines that are not one JSON object each. A row is a non-blank
line (blank lines are not rows, as in `datasets`), numbered across the files in order, so a malformed line keeps its
row number and the rows after it keep theirs. With `data.on_bad_row=error` the first malformed line raises
`BadLineError` (file, line number, the JSON error, the fix); with `skip` the malformed lines become bad rows (counted
and logged with the others) and the remaining lines are read by `datasets` from a cleaned temporary copy. A .json file
holding one JSON document (an array of objects) cannot lose a line: a syntax error there is always an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from dasd_megatron.data.config import DataConfig
from dasd_megatron.data.errors import BadLineError, DataLoadError
from dasd_megatron.data.example import BadRow

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_GENERIC_STEMS = {"train", "test", "validation", "valid", "dev", "data", "eval"}


def is_local(source: str) -> bool:
    """True when `source` names (or tries to name) a local file or folder rather than a hub data set."""
    p = Path(os.path.expanduser(source))
    return p.exists() or source.startswith(("/", ".", "~")) or p.suffix.lower() in FORMATS


def data_files(source: str, split: str, field: str = "data.source",
               split_field: str = "data.split") -> tuple[str, list[str]]:
    """`(format, files)` for a local source (see module docstring); errors name `field` and `split_field`."""
    p = Path(os.path.expanduser(source))
    if not p.exists():
        raise DataLoadError(f"{field}={source!r}: no such file or folder. Fix: check the path (relative paths "
                            f"are resolved from {os.getcwd()})")
    if p.is_file():
        fmt = FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise DataLoadError(f"{field}={source!r}: unknown file type {p.suffix!r}. Fix: use one of "
                                f"{sorted(FORMATS)}")
        return fmt, [str(p)]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FORMATS)
    if not files:
        raise DataLoadError(f"{field}={source!r}: the folder has no {sorted(FORMATS)} files. Fix: point "
                            f"{field} at a data file or a folder holding them")
    if len(files) > 1:
        files = [f for f in files if f.name.startswith(split)]
        if not files:
            names = sorted(f.name for f in p.iterdir() if f.suffix.lower() in FORMATS)
            raise DataLoadError(f"{split_field}={split!r}: no file in {source!r} starts with it (files: {names}). "
                                f"Fix: set {split_field} to a file-name prefix or {field} to one file")
    fmts = {FORMATS[f.suffix.lower()] for f in files}
    if len(fmts) > 1:
        raise DataLoadError(f"{field}={source!r}: split {split!r} mixes formats {sorted(fmts)}. Fix: point "
                            f"{field} at one file")
    return fmts.pop(), [str(f) for f in files]


def default_name(source: str) -> str:
    """A short label for the data set: the folder name for generic file names (math500/test.jsonl -> math500),
    the file stem otherwise, the hub name as given."""
    if not is_local(source):
        return source
    p = Path(os.path.expanduser(source)).resolve()
    is_file = p.is_file() or (not p.is_dir() and p.suffix.lower() in FORMATS)
    if is_file and p.stem.lower() in _GENERIC_STEMS:
        return p.parent.name
    return p.stem if is_file else p.name


@dataclass(frozen=True)
class BadLine:
    """A line of a JSON Lines file that is not one JSON object."""

    path: str
    line: int
    """1-based line number in `path`."""
    row: int
    """The row it would have been: its position among the non-blank lines of the split's files."""
    reason: str

    def __str__(self) -> str:
        return f"line {self.line} of {self.path}: {self.reason}"

    def bad_row(self) -> BadRow:
        return BadRow(self.row, "json", str(self))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_error(e: Exception) -> str:
    """What is wrong, in a few words: 'not valid JSON (Expecting ',' delimiter at column 15)'."""
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at column {e.colno})"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at column {e.start + 1})"
    return f"not valid JSON ({e})"


def _is_json_document(path: str) -> bool:
    """A .json file holding one JSON document (an array, or an object spread over several lines), not JSON Lines."""
    if not path.lower().endswith(".json"):
        return False
    with open(path, "rb") as f:
        for raw in f:
            line = raw.strip()
            if line:
                return line.startswith(b"[") or line == b"{"
    return False


def scan_json_lines(files: Sequence[str]) -> tuple[int, list[BadLine]]:
    """`(rows, bad lines)` of JSON Lines files: every non-blank line must be one JSON object (see module docstring)."""
    rows, bad = 0, []
    for path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip(b" \t\r\n")
                if not line:
                    continue
                try:
                    value = json.loads(line, parse_constant=_reject_constant)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    bad.append(BadLine(path, lineno, rows, _json_error(e)))
                else:
                    if not isinstance(value, dict):
                        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")
                        kind = "null" if value is None else kind
                        bad.append(BadLine(path, lineno, rows, f"{kind}, not a JSON object"))
                rows += 1
    return rows, bad


@dataclass(frozen=True)
class Rows:
    """What `read_rows` read: the `datasets.Dataset` of the usable rows, their row numbers, and the bad lines."""

    dataset: Any
    num_rows: int
    """Rows of the split (after `data.limit`), malformed lines included."""
    bad_lines: tuple[BadLine, ...] = ()
    """Malformed JSON lines that were left out (`data.on_bad_row=skip`)."""
    row_numbers: Optional[tuple[int, ...]] = None
    """The row number of each row of `dataset` when some rows were left out; None: `dataset[i]` is row i."""

    def row_number(self, position: int) -> int:
        return position if self.row_numbers is None else self.row_numbers[position]


def load_rows(cfg: DataConfig):
    """The raw `datasets.Dataset` of `cfg.source` (first `cfg.limit` rows when set, malformed JSON lines left out)."""
    return read_rows(cfg).dataset


def read_rows(cfg: DataConfig) -> Rows:
    """The rows of `cfg.source` (first `cfg.limit` rows when set), malformed JSON lines handled by `cfg.on_bad_row`
    (see module docstring)."""
    import datasets

    if not cfg.source:
        raise DataLoadError("data.source='': no data set given. Fix: set data.source to a hub name such as "
                            "BytedTsinghua-SIA/DAPO-Math-17k or a local .jsonl/.parquet file or folder")
    if not is_local(cfg.source):
        return _limited(_load_hub(cfg.source, cfg.subset, cfg.split, cfg.cache_dir), cfg.limit)
    fmt, files = data_files(cfg.source, cfg.split)
    try:
        with _quiet_json_builder():
            ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cfg.cache_dir)
    except Exception as e:  # noqa: BLE001 - located below, or re-raised with the file and the fix
        if fmt == "json":
            rows = _read_around_bad_lines(cfg, files)
            if rows is not None:
                return rows
        raise DataLoadError(f"data.source={cfg.source!r}: datasets could not read {files} as {fmt} "
                            f"({type(e).__name__}: {e}). Fix: check the file's format") from e
    return _limited(ds, cfg.limit)


@contextlib.contextmanager
def _quiet_json_builder():
    """Silence the `datasets` JSON builder's own ERROR line about a file it cannot parse: the failure is located
    (or re-raised) with the file, the line and the fix right after."""
    logger = logging.getLogger("datasets.packaged_modules.json.json")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _limited(ds, limit: Optional[int]) -> Rows:
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return Rows(ds, len(ds))


def locate_bad_lines(cfg: DataConfig, files: Sequence[str],
                     field: str = "data.source") -> Optional[tuple[int, list[BadLine]]]:
    """The malformed lines of JSON files, by `cfg.on_bad_row` (see module docstring): `(rows, bad lines)` within
    `cfg.limit`; None when the files hold no malformed line (or are one valid JSON document). Raises `BadLineError`
    for a syntax error in a JSON document, and for the first malformed line with `on_bad_row=error` (naming `field`)."""
    for path in files:
        if _is_json_document(path):
            with open(path, "rb") as f:
                try:
                    json.loads(f.read(), parse_constant=_reject_constant)
                except ValueError as e:
                    line = e.lineno if isinstance(e, json.JSONDecodeError) else 1
                    raise BadLineError(
                        cfg.source, path, line, f"{_json_error(e)} in the JSON document",
                        f"repair line {line}; a JSON document cannot lose a line, so data.on_bad_row=skip does not "
                        "apply (write the rows as JSON Lines, one object per line, to skip malformed ones)", field=field
                    ) from None
            return None
    num_rows, bad = scan_json_lines(files)
    if not bad:
        return None
    if cfg.limit is not None:  # rows past the limit are not read, malformed or not
        num_rows = min(num_rows, cfg.limit)
        bad = [b for b in bad if b.row < num_rows]
    if bad and cfg.on_bad_row == "error":
        first, more = bad[0], bad[1:]
        also = ""
        if more:
            shown = ", ".join(str(b.line) if b.path == first.path else f"{Path(b.path).name}:{b.line}"
                              for b in more[:5])
            also = (f"; {len(more)} more malformed line{'s' if len(more) > 1 else ''} "
                    f"({shown}{', ...' if len(more) > 5 else ''})")
        raise BadLineError(cfg.source, first.path, first.line, f"{first.reason}{also}",
                           f"repair or delete line {first.line}, or set data.on_bad_row=skip to leave malformed "
                           "lines out (they are counted with the other bad rows)", field=field)
    return num_rows, bad


def _read_around_bad_lines(cfg: DataConfig, files: list[str]) -> Optional[Rows]:
    """After `datasets` failed on JSON files: None when no line is malformed (the failure is something else), else
    the rows of the other lines, read from a cleaned copy (or `locate_bad_lines`'s error)."""
    import datasets

    found = locate_bad_lines(cfg, files)
    if found is None:
        return None
    num_rows, bad = found
    if len(bad) == num_rows:
        raise DataLoadError(f"data.source={cfg.source!r}: none of its {num_rows} rows is a JSON object (first: "
                            f"{bad[0]}). Fix: check that the file is JSON Lines, one object per line")
    bad_rows = {b.row for b in bad}
    keep = tuple(i for i in range(num_rows) if i not in bad_rows)
    with tempfile.TemporaryDirectory(prefix="dasd-data-") as tmp:
        clean = os.path.join(tmp, "rows.jsonl")
        _write_rows(files, keep, clean)
        ds = datasets.load_dataset("json", data_files=[clean], split="train", cache_dir=os.path.join(tmp, "cache"),
                                   keep_in_memory=True)
    return Rows(ds, num_rows, tuple(bad), keep)


def _write_rows(files: Sequence[str], rows: Sequence[int], out: str) -> None:
    """Copy the non-blank lines whose row number is in `rows` into `out`."""
    wanted, row = set(rows), 0
    with open(out, "wb") as w:
        for path in files:
            with open(path, "rb") as f:
                for raw in f:
                    line = raw.strip(b" \t\r\n")
                    if line:
                        if row in wanted:
                            w.write(line + b"\n")
                        row += 1


def _load_hub(name: str, subset: Optional[str], split: str, cache_dir: Optional[str]):
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split, cache_dir=cache_dir)
    except (ConnectionError, OSError) as e:
        raise DataLoadError(
            f"data.source={name!r}: could not load it from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Fix: use a local file (data.source=/path/to/file.jsonl, .parquet or a folder of them), or run where "
            "the hub is reachable with HF_DATASETS_OFFLINE unset"
        ) from e
    except ValueError as e:
        raise DataLoadError(
            f"data.source={name!r} subset={subset!r} split={split!r}: {e}. Fix: check data.subset (e.g. 'main' "
            "for openai/gsm8k) and data.split, or use a local file"
        ) from e
