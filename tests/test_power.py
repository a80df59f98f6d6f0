"""The decision rule at any seed count: the exact test without enumeration, its family-wise promise under Holm over
simulated families of claims (null and planted effects), and the smallest effect a claim's seeds could show."""

import itertools
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bnsuite.core.claims import ClaimResult, compare, decide, holm, p_smaller, study_claims
from bnsuite.core.spec import NOT_SHOWN, SUPPORTED
from bnsuite.study import seeds_for_family, study_from_options

ALPHA = 0.05
SEEDS = 6  # the full profile's
FAMILY = 37  # claims judged by the default main command


def _enumerated_p(a, b):
    """The permutation p by listing every relabelling: the definition, for small groups."""
    pooled = list(a) + list(b)

    def pairs_smaller(x, y):
        return sum((u < v) + 0.5 * (u == v) for u in x for v in y)

    measured = pairs_smaller(a, b)
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    at_least = sum(pairs_smaller([pooled[i] for i in chosen], [pooled[i] for i in range(len(pooled))
                                                               if i not in chosen]) >= measured - 1e-9
                   for chosen in splits)
    return at_least / len(splits)


def test_the_exact_p_counts_every_relabelling_ties_and_diverged_runs_included():
    generator = np.random.default_rng(0)
    for _ in range(60):
        m, n = generator.integers(2, 6, size=2)
        a = list(generator.integers(0, 4, m).astype(float))  # few values: many ties
        b = list(generator.integers(0, 5, n).astype(float))
        if generator.random() < 0.3:
            a[0] = math.inf  # a diverged run: ordered above every finite value, tied with another inf
        if generator.random() < 0.3:
            b[-1] = math.inf
        assert p_smaller(a, b) == pytest.approx(_enumerated_p(a, b), abs=1e-12), (a, b)


