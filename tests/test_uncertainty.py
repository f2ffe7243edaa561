import math

import numpy as np
import pytest

from liandan import uncertainty
from liandan.uncertainty import (
    mcnemar_exact,
    newcombe_paired,
    paired_bootstrap_mean,
    paired_bootstrap_ratio,
    paired_proportions,
    wilson,
)


def test_mcnemar_exact_by_hand():
    # 1 item lost, 4 gained: 5 changed verdict; under "no change" min(1, 4) ~ Binomial(5, 1/2):
    # P(X <= 1) = (C(5,0) + C(5,1)) / 2^5 = 6/32; two-sided p = 2 * 6/32 = 0.375.
    assert mcnemar_exact(1, 4) == mcnemar_exact(4, 1) == pytest.approx(0.375)
    # 0 lost, 6 gained: p = 2 * 1/64 = 0.03125. Nothing changed: p = 1 (not 2 * 1).
    assert mcnemar_exact(0, 6) == pytest.approx(0.03125)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0


def test_paired_proportions_hand_computed_case():
    # 10 items: 5 pass before and after (a), 1 only before (b, lost), 4 only after (c, gained), 0 neither (d).
    # after = 9/10 = 0.9, before = 6/10 = 0.6, d = 0.3.  z = 1.959964, z² = 3.841459, n + z² = 13.841459.
    # Wilson, after (x = 9): root = z * sqrt(z² + 4*9*1/10) = 1.959964 * sqrt(7.441459) = 5.346596
    #   l1 = (18 + 3.841459 - 5.346596) / 27.682918 = 0.595850, u1 = (18 + 3.841459 + 5.346596) / 27.682918 = 0.982124
    # Wilson, before (x = 6): root = 1.959964 * sqrt(3.841459 + 4*6*4/10) = 1.959964 * sqrt(13.441459) = 7.185737
    #   l2 = (12 + 3.841459 - 7.185737) / 27.682918 = 0.312674, u2 = (12 + 3.841459 + 7.185737) / 27.682918 = 0.831820
    # phi: ad - bc = 5*0 - 1*4 = -4 < 0, so uncorrected; margins 9 * 1 * 6 * 4 = 216; phi = -4 / sqrt(216) = -0.272166
    # low  = 0.3 - sqrt(0.304150² + 0.231820² + 2*0.272166*0.304150*0.231820) = 0.3 - sqrt(0.184627) = -0.129683
    # high = 0.3 + sqrt(0.082124² + 0.287326² + 2*0.272166*0.082124*0.287326) = 0.3 + sqrt(0.102145) = 0.619601
    # McNemar: 1 lost, 4 gained -> p = 0.375 (above). Not significant: the interval includes 0.
    assert wilson(9, 10) == pytest.approx((0.595850, 0.982124), abs=1e-6)
    assert wilson(6, 10) == pytest.approx((0.312674, 0.831820), abs=1e-6)
    assert newcombe_paired(5, 1, 4, 0) == pytest.approx((-0.129683, 0.619601), abs=1e-6)
    before = [True] * 5 + [True] + [False] * 4
    after = [True] * 5 + [False] + [True] * 4
    result = paired_proportions(before, after)
    assert result == pytest.approx({"diff": 0.3, "low": -0.129683, "high": 0.619601, "p": 0.375,
                                    "method": "mcnemar-exact", "n": 10, "significant": False}, abs=1e-6)  # fmt: skip
    # Swapping the models mirrors the interval.
    swapped = paired_proportions(after, before)
    assert (swapped["diff"], swapped["low"], swapped["high"]) == pytest.approx((-0.3, -0.619601, 0.129683), abs=1e-6)


def test_positive_correlation_is_corrected_by_half_n():
    # a=8, b=0, c=1, d=1: ad - bc = 8 > n/2 = 5, so phi = (8 - 5) / sqrt(9*1*8*2) = 3 / 12 = 0.25.
    # after 9/10 (l1, u1 = 0.595850, 0.982124), before 8/10: root = z*sqrt(z² + 4*8*2/10) = 1.959964*sqrt(10.241459)
    #   = 6.272331; l2 = (16 + 3.841459 - 6.272331) / 27.682918 = 0.490162, u2 = 26.113790 / 27.682918 = 0.943318
    # low  = 0.1 - sqrt(0.304150² - 2*0.25*0.304150*0.143318 + 0.143318²) = 0.1 - sqrt(0.091252) = -0.202079
    # high = 0.1 + sqrt(0.082124² - 2*0.25*0.082124*0.309838 + 0.309838²) = 0.1 + sqrt(0.090020) = 0.400033
    # (without the n/2 correction, phi = 8/12 would narrow it to [-0.134, 0.362])
    assert newcombe_paired(8, 0, 1, 1) == pytest.approx((-0.202079, 0.400033), abs=1e-5)


