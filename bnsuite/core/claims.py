"""The study's claims about BN, each a named check with its evidence and a verdict: the machinery every study's
claims are made of (the rule, the judges, the measures).

A claim compares groups of runs that differ only in the seed, by an exact one-sided permutation test
(Mann-Whitney) at the study's alpha (bnsuite.spec.ClaimSettings, recorded with every run):

- supported:    the data show the claim (p <= alpha);
- contradicted: the data show its opposite (p <= alpha the other way);
- not shown:    neither (seed noise is as large as the effect, or too few seeds).

A diverged run counts as the worst possible outcome (infinite loss, accuracy 0, never reaching the target), never
dropped. Every comparison also carries its effect (`Effect`: the Hodges-Lehmann shift, Moses's exact interval, the
probability of improvement) and says what the seeds used allow (`Comparison`); `holm` adjusts a family of
verdicts for the number of claims judged. Each claim belongs to one study (bnsuite.studies, or a user's plugin)
and checks one of `REASONS`; a claim our measurements do not support under a profile is a known exception of its
study, never a looser rule. Why this rule and these estimates, and not a bootstrap: docs/verdicts.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from bnsuite.core.networks import title as network_title
from bnsuite.core.records import RunRecord
from bnsuite.core.registry import study_definition
from bnsuite.core.spec import (
    CONTRADICTED,
    DEFAULT_NETWORK,
    NOT_SHOWN,
    NOT_SUPPORTED,
    SUPPORTED,
    UNSETTLED,
    KnownException,
    RunSpec,
    SpecError,
    Study,
    StudySpec,
    network_prefix,
)

# What each claim checks, in the original study's words (SEED_PROTOCOL.md, Parts 1 and 3).
REASONS = {
    "faster": "faster training (convergence speed, final training loss)",
    "accuracy": "better accuracy on both training and validation sets",
    "batch": "how BN's effect depends on the batch size",
    "lr": "BN allows higher learning rates",
    "init": "BN reduces the sensitivity to initialization",
    "regularizer": "BN acts as a regularizer, reducing the need for dropout",
    "activations": "BN reduces internal covariate shift: a layer's inputs keep a steadier distribution",
    "inference": "BN normalizes over the mini-batch; at inference, running estimates replace the batch statistics",
    # The field's later explanations, which replaced some of the study's (bnsuite.studies.placement, noise, lr,
    # landscape).
    "placement": "where BN sits matters: before the nonlinearity, as Ioffe & Szegedy put it, or after it",
    "distribution": ("BN's benefit does not come from steadier layer-input distributions: BN with noise that makes "
                     "them unstable on purpose (Santurkar et al. 2018)"),
    "lr-benefit": "BN's benefit is mainly the larger learning rate it allows (Bjorck et al. 2018)",
    "landscape": "BN makes the loss landscape smoother; whether it reduces covariate shift measured by gradients",
    "signal": ("BN keeps the signal's scale across depth at initialization, so a deep network can train "
               "(Brock et al. 2021)"),
}


CONFIDENCE = 0.95  # of every effect's interval, where the seeds allow it
POWER = 0.8  # the power the seeds-needed figure is for


@functools.cache
def _u_counts(m: int, n: int) -> tuple[int, ...]:
    """How many of the C(m + n, m) orderings of two untied groups give U = 0, 1, ..., m n (U: pairs with the
    first group's value below the second's); the exact null distribution of the Mann-Whitney statistic."""
    if m == 0 or n == 0:
        return (1,)
    # The largest value is the second group's (each of the first's m values is below it: U gains m) or the first's.
    last_second, last_first = _u_counts(m, n - 1), _u_counts(m - 1, n)
    counts = [0] * (m * n + 1)
    for u, count in enumerate(last_second):
        counts[u + m] += count
    for u, count in enumerate(last_first):
        counts[u] += count
    return tuple(counts)


def _u_tail(m: int, n: int, u: int) -> float:
    """P(U >= u) under the null, untied."""
    counts = _u_counts(m, n)
    return sum(counts[max(u, 0):]) / math.comb(m + n, m)


@dataclass(frozen=True)
class Effect:
    """How large a difference is: `larger - smaller` (or `larger / smaller` on a log scale) between two groups
    of seeds, the Hodges-Lehmann estimate with Moses's distribution-free interval, and the probability of
    improvement."""

    what: str  # what the estimate measures, e.g. "bn - plain test accuracy (points)", "plain / bn final loss"
    estimate: float
    low: float
    high: float
    confidence: float  # of [low, high]: 0.95 where the seeds allow it, else the most they allow
    improvement: float  # P(a seed of the claim's side beats one of the other): U / (n_a n_b), ties half
    ratio: bool = False

    def estimate_and_interval(self) -> str:
        """`+0.42 [+0.3, +0.55]`, or `2.31x [1.8, 2.95]` for a ratio."""
        sign, unit = ("", "x") if self.ratio else ("+", "")
        return (f"{_number(self.estimate, sign)}{unit} "
                f"[{_number(self.low, sign)}, {_number(self.high, sign)}]{unit}")

    def describe(self) -> str:
        level = f"{self.confidence:.0%}"
        if self.confidence < CONFIDENCE:
            level += f", the most these seeds allow: {CONFIDENCE:.0%} needs more"
        return f"{self.what} {self.estimate_and_interval()} ({level} interval); P(improvement) {self.improvement:.2f}"


def _number(value: float, sign: str = "") -> str:
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return f"{value:{sign}.3g}"


@dataclass(frozen=True)
class Comparison:
    """One claim's test of `smaller` below `larger`: p of that, q of the opposite, the effect, and what the rule
    can detect with these seeds."""

    p: float
    q: float
    effect: Effect | None  # None with fewer than 2 seeds a side
    statistic: float  # the tested fraction of seed pairs in the claim's direction (margin applied), ties half
    sizes: tuple[int, int]
    # The seeds' pooled standard deviation on the test's scale (the log for a ratio); None where a value is not
    # finite (a diverged run) or a side has one seed.
    spread: float | None = None
    offset: float = 0.0  # the margin the claim gives the larger side (0 for a plain comparison)

    @property
    def smallest_p(self) -> float:
        """The smallest p the exact test can give at these group sizes: 1 / C(n_a + n_b, n_a)."""
        m, n = self.sizes
        return 1 / math.comb(m + n, m)

    def needed_fraction(self, alpha: float) -> float | None:
        """The smallest fraction of seed pairs in the claim's direction that the rule supports at `alpha` (untied
        values); None when no outcome can reach alpha at these seeds."""
        m, n = self.sizes
        u = next((u for u in range(m * n + 1) if _u_tail(m, n, u) <= alpha), None)
        return None if u is None else u / (m * n)

    def smallest_effect(self, alpha: float, power: float = POWER) -> float | None:
        """The smallest effect (`larger - smaller`, or their ratio for a ratio) the test would show with
        probability `power` at these seeds, were the seeds of both sides normal with the measured spread: the
        minimum detectable effect. None where no outcome can reach alpha, or the spread is unknown."""
        if self.spread is None or self.effect is None:
            return None
        shift = _standardized_shift(*self.sizes, alpha, power)
        if shift is None:
            return None
        needed = shift * self.spread - self.offset
        return math.exp(needed) if self.effect.ratio else needed

    def seeds_needed(self, alpha: float, power: float = POWER) -> int | None:
        """About how many seeds a side an effect of the measured fraction of seed pairs needs to be supported with
        probability `power` (Noether 1987's sample size for the Mann-Whitney test); None when the measured
        fraction is not in the claim's direction."""
        fraction = min(self.statistic, 1 - 1 / (4 * max(1, self.sizes[0] * self.sizes[1])))
        if fraction <= 0.5:
            return None
        z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)
        seeds = math.ceil(z ** 2 / (6 * (fraction - 0.5) ** 2))
        least = next(k for k in range(2, 1000) if 1 / math.comb(2 * k, k) <= alpha)
        return max(seeds, least)


