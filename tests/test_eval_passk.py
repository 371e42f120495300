"""Pass@k: the product form of the unbiased estimator against brute-force enumeration of every k-subset, exact
rational arithmetic at n = 128, and the default k grid."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from dasd_megatron.eval.passk import check_ks, default_ks, mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> Fraction:
    """The fraction of all k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    hits = total = 0
    for subset in itertools.combinations(range(n), k):
        total += 1
        hits += any(samples[i] for i in subset)
    return Fraction(hits, total)


@pytest.mark.parametrize("n", range(1, 11))
def test_matches_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            want = brute_force(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(float(want), abs=1e-12), (n, c, k)


def test_large_n_is_stable_and_exact():
    n = 128
    for c in (0, 1, 2, 3, 17, 64, 100, 127, 128):
        for k in default_ks(n):
            exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            got = pass_at_k(n, c, k)
            assert 0.0 <= got <= 1.0 and got == pytest.approx(float(exact), rel=1e-12, abs=1e-15), (c, k)
    # pass@1 is the plain fraction correct; a tiny pass@k is not lost to cancellation
    assert pass_at_k(128, 5, 1) == pytest.approx(5 / 128, abs=1e-15)
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4, rel=1e-12)


def test_mean_over_problems_and_bad_inputs():
    assert mean_pass_at_k(4, [0, 1, 4], 2) == pytest.approx((0 + 0.5 + 1) / 3)
    assert math.isnan(mean_pass_at_k(4, [], 2))
    for args in ((0, 0, 1), (4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*args)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 1, 1)


def test_default_ks():
    assert default_ks(16) == (1, 2, 4, 8, 16)
    assert default_ks(1) == (1,)
    assert default_ks(12) == (1, 2, 4, 8, 12)
    assert default_ks(128)[-1] == 128 and len(default_ks(128)) == 8
    assert check_ks([4, 1, 4], 8) == (1, 4)
    with pytest.raises(ValueError, match="not in 1..n=8"):
        check_ks([16], 8)
