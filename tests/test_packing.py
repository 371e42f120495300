"""`next_fit`: greedy in-order packing under a budget, and its users (micro-batch plans, export buckets);
`first_fit_decreasing` (micro-batch plans); `karmarkar_karp` and `balanced_dp_split` (rollouts over DP ranks)."""

from __future__ import annotations

import itertools
import random

import pytest

from dasd_megatron.packing import balanced_dp_split, first_fit_decreasing, karmarkar_karp, next_fit


def test_next_fit_hand_computed():
    # budget 10: 4+5 fit, +3 would be 12; 3+7 fit exactly; 11 is over budget: a group of its own; then 2+8
    assert next_fit([4, 5, 3, 7, 11, 2, 8], 10) == [[0, 1], [2, 3], [4], [5, 6]]
    assert next_fit([], 10) == []
    assert next_fit([0, 0, 10, 0], 10) == [[0, 1, 2, 3]]  # zero-sized items join whatever group is open


def test_micro_batch_plan_counts_the_longer_padded_sequence_and_refuses_oversized_rollouts():
    from dasd_megatron.train.batch import Rollout, plan_micro_batches

    def rollout(prompt, teacher, response):
        return Rollout([1] * prompt, [1] * teacher, [2] * response, [-1.0] * response, reward=0.0, group=0)

    # lengths max(student, teacher): 7 (teacher 3+4), 6, 9; padded to 4: 8, 8, 12
    rollouts = [rollout(2, 3, 4), rollout(4, 1, 2), rollout(5, 5, 4)]
    assert plan_micro_batches(rollouts, 16, strategy="in_order") == [[0, 1], [2]]
    assert plan_micro_batches(rollouts, 16, pad_multiple=4, strategy="in_order") == [[0, 1], [2]]
    assert plan_micro_batches(rollouts, 15, strategy="in_order") == [[0, 1], [2]]
    assert plan_micro_batches(rollouts, 15, pad_multiple=4, strategy="in_order") == [[0], [1], [2]]
    # the default, first-fit decreasing: 9 first, then 7 beside it (16) or not (15, where 6 joins the 9 instead)
    assert plan_micro_batches(rollouts, 16) == [[0, 2], [1]]
    assert plan_micro_batches(rollouts, 15) == [[0], [1, 2]]
    assert plan_micro_batches(rollouts, 15, pad_multiple=4) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="rollout 2 needs 12 tokens, more than train.micro_batch_tokens=11"):
        plan_micro_batches(rollouts, 11, pad_multiple=4)


# -- first-fit decreasing ----------------------------------------------------------------------------------------------

def test_first_fit_decreasing_hand_computed():
    # budget 10, largest first: 11 alone (over budget); 8 -> bin1; 7 -> bin2; 5 -> bin3; 4 -> bin3 (9);
    # 3 -> bin2 (10); 2 -> bin1 (10). Bins by smallest index, indices ascending.
    assert first_fit_decreasing([4, 5, 3, 7, 11, 2, 8], 10) == [[0, 1], [2, 3], [4], [5, 6]]
    assert first_fit_decreasing([], 10) == []
    assert first_fit_decreasing([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]  # equal sizes: ties by index
    # an over-budget item has a bin of its own, even against a zero-sized item
    assert first_fit_decreasing([0, 12, 3], 10) == [[0, 2], [1]]
    # where next-fit wastes room, FFD fills it: 6, 5, 4, 5 under 10: next-fit 3 bins, FFD 2
    assert next_fit([6, 5, 4, 5], 10) == [[0], [1, 2], [3]]
    assert first_fit_decreasing([6, 5, 4, 5], 10) == [[0, 2], [1, 3]]


def test_first_fit_decreasing_respects_budget_and_beats_next_fit_on_random_inputs():
    rng = random.Random(0)
    ffd_total = nf_total = 0
    for _ in range(500):
        budget = rng.randint(10, 100)
        sizes = [rng.randint(0, budget + 10) for _ in range(rng.randint(0, 40))]  # some over budget
        bins = first_fit_decreasing(sizes, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(sizes)))  # every item exactly once
        assert all(b == sorted(b) for b in bins) and [b[0] for b in bins] == sorted(b[0] for b in bins)
        for b in bins:
            if any(sizes[i] > budget for i in b):
                assert len(b) == 1  # an over-budget item alone
            else:
                assert sum(sizes[i] for i in b) <= budget
        nf = next_fit(sizes, budget)
        # not a theorem (next-fit can be lucky on one order), but it holds on these instances
        assert len(bins) <= len(nf)
        assert first_fit_decreasing(sizes, budget) == bins  # deterministic
        ffd_total, nf_total = ffd_total + len(bins), nf_total + len(nf)
    assert ffd_total < 0.9 * nf_total