def compare(smaller: Sequence[float], larger: Sequence[float], *, what: str, offset: float = 0.0,
            ratio: bool = False) -> Comparison:
    """The test of the claim that values in `smaller` tend to be below `larger` + `offset` (a non-inferiority
    margin, 0 for a plain comparison), with the effect of `larger` against `smaller`: their difference, or with
    `ratio` their ratio (losses, drift: positive measures compared on a log scale)."""
    a = [float(v) for v in smaller]
    b = [float(v) for v in larger]
    shifted = [v + offset for v in b]
    p, q = p_smaller(a, shifted), p_smaller(shifted, a)
    return Comparison(p, q, effect(a, b, what=what, ratio=ratio), _fraction_smaller(a, shifted), (len(a), len(b)),
                      spread=_pooled_spread(a, b, ratio=ratio), offset=offset)


def _pooled_spread(a: Sequence[float], b: Sequence[float], *, ratio: bool) -> float | None:
    """The two sides' pooled seed-to-seed standard deviation (on a log scale for a ratio); None where it is not
    defined (a value not finite or not positive on a log scale, a side of one)."""
    if len(a) < 2 or len(b) < 2:
        return None
    values = [np.asarray(side, dtype=float) for side in (a, b)]
    if ratio:
        if any((side <= 0).any() for side in values):
            return None
        values = [np.log(side) for side in values]
    if not all(np.isfinite(side).all() for side in values):
        return None
    squares = sum(float(((side - side.mean()) ** 2).sum()) for side in values)
    return math.sqrt(squares / (len(a) + len(b) - 2))