def test_the_exact_p_at_thirty_seeds_a_side_takes_milliseconds_and_little_memory():
    # Enumerating C(60, 30) = 1.2e17 relabellings is out of reach; the rank-sum counts are not. Under a 1.5 GB cap
    # on the address space (scipy's enumeration needed 5.9 GB at 12 seeds a side and failed at 13 under 8 GB).
    program = textwrap.dedent("""
        import resource, time
        resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, 1536 * 2**20))
        from bnsuite.claims import p_smaller
        a = [float(v) for v in range(30)]
        b = [v + 28.5 for v in a]  # one pair the other way: 29 > 28.5
        started = time.perf_counter()
        p = p_smaller(a, b)
        print(p, time.perf_counter() - started)
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                            env={"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    p, seconds = map(float, result.stdout.split())
    # U = 899 of 900 pairs: as one-sided as that are the perfect split and this one swap, 2 of C(60, 30).
    assert p == pytest.approx(2 / math.comb(60, 30), rel=1e-9)
    assert seconds < 1.0


def _family(generator, shift: float, size: int = FAMILY, seeds: int = SEEDS) -> list[ClaimResult]:
    """A family of claims, each "the first side is smaller" on `seeds` normal values a side, the second shifted."""
    results = []
    for index in range(size):
        a, b = generator.standard_normal(seeds), generator.standard_normal(seeds) + shift
        comparison = compare(a, b, what="b - a")
        results.append(ClaimResult(f"claim-{index}", "", "", "", decide(comparison.p, comparison.q, ALPHA),
                                   comparison.p, comparison=comparison, alpha=ALPHA))
    return results


def test_under_the_null_holm_keeps_the_family_wise_rate_of_false_support_at_or_under_alpha():
    # Variants that differ only in their name: every claim is false. One claim at a time is "supported" 5 % of the
    # time at most; after Holm over the family, some claim of the family is, at most 5 % of the time.
    generator = np.random.default_rng(1)
    families = [holm(_family(generator, shift=0.0)) for _ in range(400)]
    per_claim = np.mean([result.verdict == SUPPORTED for family in families for result in family])
    family_wise = np.mean([any(result.holm_verdict == SUPPORTED for result in family) for family in families])
    assert 0.01 < per_claim <= ALPHA  # the uncorrected rule errs at about its alpha, one claim at a time
    assert family_wise <= ALPHA


def test_a_planted_clear_effect_survives_holm_over_the_family_at_the_full_profiles_seeds():
    # An effect of 4 seed standard deviations in every claim: each side's 6 seeds almost always separate, which at
    # 6 seeds is p = 1 / 924, within Holm's first step over 37 claims (0.05 / 37).
    generator = np.random.default_rng(2)
    families = [holm(_family(generator, shift=4.0)) for _ in range(20)]
    found = np.mean([result.holm_verdict == SUPPORTED for family in families for result in family])
    assert found >= 0.9
    # A 0.5-standard-deviation effect is not what 6 seeds show after the correction.
    weak = holm(_family(np.random.default_rng(3), shift=0.5))
    assert sum(result.holm_verdict == SUPPORTED for result in weak) <= 3


def test_the_smallest_effect_shown_is_shown_with_the_stated_power_and_scales_with_the_spread():
    comparison = compare([0.0, 1.0, 2.0, 0.5, 1.5, 1.0], [0.2, 1.1, 2.2, 0.4, 1.7, 0.9], what="b - a")
    smallest = comparison.smallest_effect(ALPHA)
    assert comparison.spread == pytest.approx(math.sqrt((np.var([0, 1, 2, .5, 1.5, 1], ddof=1)
                                                         + np.var([.2, 1.1, 2.2, .4, 1.7, .9], ddof=1)) / 2))
    # Normal seeds with that spread, shifted by the smallest effect: the test supports the claim about 80 % of the
    # time; at half the effect, far less often.
    generator = np.random.default_rng(4)

    def power(shift):
        hits = 0
        for _ in range(2000):
            a = generator.standard_normal(SEEDS) * comparison.spread
            b = generator.standard_normal(SEEDS) * comparison.spread + shift
            hits += p_smaller(list(a), list(b)) <= ALPHA
        return hits / 2000

    assert power(smallest) == pytest.approx(0.8, abs=0.04)
    assert power(smallest / 2) < 0.5
    doubled = compare([2 * v for v in (0.0, 1.0, 2.0, 0.5, 1.5, 1.0)], [2 * v for v in (0.2, 1.1, 2.2, 0.4, 1.7, 0.9)],
                      what="b - a")
    assert doubled.smallest_effect(ALPHA) == pytest.approx(2 * smallest)


def test_a_not_shown_claim_says_the_smallest_effect_its_seeds_could_show_and_none_is_offered_where_none_can_be():
    comparison = compare([1.0, 2.0, 3.0, 2.5], [1.5, 2.1, 3.2, 2.0], what="bn - plain accuracy (points)")
    result = ClaimResult("c", "", "", "", NOT_SHOWN, comparison.p, comparison=comparison, alpha=ALPHA)
    assert "the smallest effect these seeds show with 80% power, at the measured spread: +" in result.power()
    assert "(bn - plain accuracy (points))" in result.power()
    two = compare([1.0, 2.0], [1.5, 2.5], what="x")  # 2 a side: the smallest p is 1/6, no outcome reaches 0.05
    assert two.smallest_effect(ALPHA) is None
    ratio = compare([1.0, 1.2, 0.9, 1.1], [1.1, 1.3, 1.0, 1.0], what="plain / bn loss", ratio=True)
    assert ratio.smallest_effect(ALPHA) > 1.0  # a ratio, above 1


def test_the_full_profile_takes_the_seeds_its_family_of_claims_needs():
    """6 seeds carry a clear effect through Holm over up to 46 claims; every study (48 claims) needs 7. With 6 over
    48, not one claim can survive (1/924 > 0.05/48); with the 7 the profile then takes, a clear effect does."""
    assert [seeds_for_family(claims, ALPHA, 6) for claims in (35, 46, 47, 171, 172)] == [6, 6, 7, 7, 8]
    everything = study_from_options("full", studies="all")
    family = len(study_claims(everything))
    assert family > 46 and len(everything.seeds) == seeds_for_family(family, ALPHA, 6) == 7
    assert len(study_from_options("full").seeds) == 6 and len(study_from_options("full", seeds="3").seeds) == 3
    planted = lambda seeds: holm(_family(np.random.default_rng(4), shift=6.0, size=family, seeds=seeds))  # noqa: E731
    assert not any(result.holm_verdict == SUPPORTED for result in planted(6))
    assert np.mean([result.holm_verdict == SUPPORTED for result in planted(7)]) >= 0.9
