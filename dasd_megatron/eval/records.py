"""Per-problem records of an evaluation run: one JSON line per problem in `records/<benchmark>.jsonl`.

A record holds everything needed to recompute every metric and to compare runs problem by problem::

    {"benchmark": "aime24", "problem_id": 3, "problem_hash": "1f0c...", "gold": "204" | ["a", "b"],
     "n": 16, "num_correct": 5, "seed": 123, "weight_version": "default",
     "samples": [{"extracted": "204" | null, "status": "correct", "tokens": 1234, "finish": "stop",
                  "logprob_sum": -345.6, "logprob_mean": -0.28, "logprob_min": -9.1,
                  "markers": {"wait": 3, "check": 1}, "text": "..." (with save_responses)}, ...]}

`status` is one of `dasd_megatron.reward.STATUSES` (correct, incorrect, unparseable, timeout, error).

Durability: a record is appended, flushed and fsync'ed as soon as its problem is scored, so a crash loses at most the
problems in flight. A crash in the middle of a write leaves a last line without its newline: `read_records` drops
it (with a warning) and `RecordWriter` cuts it off before appending, so the file stays valid JSONL. A malformed line
anywhere else is corruption and raises, naming the file and line.

The run folder also holds `eval_config.json` (the run's identity, see `EvalConfig.identity`), checked by
`check_manifest` before a rerun appends to the records.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Optional

from dasd_megatron.eval.errors import EvalError

log = logging.getLogger(__name__)

RECORDS_DIR = "records"
MANIFEST = "eval_config.json"


def records_path(run_dir: str, benchmark: str) -> Path:
    return Path(run_dir) / RECORDS_DIR / f"{benchmark}.jsonl"


def _valid_prefix(path: Path) -> tuple[list[dict], int, bool]:
    """`(records, bytes of the valid prefix, torn_tail)` of a JSONL file."""
    data = path.read_bytes()
    out: list[dict] = []
    pos = 0
    lineno = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        lineno += 1
        if end < 0:  # no newline: a write that was cut off
            return out, pos, True
        line = data[pos:end].strip()
        if line:
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise EvalError(f"{path}: line {lineno} is not a valid record ({e}). Fix: remove that line (the "
                                "problem is then generated again), or use a new output folder") from None
            out.append(rec)
        pos = end + 1
    return out, pos, False


def read_records(path: str | Path) -> list[dict]:
    """The records of one JSONL file ([] if it does not exist); a torn last line is ignored with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    records, _, torn = _valid_prefix(path)
    if torn:
        log.warning("%s: ignoring an incomplete last line (a write was interrupted)", path)
    return records


def read_run_records(run_dir: str) -> dict[str, list[dict]]:
    """All records of a run folder, by benchmark key (file stem), de-duplicated by problem id (first wins)."""
    folder = Path(run_dir) / RECORDS_DIR
    if not folder.is_dir():
        raise EvalError(f"{run_dir}: no {RECORDS_DIR}/ folder. Fix: give the --output folder of a `dasd eval` run")
    out = {}
    for path in sorted(folder.glob("*.jsonl")):
        out[path.stem] = dedupe(read_records(path), str(path))
    return out


def dedupe(records: Iterable[dict], where: str = "") -> list[dict]:
    """Keep the first record of each problem id (a problem recorded twice, e.g. by two concurrent runs)."""
    seen: dict = {}
    for rec in records:
        pid = rec.get("problem_id")
        if pid in seen:
            log.warning("%s: problem %s is recorded twice; keeping the first record", where, pid)
            continue
        seen[pid] = rec
    return list(seen.values())


class RecordWriter:
    """Appends records to one benchmark's JSONL file, durably (see module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _, valid, torn = _valid_prefix(self.path)
            if torn:
                log.warning("%s: cutting off an incomplete last line before appending", self.path)
                with open(self.path, "r+b") as f:
                    f.truncate(valid)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(run_dir: str) -> Optional[dict]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_manifest(run_dir: str, identity: dict) -> None:
    """Write the run's identity into `run_dir`, or check it against the one already there (a resume)."""
    old = read_manifest(run_dir)
    if old is None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(run_dir) / MANIFEST, identity)
        return
    diffs = [f"{k}: recorded {old.get(k)!r}, now {identity.get(k)!r}" for k in sorted(set(old) | set(identity))
             if old.get(k) != identity.get(k)]
    if diffs:
        raise EvalError(f"{run_dir} holds records of an evaluation with other settings ({'; '.join(diffs)}). "
                        "Resuming would mix two experiments. Fix: use the same settings, or another --output folder")