@functools.cache
def _standardized_shift(m: int, n: int, alpha: float, power: float) -> float | None:
    """The shift, in standard deviations, between two normal samples of m and n that the exact test at `alpha`
    shows with probability `power`; None where no outcome reaches alpha. The test shows a shift d when at least
    u* of the m n pairs have x - y < d (u*: the least U with P(U >= u*) <= alpha), i.e. when d exceeds the u*-th
    smallest pairwise difference; the `power` quantile of that difference over 20,000 simulated pairs of samples
    (a fixed seed: the same figure every time) is the shift."""
    critical = next((u for u in range(m * n + 1) if _u_tail(m, n, u) <= alpha), None)
    if critical is None or critical == 0:
        return None
    generator = np.random.default_rng(0)
    x, y = generator.standard_normal((20_000, m)), generator.standard_normal((20_000, n))
    differences = (x[:, :, None] - y[:, None, :]).reshape(20_000, m * n)
    kth = np.partition(differences, critical - 1, axis=1)[:, critical - 1]
    return float(np.quantile(kth, power))


def effect(smaller: Sequence[float], larger: Sequence[float], *, what: str, ratio: bool = False) -> Effect | None:
    """`larger` against `smaller` (see Effect); None with fewer than 2 values a side."""
    m, n = len(smaller), len(larger)
    if m < 2 or n < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = np.asarray(smaller, dtype=float), np.asarray(larger, dtype=float)
        if ratio:
            a, b = np.log(np.maximum(a, 0.0)), np.log(np.maximum(b, 0.0))
        differences = (b[None, :] - a[:, None]).ravel()
    differences = np.sort(np.nan_to_num(differences, nan=0.0, posinf=math.inf, neginf=-math.inf))  # inf - inf: a tie
    counts, total = _u_counts(m, n), math.comb(m + n, m)
    below = np.cumsum(counts) / total  # P(U <= u)
    k = int(np.searchsorted(below, (1 - CONFIDENCE) / 2, side="right"))  # largest k with P(U <= k - 1) <= tail
    confidence = CONFIDENCE
    if k == 0:  # 95 % is out of reach at these seeds: the widest interval they have, and its own coverage
        k, confidence = 1, 1 - 2 * below[0]
    low, high, estimate = differences[k - 1], differences[m * n - k], float(np.median(differences))
    if ratio:
        low, high, estimate = math.exp(low), math.exp(high), math.exp(estimate)
    return Effect(what, estimate, float(low), float(high), float(confidence), _fraction_smaller(smaller, larger),
                  ratio)


def _fraction_smaller(a: Sequence[float], b: Sequence[float]) -> float:
    """The fraction of pairs (x from a, y from b) with x < y, ties half: the test's statistic over n_a n_b."""
    x, y = np.asarray(a, dtype=float)[:, None], np.asarray(b, dtype=float)[None, :]
    return float(((x < y) + 0.5 * (x == y)).mean())


