"""The unbiased Pass@k estimator and the default k grid.

With n samples of a problem of which c are correct, the probability that a uniformly drawn k-subset (without
replacement) holds at least one correct sample is

    pass@k = 1 - C(n - c, k) / C(n, k)

(Chen et al. 2021, "Evaluating Large Language Models Trained on Code"). The binomials overflow floats long before
n = 128 matters, so it is computed as the product

    C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)

(each factor in [0, 1), no cancellation), and as exactly 1 when n - c < k (every k-subset holds a correct sample).
Pass@1 reduces to c / n, so the mean Pass@1 over problems is Avg@n.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one problem with `c` correct out of `n` samples (0 <= c <= n, 1 <= k <= n)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k needs integers, got n={n!r} c={c!r} k={k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need n >= 1, 0 <= c <= n and 1 <= k <= n")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(n: int, correct: Iterable[int], k: int) -> float:
    """Pass@k averaged over problems (`correct[i]` = correct samples of problem i, each out of `n`); NaN if none."""
    values = [pass_at_k(n, c, k) for c in correct]
    return sum(values) / len(values) if values else float("nan")


def default_ks(n: int) -> tuple[int, ...]:
    """The powers of two up to `n`, and `n` itself when it is not one: (1, 2, 4, 8, 16) for n = 16."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample per problem")
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return tuple(ks)


def check_ks(ks: Sequence[int], n: int) -> tuple[int, ...]:
    """`ks` sorted and de-duplicated; every k must be in 1..n."""
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n]
    if bad:
        raise ValueError(f"pass@k values {bad} are not in 1..n={n}. Fix: use k between 1 and the samples per "
                         "problem")
    return tuple(sorted(set(ks)))