# -- Karmarkar-Karp ----------------------------------------------------------------------------------------------------

def _max_sum(sizes, parts):
    return max(sum(sizes[i] for i in p) for p in parts)


def _brute_force(sizes, k, equal_size):
    """The smallest possible largest part sum (item 0 fixed to part 0: the parts are interchangeable)."""
    n = len(sizes)
    best = None
    for rest in itertools.product(range(k), repeat=n - 1):
        assign = (0,) + rest
        if equal_size and any(assign.count(j) != n // k for j in range(k)):
            continue
        sums = [0] * k
        for i, j in enumerate(assign):
            sums[j] += sizes[i]
        best = max(sums) if best is None else min(best, max(sums))
    return best


def _lpt(sizes, k, equal_size):
    """Greedy LPT: largest first, each to the smallest part (with room, under equal_size)."""
    cap = len(sizes) // k if equal_size else len(sizes)
    sums, counts = [0] * k, [0] * k
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        j = min((j for j in range(k) if counts[j] < cap), key=lambda j: (sums[j], j))
        sums[j] += sizes[i]
        counts[j] += 1
    return max(sums)


def _check_partition(parts, n, k):
    assert len(parts) == k
    assert sorted(i for p in parts for i in p) == list(range(n))  # every index exactly once
    assert all(p == sorted(p) for p in parts)
    nonempty = [p[0] for p in parts if p]
    assert nonempty == sorted(nonempty) and all(parts[: len(nonempty)])  # by smallest index, empty parts last


def test_karmarkar_karp_hand_computed():
    # 2-way differencing: 8-7 -> 1, 6-5 -> 1, 4-1 -> 3, 3-1 -> 2: sums 16 | 14 (greedy LPT: 17 | 13)
    parts = karmarkar_karp([8, 7, 6, 5, 4], 2, equal_size=False)
    assert sorted(sum([8, 7, 6, 5, 4][i] for i in p) for p in parts) == [14, 16]
    assert _lpt([8, 7, 6, 5, 4], 2, False) == 17
    assert karmarkar_karp([], 3, equal_size=False) == [[], [], []]
    assert karmarkar_karp([5, 1], 3, equal_size=False) == [[0], [1], []]
    # equal counts: seeds (3:0, 3:1) and (3:2, 3:3); merged largest part with smallest; ties by index
    assert karmarkar_karp([3, 3, 3, 3], 2, equal_size=True) == [[0, 3], [1, 2]]
    parts = karmarkar_karp([10, 1, 1, 1, 1, 10], 2, equal_size=True)  # no-count KK would give 10+1+1+1 | 10+1
    assert [len(p) for p in parts] == [3, 3] and _max_sum([10, 1, 1, 1, 1, 10], parts) == 12
    with pytest.raises(ValueError, match="multiple of k"):
        karmarkar_karp([1, 2, 3], 2, equal_size=True)
    with pytest.raises(ValueError, match="at least 1"):
        karmarkar_karp([1, 2, 3], 0, equal_size=False)


@pytest.mark.parametrize("equal_size,n,k", [(False, 8, 2), (False, 8, 3), (True, 8, 2), (True, 9, 3)])
def test_karmarkar_karp_against_brute_force(equal_size, n, k):
    """On small random instances KK is mostly optimal and within the known ratio; it minimises the spread, not
    the largest sum, so greedy LPT occasionally beats it (hence `balanced_dp_split` keeps the better of the two).
    Seeded, 200 instances each: optimal in 134 / 131 / 131 / 121 of them, worse than LPT in 2 / 4 / 14 / 16, the
    worst ratio to the optimum 1.07 / 1.10 / 1.13 / 1.09 (in parametrize order)."""
    rng = random.Random(1000 + 10 * n + k)
    trials, optimal, worse_than_lpt = 200, 0, 0
    for _ in range(trials):
        sizes = [rng.randint(1, 100) for _ in range(n)]
        parts = karmarkar_karp(sizes, k, equal_size)
        _check_partition(parts, n, k)
        if equal_size:
            assert [len(p) for p in parts] == [n // k] * k
        assert karmarkar_karp(sizes, k, equal_size) == parts  # deterministic
        got, best = _max_sum(sizes, parts), _brute_force(sizes, k, equal_size)
        assert got >= best
        # unconstrained: KK's largest sum is at most (4/3 - 1/(3k)) OPT (Michiels et al.); with equal counts we
        # assert the same ratio as an observed bound (the worst seen here is ~1.13)
        assert got <= (4 / 3 - 1 / (3 * k)) * best
        optimal += got == best
        worse_than_lpt += got > _lpt(sizes, k, equal_size)
    assert optimal >= 0.5 * trials
    assert worse_than_lpt <= 0.1 * trials


# -- the split over data-parallel ranks --------------------------------------------------------------------------------

def test_balanced_dp_split_beats_strided_on_realistic_rollout_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(200, 1200) for _ in range(64)]
    dp = 4
    parts = balanced_dp_split(lengths, dp)
    _check_partition(parts, len(lengths), dp)
    assert [len(p) for p in parts] == [16] * dp
    ideal = sum(lengths) / dp
    sums = [sum(lengths[i] for i in p) for p in parts]
    strided = [sum(lengths[r::dp]) for r in range(dp)]
    assert max(sums) <= 1.02 * ideal  # ~1.0001 here
    assert max(sums) / min(sums) <= 1.01
    assert max(strided) > 1.05 * ideal and max(strided) > max(sums)  # the strided split: ~1.15 here
    assert balanced_dp_split(lengths, dp) == parts  # deterministic


def test_balanced_dp_split_uneven_counts_and_edge_cases():
    rng = random.Random(1)
    for _ in range(300):
        n, dp = rng.randint(0, 30), rng.randint(1, 8)
        # zeros included: real zero-sized items must not be confused with the padding dummies
        sizes = [rng.choice([0, rng.randint(1, 2000)]) for _ in range(n)]
        parts = balanced_dp_split(sizes, dp)
        _check_partition(parts, n, dp)
        counts = [len(p) for p in parts]
        assert max(counts) - min(counts) <= (1 if n % dp else 0)
        assert sorted(counts, reverse=True) == [n // dp + (r < n % dp) for r in range(dp)]
        if n:
            # never worse than either candidate it chooses from
            pad = (-n) % dp
            kk = karmarkar_karp([0] * pad + sizes, dp, equal_size=True)
            kk_max = max(sum(([0] * pad + sizes)[i] for i in p) for p in kk)
            assert _max_sum(sizes, parts) <= kk_max
    assert balanced_dp_split([], 3) == [[], [], []]
    assert balanced_dp_split([7, 9], 3) == [[0], [1], []]
    assert balanced_dp_split([5, 1, 4], 1) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="at least 1"):
        balanced_dp_split([1], 0)


def test_balanced_dp_split_never_worse_than_greedy_and_optimal_on_small_instances():
    rng = random.Random(2)
    optimal = 0
    for _ in range(100):
        sizes = [rng.randint(1, 100) for _ in range(8)]
        parts = balanced_dp_split(sizes, 2)
        got = _max_sum(sizes, parts)
        assert got <= _lpt(sizes, 2, True)
        optimal += got == _brute_force(sizes, 2, True)
    assert optimal >= 55  # 63 of 100 with this seed


# -- micro-batch plans -------------------------------------------------------------------------------------------------

def _old_plan(rollouts, budget_tokens, pad_multiple=1, cp_size=1):
    """`plan_micro_batches` as it was before the strategies (in-order next-fit), copied verbatim."""
    mult = pad_multiple * (2 * cp_size if cp_size > 1 else 1)
    need = [-(-max(r.length(False), r.length(True)) // mult) * mult for r in rollouts]
    return next_fit(need, budget_tokens)


def test_micro_batch_plan_in_order_reproduces_the_old_plan_and_ffd_is_fuller():
    from dasd_megatron.train.batch import Rollout, plan_micro_batches

    rng = random.Random(3)
    fewer = 0
    for _ in range(100):
        rollouts = [Rollout([1] * rng.randint(1, 20), [1] * rng.randint(1, 30), [2] * (r := rng.randint(1, 40)),
                            [-1.0] * r, reward=0.0, group=0) for _ in range(rng.randint(1, 24))]
        pad, cp = rng.choice([1, 2, 4]), rng.choice([1, 2])
        budget = 80 + 8 * rng.randint(0, 10)
        old = _old_plan(rollouts, budget, pad, cp)
        assert plan_micro_batches(rollouts, budget, pad, cp, strategy="in_order") == old
        ffd = plan_micro_batches(rollouts, budget, pad, cp)
        assert sorted(i for b in ffd for i in b) == list(range(len(rollouts)))
        mult = pad * (2 * cp if cp > 1 else 1)
        assert all(sum(-(-max(rollouts[i].length(False), rollouts[i].length(True)) // mult) * mult for i in b)
                   <= budget for b in ffd)
        assert len(ffd) <= len(old)
        fewer += len(ffd) < len(old)
    assert fewer > 20
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_micro_batches(rollouts, budget, strategy="best_fit")