@dataclass(frozen=True)
class ClaimResult:
    name: str
    statement: str
    rule: str
    evidence: str
    verdict: str
    p_value: float | None  # p of the claim's direction; None when no test could be made
    # Copied from the claim that made it, so a report can group results without parsing their names.
    kind: str = ""
    short: str = ""
    study: str = ""
    reason: str = ""
    batch_size: int | None = None
    variant: str | None = None
    network: str = DEFAULT_NETWORK  # the network its runs train (its name starts with `cnn-` on the ConvNet)
    comparison: Comparison | None = None  # the test behind the verdict, with its effect
    alpha: float = 0.05
    # Set by `holm` over the family of claims judged together (`holm_family` of them); None until then.
    holm_p: float | None = None
    holm_verdict: str | None = None
    holm_family: int | None = None

    @property
    def holds(self) -> bool:
        return self.verdict == SUPPORTED

    @property
    def effect(self) -> Effect | None:
        return self.comparison.effect if self.comparison else None

    def power(self) -> str:
        """What the rule can show with these seeds, in words ("" where no test was made); for a claim not shown,
        about how many seeds an effect of the measured size would need."""
        c = self.comparison
        if c is None:
            return ""
        m, n = c.sizes
        seeds = f"{m} seeds a side" if m == n else f"{m} and {n} seeds"
        needed = c.needed_fraction(self.alpha)
        if needed is None:
            return f"no outcome can be shown with {seeds} (smallest possible p {c.smallest_p:.3g} > {self.alpha})"
        text = f"with {seeds}: shown only when >= {needed:.0%} of seed pairs agree (smallest p {c.smallest_p:.3g})"
        if self.verdict == SUPPORTED:
            return text
        smallest = c.smallest_effect(self.alpha)
        if smallest is not None:
            unit = "x" if c.effect.ratio else ""
            text += (f"; the smallest effect these seeds show with {POWER:.0%} power, at the measured spread: "
                     f"{smallest:{'' if unit else '+'}.3g}{unit} ({c.effect.what})")
        more = c.seeds_needed(self.alpha)
        if more is None:
            return text + f"; {c.statistic:.0%} of pairs agree here: no effect the claim's way to power"
        return text + f"; {c.statistic:.0%} agree here: an effect this size needs about {more} seeds a side " \
            f"for {POWER:.0%} power"

    def describe(self) -> str:
        text = f"{self.name}: {self.verdict}. {self.statement} Evidence: {self.evidence}."
        if self.effect is not None:
            text += f" Effect: {self.effect.describe()}."
        return text + f" Rule: {self.rule}."


def holm(results: Sequence[ClaimResult]) -> list[ClaimResult]:
    """`results` with Holm's step-down adjustment over the family of those that were tested: an adjusted p of
    each direction, and the verdict they give at each claim's alpha (family-wise). Untested claims keep None."""
    tested = [i for i, r in enumerate(results) if r.comparison is not None]
    adjusted = {}
    for which in ("p", "q"):
        order = sorted(tested, key=lambda i: getattr(results[i].comparison, which))
        running = 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (len(order) - rank) * getattr(results[i].comparison, which)))
            adjusted[which, i] = running
    out = list(results)
    for i in tested:
        p, q = adjusted["p", i], adjusted["q", i]
        out[i] = dataclasses.replace(results[i], holm_p=p, holm_verdict=decide(p, q, results[i].alpha),
                                     holm_family=len(tested))
    return out


class Runs:
    """The records a claim needs, looked up by what varies between them; each list ordered by seed."""

    def __init__(self, records: dict[RunSpec, RunRecord]):
        self.records = records

    def of(self, variant: str, batch_size: int, *, lr: float | None = None,
           init_scale: float | None = None) -> list[RunRecord]:
        return sorted((r for spec, r in self.records.items()
                       if spec.variant == variant and spec.batch_size == batch_size
                       and (lr is None or spec.lr == lr) and (init_scale is None or spec.init_scale == init_scale)),
                      key=lambda r: r.spec.seed)


@dataclass(frozen=True)
class Claim:
    kind: str  # what it checks, whatever the batch size: bn-lower-final-loss
    batch_size: int | None  # the batch size it is about, if one
    statement: str
    short: str  # the statement in a few words, for the discussion
    study: str  # the study whose runs it judges
    reason: str  # a key of REASONS
    needs: tuple[RunSpec, ...]  # every run it judges
    judge: Callable[[Claim, Runs], ClaimResult]
    alpha: float
    variant: str | None = None  # the variant it is about, where one (its kind then starts with the variant's name)
    network: str = DEFAULT_NETWORK  # the network its runs train

    @property
    def name(self) -> str:
        """`bn-lower-final-loss-bs64`; on the ConvNet `cnn-bn-lower-final-loss-bs64` (one claim per network)."""
        kind = network_prefix(self.network) + self.kind
        return kind if self.batch_size is None else f"{kind}-bs{self.batch_size}"

    def evaluate(self, records: Iterable[RunRecord]) -> ClaimResult:
        needed = set(self.needs)
        found = {record.spec: record for record in records if record.spec in needed}
        missing = [spec.case_id for spec in self.needs if spec not in found]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            result = ClaimResult(self.name, self.statement, "needs every run it judges", f"no runs of {shown}",
                                 NOT_SHOWN, None)
        else:
            result = self.judge(self, Runs(found))
        return dataclasses.replace(result, kind=self.kind, short=self.short, study=self.study, reason=self.reason,
                                   batch_size=self.batch_size, variant=self.variant, network=self.network)


