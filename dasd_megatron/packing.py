"""Packing and partitioning of sized items.

- `next_fit`: greedy in-order packing under a budget, shared by micro-batch planning (`train/batch.py`,
  ``strategy="in_order"``), weight-sync buckets and safetensors shards (`model/export.py`), where order matters.
- `first_fit_decreasing`: fuller bins under the same budget when order does not matter (micro-batch planning,
  the default ``strategy="ffd"``).
- `karmarkar_karp` and `balanced_dp_split`: token-balanced split of a batch of rollouts over data-parallel ranks.

Everything here is deterministic: the same sizes always give the same result (ties are broken by item index), so
every rank computes the same plan without communicating.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Sequence

__all__ = ["next_fit", "first_fit_decreasing", "karmarkar_karp", "balanced_dp_split"]


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


def first_fit_decreasing(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of total size at most `budget`: items are placed largest first (ties: lower index first) into the first
    open bin they fit in, else into a new bin. An item larger than `budget` gets a bin of its own (nothing fits
    beside it, not even a zero-sized item), as in `next_fit`. Returns the bins as lists of item indices, each sorted
    ascending, the bins ordered by their smallest index. Deterministic.

    FFD uses at most 11/9 OPT + 6/9 bins; it is not guaranteed to use no more bins than `next_fit` on every input
    order (next-fit can be lucky on one particular order), but in practice it almost always uses fewer or as many."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    used: list[int] = []
    for i in order:
        s = sizes[i]
        for b, u in enumerate(used):
            if u + s <= budget:
                bins[b].append(i)
                used[b] = u + s
                break
        else:
            bins.append([i])
            used.append(s)
    for b in bins:
        b.sort()
    bins.sort(key=lambda b: b[0])
    return bins


def karmarkar_karp(sizes: Sequence[int], k: int, equal_size: bool) -> list[list[int]]:
    """Split items into `k` parts of near-equal total size: the largest differencing method (Karmarkar-Karp) for
    k-way number partitioning, as verl's `get_seqlen_balanced_partitions` (`verl/utils/seqlen_balancing.py`).

    Every item starts as a partial solution of k parts (itself plus k-1 empty parts); repeatedly the two partial
    solutions with the largest spread (largest part sum minus smallest) are merged, pairing the largest part of
    one with the smallest part of the other, until one solution is left. With `equal_size=True` the items, sorted
    by size, are instead seeded k at a time (one per part), so every merge keeps the counts equal and each part ends
    with ``len(sizes) // k`` items (``len(sizes) % k`` must be 0, else ValueError); each final part then holds
    exactly one item of each seed group.

    Returns `k` lists of item indices (every index exactly once), each sorted ascending, the parts ordered by their
    smallest index (empty parts, possible when ``len(sizes) < k`` without `equal_size`, last). Deterministic: ties
    (equal sizes, equal spreads) are broken by item index / creation order."""
    if k < 1:
        raise ValueError(f"karmarkar_karp: k must be at least 1, got {k}")
    n = len(sizes)
    if equal_size and n % k != 0:
        raise ValueError(f"karmarkar_karp: equal_size needs len(sizes) ({n}) to be a multiple of k ({k})")
    order = sorted(range(n), key=lambda i: (sizes[i], i))
    # a partial solution: k parts [sum, indices], sorted largest sum first; heap entries (-spread, seq, parts),
    # seq (creation order) breaks ties and keeps the lists out of comparisons
    heap: list[tuple[int, int, list[list]]] = []
    seq = 0

    def push(parts: list[list]) -> None:
        nonlocal seq
        parts.sort(key=lambda p: p[0], reverse=True)  # stable: equal sums keep their order
        heapq.heappush(heap, (-(parts[0][0] - parts[-1][0]), seq, parts))
        seq += 1

    step = k if equal_size else 1
    for a in range(0, n, step):
        group = order[a:a + step]
        push([[sizes[i], [i]] for i in group] + [[0, []] for _ in range(k - len(group))])
    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        _, _, big = heapq.heappop(heap)
        _, _, other = heapq.heappop(heap)
        # largest part of one with the smallest of the other: the merged spread is as small as this pairing allows
        for p, q in zip(big, reversed(other)):
            p[0] += q[0]
            p[1].extend(q[1])
        push(big)
    parts = [sorted(p[1]) for p in heap[0][2]]
    parts.sort(key=lambda p: (0, p[0]) if p else (1, 0))
    return parts


def balanced_dp_split(sizes: Sequence[int], dp: int) -> list[list[int]]:
    """The rollouts of one batch (token counts `sizes`) for `dp` data-parallel ranks: part r is rank r's list of
    rollout indices, sorted ascending, the parts ordered by their smallest index (empty parts, when there are fewer
    rollouts than ranks, last). Counts are equal when ``len(sizes) % dp == 0``, else they differ by at most one;
    within that, the largest token sum is kept small.

    Two candidates, the one with the smaller largest sum kept (a tie: the first): `karmarkar_karp` with
    `equal_size=True`, and the greedy LPT (largest first, each to the part with the smallest sum that still has
    room). KK is usually the better of the two (it is near-perfect on realistic batches), but it minimises the
    spread, not the largest sum, and on small or skewed instances greedy sometimes wins; LPT costs O(n dp).

    Uneven counts: for KK the sizes are padded in front with ``(-len(sizes)) % dp`` zero-sized dummies (fewer than
    `dp`), partitioned with equal counts, and the dummies dropped. The dummies sort first (size 0, lowest indices),
    so they form KK's first seed group and end in distinct parts: counts differ by at most one. LPT gives
    ``len(sizes) % dp`` parts one item more than the others.

    Why this is safe: the DASD loss is a global token mean (token sums and counts are all-reduced over DP), and the
    gradient is all-reduced too, so which rank holds which rollout changes nothing mathematically, only how long
    the ranks wait for the one with the most tokens. The strided split ``[r::dp]`` ignores lengths; this one
    balances them. Deterministic, so every rank computes the same split without communicating.

    This holds for one optimizer update per batch. With several (`train.updates_per_batch`), each rank cuts its own
    share, in order, into mini-batches and update j trains on the union of every rank's j-th cut: the split then
    decides which rollouts share an update, and the balance holds for the whole batch, not per update. To keep
    both, cut the batch into mini-batches first and split each one (call this once per mini-batch)."""
    if dp < 1:
        raise ValueError(f"balanced_dp_split: dp must be at least 1, got {dp}")
    pad = (-len(sizes)) % dp
    kk = [[i - pad for i in p if i >= pad] for p in karmarkar_karp([0] * pad + list(sizes), dp, equal_size=True)]
    best = kk
    lpt = _lpt_equal_counts(sizes, dp)
    if max(_part_sum(sizes, p) for p in lpt) < max(_part_sum(sizes, p) for p in kk):
        best = lpt
    best.sort(key=lambda p: (0, p[0]) if p else (1, 0))
    return best


def _part_sum(sizes: Sequence[int], part: Sequence[int]) -> int:
    return sum(sizes[i] for i in part)


def _lpt_equal_counts(sizes: Sequence[int], k: int) -> list[list[int]]:
    """Greedy LPT under count limits: items largest first (ties: lower index), each to the part with the smallest
    sum (ties: lower part) among those with room; ``len(sizes) % k`` parts may take one item more than the others.
    Parts sorted ascending inside."""
    n = len(sizes)
    q, extra = divmod(n, k)
    sums, parts = [0] * k, [[] for _ in range(k)]
    for i in sorted(range(n), key=lambda i: (-sizes[i], i)):
        j = min((j for j in range(k) if len(parts[j]) < q or (len(parts[j]) == q and extra > 0)),
                key=lambda j: (sums[j], j))
        if len(parts[j]) == q:
            extra -= 1
        parts[j].append(i)
        sums[j] += sizes[i]
    return [sorted(p) for p in parts]
