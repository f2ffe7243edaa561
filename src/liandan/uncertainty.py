"""How sure a before-vs-after difference is: paired intervals and tests over the items of an eval.

    from liandan.uncertainty import paired_proportions, paired_bootstrap_mean
    paired_proportions([True, True, False, False], [True, True, True, True])
    # {'diff': 0.5, 'low': -0.102..., 'high': 0.849..., 'p': 0.5, 'method': 'mcnemar-exact', 'n': 4, 'significant': False}
    paired_bootstrap_mean([10, 12, 9], [20, 22, 19])["significant"]   # True: every item moved by +10

Every model answers the same items, so a difference is measured item by item (paired), which is
far tighter than comparing two independent pass rates. Each function returns one comparison:
``{"diff": after - before, "low", "high", "p", "method", "n", "significant"}``.

- Pass/fail items (`paired_proportions`): McNemar's exact test, a two-sided binomial test on the
  items that changed verdict, and Newcombe's score interval for a paired difference (method 10 of
  Newcombe 1998, "Improved confidence intervals for the difference between binomial proportions
  based on paired data", Stat Med 17:2635). The test is exact and the interval keeps near its
  nominal coverage with a few dozen items, where a normal approximation or a bootstrap is poor (a
  bootstrap of 0/60 vs 0/60 gives [0, 0] and says nothing). Significant when p < 0.05 *and* the
  interval excludes 0, so the mark never contradicts the interval shown next to it.
- Continuous items (`paired_bootstrap_mean`) and ratios of sums such as perplexity
  (`paired_bootstrap_ratio`): a seeded paired bootstrap, the same resampled item indices for both
  models, and the 95% percentile interval of the resampled differences. Significant when the
  interval excludes 0; no p-value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
_CHUNK = 4_000_000  # resampled indices held at once (32 MB of int64), whatever the item count


def comparison(diff: float, low: float, high: float, p: float | None, method: str, n: int) -> dict:
    significant = (low > 0 or high < 0) and (p is None or p < 1 - LEVEL)
    return {"diff": float(diff), "low": float(low), "high": float(high), "p": None if p is None else float(p),
            "method": method, "n": int(n), "significant": bool(significant)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Pass/fail items


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided p of McNemar's exact test: under "no change", each of the ``lost + gained`` items
    that changed verdict is equally likely to go either way, so min(lost, gained) ~ Binomial(n, 1/2):
    p = min(1, 2 * P(X <= min(lost, gained)))."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilson(passed: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval for a proportion: the ``p`` whose score test accepts ``passed/n``:
    (2x + z² ± z·sqrt(z² + 4x(n - x)/n)) / (2(n + z²))."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    root = z * math.sqrt(z * z + 4 * passed * (n - passed) / n)
    return (2 * passed + z * z - root) / (2 * (n + z * z)), (2 * passed + z * z + root) / (2 * (n + z * z))


def newcombe_paired(both: int, lost: int, gained: int, neither: int, level: float = LEVEL) -> tuple[float, float]:
    """Newcombe's method 10 interval for ``after - before`` from the paired 2x2 table (``lost``:
    passed before, failed after; ``gained``: the reverse). With p1, p2 the after and before pass
    rates, (l1, u1), (l2, u2) their Wilson intervals and phi the (corrected) correlation of the pairs:

        low  = d - sqrt((p1 - l1)² - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)²)
        high = d + sqrt((u1 - p1)² - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)²)

    phi = C / sqrt(efgh) over the four margins, with C = ad - bc - n/2 when ad - bc > n/2, ad - bc
    when it is negative, else 0 (and phi = 0 when a margin is empty)."""
    n = both + lost + gained + neither
    after, before = both + gained, both + lost
    p1, p2 = after / n, before / n
    (l1, u1), (l2, u2) = wilson(after, n, level), wilson(before, n, level)
    margins = after * (n - after) * before * (n - before)
    cross = both * neither - lost * gained
    corrected = cross - n / 2 if cross > n / 2 else min(0, cross)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)


def paired_proportions(before: Sequence[bool], after: Sequence[bool]) -> dict | None:
    """The change in pass rate over the same items: McNemar's exact p and Newcombe's interval.
    None without items."""
    if len(before) != len(after):
        raise ValueError(f"paired verdicts: {len(before)} before but {len(after)} after")
    if not before:
        return None
    table = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    for b, a in zip(before, after):
        table[bool(b), bool(a)] += 1
    both, lost, gained, neither = table[True, True], table[True, False], table[False, True], table[False, False]
    low, high = newcombe_paired(both, lost, gained, neither)
    return comparison((gained - lost) / len(before), low, high, mcnemar_exact(lost, gained), "mcnemar-exact", len(before))


# ---------------------------------------------------------------------------------------------
# Continuous items: the paired bootstrap


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``statistic`` of ``resamples`` resamples of ``n`` item indices, drawn with replacement by a
    generator seeded with ``seed`` (the same draw every call). ``statistic`` maps an (R, n) index
    array to R values; it is called in chunks so memory stays bounded for large sets."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK // max(n, 1))
    out = []
    for start in range(0, resamples, per_chunk):
        idx = rng.integers(0, n, size=(min(per_chunk, resamples - start), n))  # (R, n)
        out.append(statistic(idx))
    return np.concatenate(out)


def _percentile(diff: float, samples: np.ndarray, n: int) -> dict:
    low, high = np.quantile(samples, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return comparison(diff, low, high, None, "bootstrap", n)


def paired_bootstrap_mean(before: Sequence[float], after: Sequence[float], resamples: int = RESAMPLES,
                          seed: int = SEED) -> dict | None:  # fmt: skip
    """The change in a mean of per-item values (output length, repetition, preference margin)."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape:
        raise ValueError(f"paired values: {b.size} before but {a.size} after")
    if not b.size:
        return None
    d = a - b  # the mean of resampled differences is the difference of resampled means
    return _percentile(float(d.mean()), bootstrap(lambda idx: d[idx].mean(axis=1), d.size, resamples, seed), d.size)


def paired_bootstrap_ratio(before: tuple[Sequence[float], Sequence[float]], after: tuple[Sequence[float], Sequence[float]],
                           transform: Callable = np.exp, resamples: int = RESAMPLES, seed: int = SEED) -> dict | None:  # fmt: skip
    """The change in ``transform(sum(x) / sum(y))`` over items: ``before`` and ``after`` are
    (per-item sums, per-item counts), e.g. token NLL sums and token counts, where perplexity is
    exp(sum nll / sum tokens). Each resample recomputes the ratio from its own sums, so long items
    weigh as much as their tokens, as they do in the figure itself."""
    bs, bc = (np.asarray(v, dtype=np.float64) for v in before)
    as_, ac = (np.asarray(v, dtype=np.float64) for v in after)
    if not (bs.shape == bc.shape == as_.shape == ac.shape):
        raise ValueError(f"paired sums and counts: {bs.size}/{bc.size} before but {as_.size}/{ac.size} after")
    if not bs.size:
        return None

    def ratio(sums, counts, idx):
        return transform(sums[idx].sum(axis=-1) / np.maximum(counts[idx].sum(axis=-1), 1))

    every = np.arange(bs.size)
    diff = float(ratio(as_, ac, every) - ratio(bs, bc, every))
    samples = bootstrap(lambda idx: ratio(as_, ac, idx) - ratio(bs, bc, idx), bs.size, resamples, seed)
    return _percentile(diff, samples, bs.size)
