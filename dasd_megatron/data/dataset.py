"""`load_math_dataset`: load a split, map every row to a `MathExample`, and report the rows that cannot be used.

Bad rows (a line of a JSON Lines file that is not a JSON object, no usable problem or answer, or a student prompt
over `data.max_prompt_tokens`) are collected as `BadRow(index, field, reason)`: with `data.on_bad_row=skip` they are logged (the first few one by one, then a
summary count) and left out; with `error` the first one raises `BadRowError` naming the row, the field and the fix
(`BadLineError` naming the file and the line for a malformed JSON line, see `dasd_megatron.data.loading`). One policy
for both: a file with a broken line is treated like a file with an empty answer, and `skip` (the default) keeps a
long run going while the log says what was left out.
A bad row never crashes the skip mode: the mapping of a row is wrapped so that even an unexpected exception becomes a
bad row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from dasd_megatron.data.config import DataConfig
from dasd_megatron.data.errors import BadRowError, DataError
from dasd_megatron.data.example import BadRow, MathExample
from dasd_megatron.data.loading import default_name, read_rows
from dasd_megatron.data.prompts import student_prompt_lengths
from dasd_megatron.data.schemas import RowMapper, check_columns, detect_schema, resolve_fields

log = logging.getLogger(__name__)

_LOGGED_BAD_ROWS = 5


@dataclass(frozen=True)
class MathDataset:
    """The usable examples of one split, and what was left out."""

    name: str
    schema: str
    num_rows: int
    """Rows read (after `data.limit`), malformed JSON lines included."""
    examples: tuple[MathExample, ...]
    bad_rows: tuple[BadRow, ...] = ()
    duplicates: int = 0
    """Rows dropped by `data.dedupe`."""
    stripped_instructions: int = 0
    """Problems that lost an instruction wrapper."""
    long_prompts: int = field(default=0)
    """Bad rows among `bad_rows` whose student prompt was over `data.max_prompt_tokens`."""
    malformed_lines: int = 0
    """Bad rows among `bad_rows` that were lines of a JSON Lines file but not JSON objects."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> MathExample:
        return self.examples[i]

    def __iter__(self) -> Iterator[MathExample]:
        return iter(self.examples)

    def summary(self) -> str:
        return (f"{self.name} ({self.schema}): {len(self.examples)} examples from {self.num_rows} rows; "
                f"{len(self.bad_rows)} bad rows skipped ({self.malformed_lines} malformed JSON lines, "
                f"{self.long_prompts} over the prompt limit), {self.duplicates} duplicates dropped, "
                f"{self.stripped_instructions} instruction wrappers removed")


def _fix_for(bad: BadRow) -> str:
    if "max_prompt_tokens" in bad.reason:
        return "raise data.max_prompt_tokens, or set data.on_bad_row=skip to leave such rows out"
    return (f"repair or remove row {bad.index}, point data.problem_field/data.answer_field at the right columns, "
            "or set data.on_bad_row=skip to leave such rows out")


def _report(bad_rows: list[BadRow], cfg: DataConfig, name: str) -> None:
    if not bad_rows:
        return
    if cfg.on_bad_row == "error":
        b = bad_rows[0]
        raise BadRowError(b.index, b.field, b.reason, _fix_for(b))
    for b in bad_rows[:_LOGGED_BAD_ROWS]:
        log.warning("data %s: skipping %s", name, b)
    log.warning("data %s: %d bad rows skipped in all (data.on_bad_row=skip)", name, len(bad_rows))


def load_math_dataset(cfg: DataConfig, tokenizer: Any = None) -> MathDataset:
    """Load `cfg.source`, map it with `cfg.schema`, and (with a tokenizer and `max_prompt_tokens`) drop long prompts."""
    if cfg.max_prompt_tokens is not None and tokenizer is None:
        raise DataError(f"data.max_prompt_tokens={cfg.max_prompt_tokens}: filtering by prompt length needs a "
                        "tokenizer. Fix: pass tokenizer= to load_math_dataset, or set data.max_prompt_tokens=null")
    rows = read_rows(cfg)
    ds = rows.dataset
    name = cfg.name or default_name(cfg.source)
    schema = detect_schema(ds.column_names) if cfg.schema == "auto" else cfg.schema
    fields = resolve_fields(schema, cfg.problem_field, cfg.answer_field, cfg.solution_field)
    check_columns(schema, fields, ds.column_names)
    mapper = RowMapper(schema, fields, name, strip=cfg.strip_instructions)

    examples: list[MathExample] = []
    bad: list[BadRow] = [b.bad_row() for b in rows.bad_lines]  # on_bad_row=error raised in read_rows already
    seen: set = set()
    duplicates = 0
    for position, row in enumerate(ds):
        index = rows.row_number(position)
        try:
            out = mapper(row, index)
        except Exception as e:  # noqa: BLE001 - a malformed row is a bad row, not a crash
            out = BadRow(index, "row", f"could not be read ({type(e).__name__}: {e})")
        if isinstance(out, BadRow):
            bad.append(out)
            if cfg.on_bad_row == "error":
                break
            continue
        if cfg.dedupe:
            key = (out.problem, out.answer)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        examples.append(out)
    bad.sort(key=lambda b: b.index)
    _report(bad, cfg, name)

    long_prompts = 0
    if cfg.max_prompt_tokens is not None:
        examples, too_long = _drop_long_prompts(examples, tokenizer, cfg)
        _report(too_long, cfg, name)
        bad.extend(too_long)
        long_prompts = len(too_long)

    out = MathDataset(name=name, schema=schema, num_rows=rows.num_rows, examples=tuple(examples),
                      bad_rows=tuple(sorted(bad, key=lambda b: b.index)), duplicates=duplicates,
                      stripped_instructions=mapper.stripped, long_prompts=long_prompts,
                      malformed_lines=len(rows.bad_lines))
    log.info("data %s", out.summary())
    if not out.examples:
        raise DataError(f"data.source={cfg.source!r}: no usable example among {rows.num_rows} rows ({len(bad)} bad). "
                        "Fix: "
                        "check data.schema and the field overrides against the file's columns")
    return out


def _drop_long_prompts(examples: list[MathExample], tokenizer: Any,
                       cfg: DataConfig) -> tuple[list[MathExample], list[BadRow]]:
    keep, bad = [], []
    limit = cfg.max_prompt_tokens
    for ex, n in zip(examples, student_prompt_lengths(tokenizer, examples, cfg.prompt)):
        if n > limit:
            bad.append(BadRow(ex.index, "problem", f"student prompt has {n} tokens > data.max_prompt_tokens={limit}"))
            if cfg.on_bad_row == "error":
                break
        else:
            keep.append(ex)
    return keep, bad