def p_smaller(a: list[float], b: list[float]) -> float:
    """Exact one-sided permutation p-value that values in `a` tend to be smaller than in `b`.

    The statistic counts pairs (x from a, y from b) with x < y, ties as one half, so infinite values (diverged
    runs) are ordered, not averaged. It falls as the sum of a's midranks in the pooled sample rises, so p is the
    fraction of the C(n_a + n_b, n_a) relabellings whose a-side midrank sum is at most the one measured: counted
    exactly, ties included, by `_rank_sum_counts` without enumerating them (milliseconds at 30 seeds a side).
    """
    if len(a) < 2 or len(b) < 2:
        return 1.0  # one run per group: nothing to tell the effect from seed noise
    pooled = np.concatenate([np.asarray(a, dtype=float), np.asarray(b, dtype=float)])
    doubled = np.rint(2 * stats.rankdata(pooled)).astype(int)  # midranks are halves: doubled, whole numbers
    measured = int(doubled[:len(a)].sum())
    counts = _rank_sum_counts(tuple(sorted(doubled)), len(a))  # the null does not depend on which side is which
    return float(counts[:measured + 1].sum() / counts.sum())


@functools.lru_cache(maxsize=256)
def _rank_sum_counts(scores: tuple[int, ...], size: int) -> np.ndarray:
    """How many `size`-subsets of `scores` have each sum (index: the sum): the exact null distribution of a
    rank-sum statistic, built item by item (subsets with the item, and without). In float64, whose counts are
    whole numbers exactly up to 2^53 (any split of 56 runs) and within 1e-16 of them beyond."""
    counts = np.zeros((size + 1, sum(sorted(scores)[-size:]) + 1))
    counts[0, 0] = 1.0
    for score in scores:
        counts[1:, score:] += counts[:-1, :counts.shape[1] - score].copy()
    return counts[size]


def decide(p_claim: float, p_opposite: float, alpha: float) -> str:
    if p_claim <= alpha:
        return SUPPORTED
    if p_opposite <= alpha:
        return CONTRADICTED
    return NOT_SHOWN


def summary(values, digits: int = 4, *, significant: bool = False) -> str:
    """`mean ± std (n=N)` of what was measured: bnsuite's one such formatter (claims, report, baseline).

    Values that were not measured (None, NaN) are left out, "n/a" if none is left; diverged (infinite) runs are
    counted and named. `digits` decimals, or significant digits with `significant`.
    """
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    finite = [v for v in values if math.isfinite(v)]
    diverged = len(values) - len(finite)
    if not finite:
        return f"all {len(values)} diverged"
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    form = f".{digits}g" if significant else f".{digits}f"
    text = f"{statistics.mean(finite):{form}} ± {spread:{form}} (n={len(finite)})"
    return text + (f", {diverged} diverged" if diverged else "")


def not_recorded(claim: Claim, what: str, *, why: str = "records migrated from schema 1") -> ClaimResult:
    """The result of a claim whose measure some of its runs did not record: not shown, saying why."""
    return ClaimResult(claim.name, claim.statement, "needs the measure in every run",
                       f"{what} not recorded in some runs ({why})", NOT_SHOWN, None)


def rule(direction: str, alpha: float) -> str:
    return f"one-sided exact permutation test over seeds, {direction}, p <= {alpha}"


def result(claim: Claim, direction: str, evidence: str, comparison: Comparison) -> ClaimResult:
    """A claim's result under the rule: the comparison's `p` that the claim holds, `q` that its opposite does."""
    return ClaimResult(claim.name, claim.statement, rule(direction, claim.alpha), evidence,
                       decide(comparison.p, comparison.q, claim.alpha), comparison.p, comparison=comparison,
                       alpha=claim.alpha)


def held_out_accuracy(record: RunRecord) -> float:
    """Final held-out accuracy (RunRecord.held_out_accuracy); 0 for a diverged run."""
    if record.diverged or not record.epochs:
        return 0.0
    return record.held_out_accuracy(record.epochs[-1])


