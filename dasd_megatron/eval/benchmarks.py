"""The six DASD evaluation benchmarks: where each one comes from and how its gold answer is read.

| key (name) | local folder | hub: name, subset, split | rows | gold |
| --- | --- | --- | --- | --- |
| math500 (MATH500) | math500 | HuggingFaceH4/MATH-500, test | 500 | `answer` |
| minerva (Minerva) | minerva_math | math-ai/minervamath, test | 272 | last `\\boxed{}` of `solution` (hub: `answer`) |
| olympiadbench | olympiadbench | Hothan/OlympiadBench, OE_TO_maths_en_COMP, train | 675 | `final_answer` |
| aime24 (AIME24) | aime24 | HuggingFaceH4/aime_2024, train | 30 | `answer` |
| aime25 (AIME25) | aime25 | math-ai/aime25, test | 30 | `answer` |
| hmmt25 (HMMT25) | hmmt_feb_2025 | MathArena/hmmt_feb_2025, train | 30 | `answer` |

Local folders hold `test.jsonl`. OlympiadBench's `final_answer` is a list: any element counts as correct.

Where the data comes from (`resolve_data_dir`): a data folder holding the local copies (`--data-dir`, else the
environment variable `DASD_EVAL_DATA_DIR`, else `../shared/data` next to this repository when it exists), or the
Hugging Face hub by name when there is no data folder (or with `hub=True`). The local files' columns are detected
by `dasd_megatron.data` (see its schema table); the hub copy of Minerva already has the boxed answer extracted into
an `answer` column next to `question`, so it is read with explicit fields (auto-detection would take it for GSM8K).

Your own evaluation set (`dasd eval --data`, `EvalConfig.data`): any data set training accepts (a local .jsonl /
.json / .parquet / .csv file or folder, or a hub id), read by `dasd_megatron.data.load_math_dataset` with the same
schemas and field mapping (`data.schema`, `data.problem_field`, ...). It is one more benchmark: its key is
`DataConfig.name` (`custom_data_config` sets it from `--data-name`, else from the source: the file stem, the folder for
a generic file name such as heldout/test.jsonl, the last part of a hub id), its records are `records/<key>.jsonl`,
and it gets the same metrics and report rows. A key must not be one of the six benchmarks' names.

A problem is identified by (benchmark key, `MathExample.index`, the row's position in the file) plus a short hash of
its text, so records of one data source are never matched against another source's rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from dasd_megatron.data import DataConfig, MathDataset, MathExample, load_math_dataset
from dasd_megatron.eval.errors import EvalError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "DASD_EVAL_DATA_DIR"


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set: its key, display name, local folder, hub coordinates and expected row count."""

    key: str
    name: str
    folder: str
    hub: str
    hub_split: str
    rows: int
    hub_subset: Optional[str] = None
    hub_problem_field: Optional[str] = None
    """Set when the hub copy's columns are not auto-detected correctly (read with the `plain` schema)."""
    hub_answer_field: Optional[str] = None

    def data_config(self, data_dir: Optional[str], limit: Optional[int] = None) -> DataConfig:
        """The `DataConfig` that loads this benchmark from `data_dir` (local copy) or, when None, from the hub."""
        if data_dir is not None:
            folder = Path(data_dir) / self.folder
            if not folder.is_dir():
                raise EvalError(f"benchmark {self.key}: no folder {folder}. Fix: point --data-dir at a folder holding "
                                f"{self.folder}/test.jsonl, or leave it out to load {self.hub} from the hub")
            return DataConfig(source=str(folder), split="test", name=self.key, limit=limit, shuffle=False)
        if self.hub_problem_field:
            return DataConfig(source=self.hub, subset=self.hub_subset, split=self.hub_split, schema="plain",
                              problem_field=self.hub_problem_field, answer_field=self.hub_answer_field,
                              name=self.key, limit=limit, shuffle=False)
        return DataConfig(source=self.hub, subset=self.hub_subset, split=self.hub_split, name=self.key, limit=limit,
                          shuffle=False)


