"""Errors of the data pipeline. Messages follow the config convention: what, the value, the rule, and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """A data set could not be loaded or used."""


class DataLoadError(DataError):
    """`data.source` could not be loaded (missing file, unknown format, hub unreachable)."""


class BadRowError(DataError):
    """A row has no usable problem or answer and `data.on_bad_row=error`."""

    def __init__(self, index: int, field: str, reason: str, fix: str):
        self.index, self.field, self.reason = index, field, reason
        super().__init__(f"row {index}: field {field!r}: {reason}. Fix: {fix}")


class BadLineError(DataLoadError):
    """A line of a JSON (Lines) file is not one JSON object, and it cannot or may not be skipped."""

    def __init__(self, source: str, path: str, line: int, reason: str, fix: str, field: str = "data.source"):
        self.source, self.path, self.line, self.reason = source, path, line, reason
        super().__init__(f"{field}={source!r}: line {line} of {path}: {reason}. Fix: {fix}")