def needs(study_spec: StudySpec, study: Study, variants: Iterable[str], batch_size: int) -> tuple[RunSpec, ...]:
    """Every run of `variants` at `batch_size` in `study`: each learning rate, init scale and seed."""
    return tuple(study_spec.run_spec(study, variant, batch_size, seed, lr=lr, init_scale=scale)
                 for variant in variants for lr in study.lrs for scale in study.init_scales
                 for seed in study_spec.seeds)


def at_least(measure: Callable[[RunRecord], float], what: str, margin: float, *, variant: str, reference: str,
             batch_size: int, at: dict | None = None) -> Callable[[Claim, Runs], ClaimResult]:
    """A judge: `variant`'s `measure` is at least `reference`'s, within `margin` (non-inferiority), on the runs
    at `batch_size` (and the learning rate or init scale `at` picks)."""
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        mine = [measure(r) for r in runs.of(variant, batch_size, **(at or {}))]
        theirs = [measure(r) for r in runs.of(reference, batch_size, **(at or {}))]
        if any(math.isnan(value) for value in mine + theirs):
            return not_recorded(claim, what)
        # Non-inferiority: the reference below variant + margin is the claim; variant + margin below it the opposite.
        comparison = compare(theirs, mine, offset=margin,
                             what=f"{variant} - {reference} {what.replace(' %', '')} (points)")
        evidence = f"{what} {variant} {summary(mine, 2)} vs {reference} {summary(theirs, 2)}; p={comparison.p:.3f}"
        return result(claim, f"{reference} below {variant} + {margin} points", evidence, comparison)

    return judge


def smaller(measure: Callable[[RunRecord], float], what: str, *, variant: str, reference: str, batch_size: int,
            digits: int = 4, direction: str | None = None, missing: tuple[str, str] | None = None,
            ratio: bool = True, significant: bool = False) -> Callable[[Claim, Runs], ClaimResult]:
    """A judge: `variant`'s `measure` is smaller than `reference`'s at `batch_size`, its effect the ratio
    reference / variant (`ratio`, for positive measures such as a loss) or the difference. `missing`: (what, why)
    to say when a run did not record the measure (NaN); `digits` decimals in the evidence, or significant digits
    with `significant` (measures spanning orders of magnitude)."""
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        mine = [measure(r) for r in runs.of(variant, batch_size)]
        theirs = [measure(r) for r in runs.of(reference, batch_size)]
        if missing is not None and any(math.isnan(value) for value in mine + theirs):
            return not_recorded(claim, missing[0], why=missing[1])
        comparison = compare(mine, theirs, ratio=ratio,
                             what=f"{reference} {'/' if ratio else '-'} {variant} {what.removesuffix(':')}")
        evidence = (f"{what} {variant} {summary(mine, digits, significant=significant)} vs {reference} "
                    f"{summary(theirs, digits, significant=significant)}; p={comparison.p:.3f}")
        return result(claim, direction or f"{variant} smaller", evidence, comparison)

    return judge


def train_accuracy(record: RunRecord) -> float:
    """The final model's accuracy on its training images (eval mode); 0 for a diverged run, NaN if not measured."""
    if record.diverged:
        return 0.0
    return math.nan if record.final_train_accuracy_eval is None else record.final_train_accuracy_eval


def activation_drift(record: RunRecord) -> float:
    """The drift of the last hidden layer's input percentiles (ActivationTrace.drift); infinite if diverged
    (worst), NaN if not probed."""
    if record.diverged:
        return math.inf
    return math.nan if record.activations is None else record.activations.drift()


def batch_statistics_accuracy(record: RunRecord) -> float:
    """Final held-out accuracy with each held-out batch's own statistics; 0 if diverged, NaN if not recorded."""
    if record.diverged:
        return 0.0
    value = record.epochs[-1].batch_statistics_accuracy if record.epochs else None
    return math.nan if value is None else value


def measured(name: str, epoch: int | None = None) -> Callable[[RunRecord], float]:
    """A measure for claims: the plugin measure `name` (bnsuite.registry.register_measure) at the end of `epoch`
    (default: the last); NaN where not measured and for a diverged run (a plugin's measure has no known worst)."""
    def measure(record: RunRecord) -> float:
        if record.diverged or not record.epochs:
            return math.nan
        at = record.epochs[-1] if epoch is None else next((e for e in record.epochs if e.epoch == epoch), None)
        value = None if at is None else at.measure(name)
        return math.nan if value is None else value

    return measure


