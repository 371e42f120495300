"""Bucket plan: how a stream of (HF name, tensor) pairs is cut into transfer buckets, computed once.

The plan is a list of buckets of `TensorSpec(name, shape, dtype)`, cut greedily in stream order: a bucket closes
when the next tensor would take it past `bucket_bytes` or has another dtype (a flattened bucket holds one dtype).
A tensor larger than `bucket_bytes` travels alone. The first sync records the plan from the stream itself;
every later sync checks that the stream matches it tensor by tensor (same names, shapes, dtypes, order), so a
model or exporter change is caught as an error instead of a silent mis-load, and transports can pre-compute
per-bucket metadata (the distributed transport sends names/dtypes/shapes per bucket).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

__all__ = ["TensorSpec", "BucketPlan", "iter_named_tensors", "BucketStream", "PlanMismatch"]

NamedTensor = tuple[str, torch.Tensor]


class PlanMismatch(ValueError):
    """The weight stream differs from the bucket plan computed at the first sync."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        return cls(name, tuple(t.shape), t.dtype)


@dataclass(frozen=True)
class BucketPlan:
    buckets: tuple[tuple[TensorSpec, ...], ...]
    bucket_bytes: int

    @classmethod
    def build(cls, specs: Sequence[TensorSpec], bucket_bytes: int) -> "BucketPlan":
        b = _Builder(bucket_bytes)
        for s in specs:
            b.add(s)
        return b.plan()

    @classmethod
    def from_tensors(cls, tensors: Sequence[tuple[str, Sequence[int], torch.dtype]],
                     bucket_bytes: int) -> "BucketPlan":
        """From (name, shape, dtype) triples, e.g. `dasd_megatron.model.export.ExportPlan.tensors()`: a plan
        known before the first sync (no look-ahead needed then)."""
        return cls.build([TensorSpec(n, tuple(s), d) for n, s, d in tensors], bucket_bytes)

    @property
    def specs(self) -> list[TensorSpec]:
        return [s for b in self.buckets for s in b]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def __len__(self) -> int:
        return len(self.buckets)


class _Builder:
    def __init__(self, bucket_bytes: int):
        if bucket_bytes <= 0:
            raise ValueError(f"weight_sync.bucket_bytes={bucket_bytes}: must be > 0 (e.g. 512 MiB)")
        self.bucket_bytes = bucket_bytes
        self.buckets: list[list[TensorSpec]] = []
        self.size = 0

    def add(self, s: TensorSpec) -> bool:
        """Add a spec; True if it opened a new bucket."""
        cur = self.buckets[-1] if self.buckets else None
        if cur is None or cur[0].dtype != s.dtype or self.size + s.nbytes > self.bucket_bytes:
            self.buckets.append([s])
            self.size = s.nbytes
            return True
        cur.append(s)
        self.size += s.nbytes
        return False

    def plan(self) -> BucketPlan:
        return BucketPlan(tuple(tuple(b) for b in self.buckets), self.bucket_bytes)


def iter_named_tensors(weights: Iterable[Union[NamedTensor, Sequence[NamedTensor]]]) -> Iterator[NamedTensor]:
    """Accept (name, tensor) pairs or buckets (lists) of them; yield pairs."""
    for item in weights:
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            if not isinstance(item[1], torch.Tensor):
                raise TypeError(f"weight {item[0]!r}: expected a torch.Tensor, got {type(item[1]).__name__}")
            yield item[0], item[1]
        elif isinstance(item, (tuple, list)):
            yield from iter_named_tensors(item)
        else:
            raise TypeError(f"weights must yield (name, tensor) pairs or lists of them, got {type(item).__name__}")


class BucketStream:
    """Cut a weight stream into buckets: by `plan` if given (checked), else greedily while recording the plan."""

    def __init__(self, plan: Optional[BucketPlan], bucket_bytes: int):
        self.plan = plan
        self.bucket_bytes = plan.bucket_bytes if plan is not None else bucket_bytes
        self.recorded: Optional[BucketPlan] = None

    def __call__(self, weights) -> Iterator[list[NamedTensor]]:
        pairs = iter_named_tensors(weights)
        if self.plan is None:
            yield from self._record(pairs)
        else:
            yield from self._follow(pairs)

    def _record(self, pairs: Iterator[NamedTensor]) -> Iterator[list[NamedTensor]]:
        b = _Builder(self.bucket_bytes)
        cur: list[NamedTensor] = []
        seen = set()
        for name, t in pairs:
            if name in seen:
                raise PlanMismatch(f"weight {name!r} appears twice in the weight stream")
            seen.add(name)
            if b.add(TensorSpec.of(name, t)) and cur:
                yield cur
                cur = []
            cur.append((name, t))
        if cur:
            yield cur
        if not b.buckets:
            raise PlanMismatch("the weight stream is empty")
        self.recorded = b.plan()

    def _follow(self, pairs: Iterator[NamedTensor]) -> Iterator[list[NamedTensor]]:
        k = 0
        for bi, bucket in enumerate(self.plan.buckets):
            cur = []
            for spec in bucket:
                try:
                    name, t = next(pairs)
                except StopIteration:
                    raise PlanMismatch(f"weight stream ended at tensor #{k}; the plan expects {spec.name!r} "
                                       f"and {len(self.plan.specs) - k - 1} more") from None
                got = TensorSpec.of(name, t)
                if got != spec:
                    raise PlanMismatch(f"weight stream differs from the bucket plan at tensor #{k}: got "
                                       f"{got.name} {got.shape} {got.dtype}, planned {spec.name} {spec.shape} "
                                       f"{spec.dtype}. Fix: the model or exporter changed; build a new WeightSync")
                cur.append((name, t))
                k += 1
            yield cur
        extra = next(pairs, None)
        if extra is not None:
            raise PlanMismatch(f"weight stream has more tensors than the plan ({len(self.plan.specs)}), "
                               f"first extra: {extra[0]!r}")
        self.recorded = self.plan