def test_clear_gains_are_significant_and_no_change_is_not():
    gained = paired_proportions([False] * 40, [True] * 30 + [False] * 10)
    assert gained["diff"] == 0.75 and gained["low"] > 0.5 and gained["p"] < 1e-8 and gained["significant"]
    same = paired_proportions([True, False] * 10, [True, False] * 10)
    assert same["diff"] == 0 and same["low"] < 0 < same["high"] and same["p"] == 1 and not same["significant"]
    # Every item passing before and after: empty margins (phi = 0, no division by zero), and the
    # interval is ±(1 - Wilson's lower bound for 5/5) = ±(1 - 0.565518).
    full = paired_proportions([True] * 5, [True] * 5)
    assert full["diff"] == 0 and full["low"] == pytest.approx(-0.434482, abs=1e-6) == -full["high"]
    assert not full["significant"]
    assert paired_proportions([], []) is None
    with pytest.raises(ValueError, match="2 before but 1 after"):
        paired_proportions([True, False], [True])


def test_bootstrap_is_deterministic_and_identical_models_give_zero():
    rng = np.random.default_rng(1)
    before, after = rng.normal(size=50), rng.normal(size=50)
    first, again = paired_bootstrap_mean(before, after), paired_bootstrap_mean(before, after)
    assert first == again and first["method"] == "bootstrap" and first["p"] is None and first["n"] == 50
    assert paired_bootstrap_mean(before, after, seed=1) != first  # the seed is what makes it repeatable
    same = paired_bootstrap_mean(before, before)
    assert (same["diff"], same["low"], same["high"], same["significant"]) == (0, 0, 0, False)
    ratio = paired_bootstrap_ratio((before + 5, np.ones(50)), (before + 5, np.ones(50)))
    assert (ratio["diff"], ratio["low"], ratio["high"], ratio["significant"]) == (0, 0, 0, False)


def test_bootstrap_finds_a_clear_shift_and_not_noise():
    rng = np.random.default_rng(2)
    before = rng.normal(10, 1, size=60)
    shifted = paired_bootstrap_mean(before, before + 1 + rng.normal(0, 0.3, size=60))
    assert shifted["low"] > 0.8 and shifted["high"] < 1.2 and shifted["significant"]
    noise = paired_bootstrap_mean(before, before + rng.normal(0, 1, size=60))
    assert noise["low"] < 0 < noise["high"] and not noise["significant"]
    # Half the items +1, half -1: mean change 0; resampled means spread about ±2/sqrt(60) = ±0.26.
    flat = paired_bootstrap_mean([0.0] * 60, [1.0, -1.0] * 30)
    assert flat["diff"] == 0 and -0.35 < flat["low"] < -0.15 and 0.15 < flat["high"] < 0.35


def test_bootstrap_ratio_recomputes_perplexity_from_resampled_sums():
    # Two answers: 2 tokens with NLL sum 2.0 and 8 tokens with NLL sum 4.0; after, the long one drops to 2.0.
    # Perplexity exp(sum nll / sum tokens): before exp(6/10), after exp(4/10); not a mean of per-item perplexities.
    result = paired_bootstrap_ratio(([2.0, 4.0], [2, 8]), ([2.0, 2.0], [2, 8]))
    assert result["diff"] == pytest.approx(math.exp(0.4) - math.exp(0.6))
    # The four resamples of two items give {both short: 0, mixed: exp(.4)-exp(.6), both long: exp(.25)-exp(.5)}.
    assert result["low"] >= math.exp(0.25) - math.exp(0.5) - 1e-12 and result["high"] <= 1e-12
    with pytest.raises(ValueError, match="sums and counts"):
        paired_bootstrap_ratio(([1.0], [1]), ([1.0, 2.0], [1, 1]))


def test_bootstrap_in_chunks_draws_the_same_resamples(monkeypatch):
    before, after = np.arange(30.0), np.arange(30.0) ** 1.1
    whole = paired_bootstrap_mean(before, after, resamples=500)
    monkeypatch.setattr(uncertainty, "_CHUNK", 30 * 7)  # 7 resamples at a time
    assert paired_bootstrap_mean(before, after, resamples=500) == whole


def test_bootstrap_is_fast_enough_for_every_metric_of_an_eval():
    import time

    rng = np.random.default_rng(3)
    start = time.perf_counter()
    paired_bootstrap_ratio((rng.random(2000), np.full(2000, 512)), (rng.random(2000), np.full(2000, 512)))
    assert time.perf_counter() - start < 5  # 2000 resamples of 2000 text blocks