def precise_accuracy(record: RunRecord) -> float:
    """Final held-out accuracy with precise population statistics (bnsuite.precise); 0 if diverged, NaN if not
    measured."""
    if record.diverged:
        return 0.0
    value = record.epochs[-1].precise_accuracy if record.epochs else None
    return math.nan if value is None else value


def precise_gap(record: RunRecord, epoch: int | None = None) -> float:
    """Held-out accuracy with precise statistics minus with the running estimates, in points, at the end of `epoch`
    (default: the last); NaN where not measured then or diverged (a broken model has no statistics to compare)."""
    if record.diverged or not record.epochs:
        return math.nan
    at = record.epochs[-1] if epoch is None else next((e for e in record.epochs if e.epoch == epoch), None)
    if at is None or at.precise_accuracy is None:
        return math.nan
    return at.precise_accuracy - record.held_out_accuracy(at)


def generalization_gap(record: RunRecord) -> float:
    """The final model's training accuracy minus its held-out accuracy, in points; infinite if diverged (worst)."""
    return math.inf if record.diverged else train_accuracy(record) - held_out_accuracy(record)



def study_claims(spec: StudySpec) -> list[Claim]:
    """Every claim the studies of `spec` can check, judged with its claim settings; a study whose definition is
    not registered in this process (its plugin is not loaded) has none here.

    A study on several networks makes its claims once per network, each on the study narrowed to that network
    (so every claim judges runs of one network, and its definition needs to know nothing of networks); a
    claim of a network other than the study's MLP carries it in its name and statement.
    """
    claims = []
    for study in spec.studies:
        definition = study_definition(study.name)
        if definition is None:
            continue
        for network in study.networks:
            made = definition.claims(spec, dataclasses.replace(study, networks=(network,)))
            if network != DEFAULT_NETWORK:
                made = [dataclasses.replace(claim, network=network,
                                            statement=f"On the {network_title(network)}: {claim.statement}")
                        for claim in made]
            claims += made
    _check_unique_names(claims)
    return claims


def _check_unique_names(claims: list[Claim]) -> None:
    """Claim names are the claims' identities (the gate, the report, the family's correction): two claims of one
    name are refused, naming the studies (and the plugin modules) that made them."""
    owners: dict[str, Claim] = {}
    for claim in claims:
        other = owners.setdefault(claim.name, claim)
        if other is not claim:
            raise SpecError(f"two claims are named {claim.name!r}: one of the {_owner(other.study)} and one of the "
                            f"{_owner(claim.study)}; rename one (a study of your own can prefix its claims' kinds "
                            "with its own name)")


def _owner(study: str) -> str:
    definition = study_definition(study)
    source = definition.source if definition is not None else "unregistered"
    return f"study {study!r} ({'bnsuite' if source == 'bnsuite' else 'plugin ' + source.split()[0]})"


def gate(result: ClaimResult, known: KnownException | None) -> tuple[str, str]:
    """What the claims gate does with a verdict: ("pass", ""), ("xfail", why) or ("fail", why).

    A claim passes when it holds. A known exception is an expected failure
    only while the verdict is the one it records (an unsettled one: while
    not shown, and it passes when it holds; a not-supported one: while not
    shown or contradicted): a claim that starts to hold,
    or whose verdict moves (from "not shown" to "contradicted", say), fails
    until the exception is updated.
    """
    if known is None:
        return ("pass", "") if result.holds else ("fail", result.describe())
    if known.verdict == UNSETTLED and result.verdict != CONTRADICTED:  # either verdict its seeds can give
        return ("pass", "") if result.holds else (
            "xfail", f"unsettled at these seeds ({known.reason}). {result.describe()}")
    if known.verdict == NOT_SUPPORTED and not result.holds:  # either failing verdict, by the CPU's rounding
        return "xfail", f"not supported in our measurements ({known.reason}). {result.describe()}"
    if result.verdict == known.verdict:
        return "xfail", f"not supported in our measurements ({known.verdict}: {known.reason}). {result.describe()}"
    if result.holds:
        return "fail", f"{result.name} now holds: take it off the study's known exceptions. {result.describe()}"
    return "fail", (f"{result.name} is now {result.verdict}, not {known.verdict} as its known exception says: "
                    f"check what changed, then update the exception. {result.describe()}")