BENCHMARKS: dict[str, Benchmark] = {b.key: b for b in (
    Benchmark("math500", "MATH500", "math500", "HuggingFaceH4/MATH-500", "test", 500),
    Benchmark("minerva", "Minerva", "minerva_math", "math-ai/minervamath", "test", 272,
              hub_problem_field="question", hub_answer_field="answer"),
    Benchmark("olympiadbench", "OlympiadBench", "olympiadbench", "Hothan/OlympiadBench", "train", 675,
              hub_subset="OE_TO_maths_en_COMP"),
    Benchmark("aime24", "AIME24", "aime24", "HuggingFaceH4/aime_2024", "train", 30),
    Benchmark("aime25", "AIME25", "aime25", "math-ai/aime25", "test", 30),
    Benchmark("hmmt25", "HMMT25", "hmmt_feb_2025", "MathArena/hmmt_feb_2025", "train", 30),
)}
ALL_BENCHMARKS = tuple(BENCHMARKS)
_ALIASES = {"minerva_math": "minerva", "olympiad": "olympiadbench", "hmmt_feb_2025": "hmmt25", "hmmt": "hmmt25",
            "math": "math500", "math-500": "math500"}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name` (its key, display name, local folder name or a common alias; any case)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {name!r}. Fix: use some of {', '.join(ALL_BENCHMARKS)}")
    return BENCHMARKS[key]


def parse_benchmarks(names: Sequence[str] | str) -> tuple[str, ...]:
    """Benchmark keys from names (a list, or one comma-separated string), in the canonical order, no repeats."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    keys = {get_benchmark(n).key for n in names if n.strip()}
    if not keys:
        raise EvalError(f"no benchmark selected. Fix: use some of {', '.join(ALL_BENCHMARKS)}")
    return tuple(k for k in ALL_BENCHMARKS if k in keys)


def repo_data_dir() -> Optional[str]:
    """`../shared/data` next to this repository, when it exists (the local copies on this project's machines)."""
    path = Path(__file__).resolve().parents[3] / "shared" / "data"
    return str(path) if path.is_dir() else None


def resolve_data_dir(data_dir: Optional[str] = None, hub: bool = False) -> Optional[str]:
    """The folder to load the benchmarks from, or None for the hub (see module docstring)."""
    if hub:
        return None
    if data_dir:
        if not os.path.isdir(data_dir):
            raise EvalError(f"--data-dir {data_dir}: no such folder. Fix: give the folder holding math500/, "
                            "aime24/, ... or leave it out to use the hub")
        return os.path.abspath(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        if not os.path.isdir(env):
            raise EvalError(f"{DATA_DIR_ENV}={env}: no such folder. Fix: unset it or point it at the data folder")
        return os.path.abspath(env)
    return repo_data_dir()


def load_benchmark(key: str, data_dir: Optional[str], limit: Optional[int] = None) -> MathDataset:
    """The examples of one benchmark (first `limit` rows when set); warns when the row count is unexpected."""
    bench = get_benchmark(key)
    data = load_math_dataset(bench.data_config(data_dir, limit))
    want = bench.rows if limit is None else min(limit, bench.rows)
    if len(data) != want:
        log.warning("benchmark %s: %d problems, expected %d (%s)", bench.key, len(data), want, data.summary())
    return data


def problem_hash(example: MathExample) -> str:
    """A short stable hash of a problem's text (detects records made from a different data file)."""
    return hashlib.sha1(example.problem.encode("utf-8")).hexdigest()[:12]


def gold_json(example: MathExample):
    """The gold answer as stored in records: a string, or a list of acceptable answers."""
    return list(example.answer) if isinstance(example.answer, tuple) else example.answer


_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_builtin(name: str) -> bool:
    """Whether `name` names one of the six benchmarks (key, display name, folder or alias; any case)."""
    key = name.strip().lower()
    return _ALIASES.get(key, key) in BENCHMARKS or any(key in (b.name.lower(), b.folder) for b in BENCHMARKS.values())


def display_name(key: str) -> str:
    """A benchmark's display name (MATH500, AIME24, ...), or a custom evaluation set's key as is."""
    return BENCHMARKS[key].name if key in BENCHMARKS else key


def custom_key(source: str, name: Optional[str] = None) -> str:
    """The key (records file name, report row) of a custom evaluation set: `name`, else derived from `source`."""
    from dasd_megatron.data.loading import default_name, is_local

    if name:
        key = name
    elif is_local(source):
        key = default_name(source)
    else:
        key = source.rstrip("/").split("/")[-1]
    if not _KEY.fullmatch(key):
        raise EvalError(f"evaluation set name {key!r} (from {source!r}): it names the records file and the report "
                        "row, so it must be letters, digits, '.', '_' or '-'. Fix: pass --data-name NAME")
    if is_builtin(key):
        raise EvalError(f"evaluation set name {key!r} (from {source!r}) is also a built-in benchmark's name, so "
                        "their records would mix. Fix: pass --data-name NAME with another name, e.g. my_" + key)
    return key


def custom_data_config(source: str, *, name: Optional[str] = None, split: str = "test", **fields) -> DataConfig:
    """The `DataConfig` of a custom evaluation set (`dasd eval --data`): the same options as `data.*` of training
    (`schema`, `problem_field`, `answer_field`, `solution_field`, `subset`, `on_bad_row`, ...) as keyword
    arguments; `name` is its key (see `custom_key`); rows in file order."""
    if not source:
        raise EvalError("--data '': no evaluation set given. Fix: give a .jsonl/.parquet file or folder, or a hub id")
    return DataConfig(source=source, split=split, name=custom_key(source, name), shuffle=False, **fields)


def load_custom(data: DataConfig, limit: Optional[int] = None) -> MathDataset:
    """The examples of a custom evaluation set (first `limit` rows when set), read like training data."""
    return load_math_dataset(dataclasses.replace(data, limit=limit, shuffle=False))
