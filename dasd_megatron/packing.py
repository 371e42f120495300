"""Greedy in-order packing of sized items under a budget (next-fit), shared by micro-batch planning
(`train/batch.py`), weight-sync buckets and safetensors shards (`model/export.py`)."""

from __future__ import annotations

from typing import Iterable

__all__ = ["next_fit"]


def next_fit(sizes: Iterable[int], budget: int) -> list[list[int]]:
    """Group consecutive items, in order: item i joins the current group unless the group is non-empty and its size
    plus `sizes[i]` would exceed `budget`; then a new group starts with it. Returns the groups as lists of item
    indices. An item larger than `budget` gets a group of its own (callers that cannot allow that check first).
    Deterministic: the same sizes always give the same groups."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        groups.append(current)
    return groups
