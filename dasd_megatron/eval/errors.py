"""Errors of the evaluation pipeline. Messages say what went wrong, with which value, and the fix."""

from __future__ import annotations


class EvalError(ValueError):
    """Bad settings or inputs of an evaluation (unknown benchmark, mismatched resume, unreadable records, ...)."""


class EvalIncomplete(RuntimeError):
    """Generation failed for some problems (e.g. the server died); what finished is recorded, a rerun resumes."""

    def __init__(self, message: str, failed: int, recorded: int):
        super().__init__(message)
        self.failed, self.recorded = failed, recorded
