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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from dasd_megatron.data.config import DataConfig
from dasd_megatron.data.errors import DataLoadError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_GENERIC_STEMS = {"train", "test", "validation", "valid", "dev", "data", "eval"}


def is_local(source: str) -> bool:
    """True when `source` names (or tries to name) a local file or folder rather than a hub data set."""
    p = Path(os.path.expanduser(source))
    return p.exists() or source.startswith(("/", ".", "~")) or p.suffix.lower() in FORMATS


def data_files(source: str, split: str) -> tuple[str, list[str]]:
    """`(format, files)` for a local source (see module docstring)."""
    p = Path(os.path.expanduser(source))
    if not p.exists():
        raise DataLoadError(f"data.source={source!r}: no such file or folder. Fix: check the path (relative paths "
                            f"are resolved from {os.getcwd()})")
    if p.is_file():
        fmt = FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise DataLoadError(f"data.source={source!r}: unknown file type {p.suffix!r}. Fix: use one of "
                                f"{sorted(FORMATS)}")
        return fmt, [str(p)]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FORMATS)
    if not files:
        raise DataLoadError(f"data.source={source!r}: the folder has no {sorted(FORMATS)} files. Fix: point "
                            "data.source at a data file or a folder holding them")
    if len(files) > 1:
        files = [f for f in files if f.name.startswith(split)]
        if not files:
            names = sorted(f.name for f in p.iterdir() if f.suffix.lower() in FORMATS)
            raise DataLoadError(f"data.split={split!r}: no file in {source!r} starts with it (files: {names}). "
                                "Fix: set data.split to a file-name prefix or data.source to one file")
    fmts = {FORMATS[f.suffix.lower()] for f in files}
    if len(fmts) > 1:
        raise DataLoadError(f"data.source={source!r}: split {split!r} mixes formats {sorted(fmts)}. Fix: point "
                            "data.source at one file")
    return fmts.pop(), [str(f) for f in files]


def default_name(source: str) -> str:
    """A short label for the data set: the folder name for generic file names (math500/test.jsonl -> math500),
    the file stem otherwise, the hub name as given."""
    if not is_local(source):
        return source
    p = Path(os.path.expanduser(source)).resolve()
    if p.is_file() and p.stem.lower() in _GENERIC_STEMS:
        return p.parent.name
    return p.stem if p.is_file() else p.name


def load_rows(cfg: DataConfig):
    """The raw `datasets.Dataset` of `cfg.source` (first `cfg.limit` rows when set)."""
    import datasets

    if not cfg.source:
        raise DataLoadError("data.source='': no data set given. Fix: set data.source to a hub name such as "
                            "BytedTsinghua-SIA/DAPO-Math-17k or a local .jsonl/.parquet file or folder")
    if is_local(cfg.source):
        fmt, files = data_files(cfg.source, cfg.split)
        try:
            ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cfg.cache_dir)
        except Exception as e:  # noqa: BLE001 - re-raised with the file and the fix
            raise DataLoadError(f"data.source={cfg.source!r}: datasets could not read {files} as {fmt} "
                                f"({type(e).__name__}: {e}). Fix: check the file's format") from e
    else:
        ds = _load_hub(cfg.source, cfg.subset, cfg.split, cfg.cache_dir)
    if cfg.limit is not None and cfg.limit < len(ds):
        ds = ds.select(range(cfg.limit))
    return ds


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
