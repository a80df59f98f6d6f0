"""The study's claims about BN, each a named check with its evidence and a verdict.

Every claim compares groups of runs that differ only in the seed. One run per
group would make any verdict a coin toss, so the decision rule is an exact
one-sided permutation test (Mann-Whitney: the fraction of seed-relabellings
at least as one-sided as what was measured) at the study's alpha (0.05 by
default, bnsuite.spec.ClaimSettings, recorded with every run):

- supported:    the data show the claim (p <= alpha);
- contradicted: the data show its opposite (p <= alpha the other way);
- not shown:    neither (seed noise is as large as the effect, or too few seeds).

With 3 seeds per group, p <= 0.05 means every run of one group beats every
run of the other: a rule that seed noise cannot pass by luck more often than
1 time in 20. A diverged run counts as the worst possible (infinite loss,
never reaching the target), so divergence is weighed, never dropped.

Claims our own measurements do not support under a profile are listed with
the profile (bnsuite.study.PROFILES) as known exceptions, with the verdict
they give; the claims gate never loosens a rule instead.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from bnsuite.records import RunRecord
from bnsuite.spec import CONTRADICTED, NOT_SHOWN, SUPPORTED, ClaimSettings, KnownException

Group = tuple[str, int]  # (variant, batch size)


@dataclass(frozen=True)
class ClaimResult:
    name: str
    statement: str
    rule: str
    evidence: str
    verdict: str
    p_value: float | None  # p of the claim's direction; None when no test could be made

    @property
    def holds(self) -> bool:
        return self.verdict == SUPPORTED

    def describe(self) -> str:
        return f"{self.name}: {self.verdict}. {self.statement} Evidence: {self.evidence}. Rule: {self.rule}."


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    needs: tuple[Group, ...]  # every seed of each group is used
    judge: Callable[[Claim, dict[Group, list[RunRecord]]], ClaimResult]
    alpha: float

    def evaluate(self, records: Iterable[RunRecord]) -> ClaimResult:
        groups: dict[Group, list[RunRecord]] = {group: [] for group in self.needs}
        for record in records:
            group = (record.spec.variant, record.spec.batch_size)
            if group in groups:
                groups[group].append(record)
        missing = [f"{variant} bs{batch}" for (variant, batch), runs in groups.items() if not runs]
        if missing:
            return ClaimResult(self.name, self.statement, "needs runs of every group",
                               f"no runs of {', '.join(missing)}",
                               NOT_SHOWN, None)
        return self.judge(self, groups)


def p_smaller(a: list[float], b: list[float]) -> float:
    """Exact one-sided permutation p-value that values in `a` tend to be smaller than in `b`.

    The statistic counts pairs (x from a, y from b) with x < y, ties as one half,
    so infinite values (diverged runs) are ordered, not averaged.
    """
    if len(a) < 2 or len(b) < 2:
        return 1.0  # one run per group: nothing to tell the effect from seed noise

    def pairs_smaller(x, y, axis=-1):
        x, y = np.asarray(x)[..., :, None], np.asarray(y)[..., None, :]
        return ((x < y) + 0.5 * (x == y)).sum(axis=(-1, -2))

    result = stats.permutation_test(
        (np.asarray(a, dtype=float), np.asarray(b, dtype=float)), pairs_smaller,
        permutation_type="independent", alternative="greater", n_resamples=np.inf, vectorized=True,
    )
    return float(result.pvalue)


def decide(p_claim: float, p_opposite: float, alpha: float) -> str:
    if p_claim <= alpha:
        return SUPPORTED
    if p_opposite <= alpha:
        return CONTRADICTED
    return NOT_SHOWN


def summary(values: list[float], digits: int = 4) -> str:
    """`mean ± std (n=N)`, with diverged (infinite) runs counted and named."""
    finite = [v for v in values if math.isfinite(v)]
    diverged = len(values) - len(finite)
    if not finite:
        return f"all {len(values)} diverged"
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    text = f"{statistics.mean(finite):.{digits}f} ± {spread:.{digits}f} (n={len(finite)})"
    return text + (f", {diverged} diverged" if diverged else "")


def _rule(direction: str, alpha: float) -> str:
    return f"one-sided exact permutation test over seeds, {direction}, p <= {alpha}"


def bn_lower_final_loss(batch_size: int, settings: ClaimSettings) -> Claim:
    def judge(claim: Claim, groups) -> ClaimResult:
        bn = [r.final_train_loss for r in groups[("bn", batch_size)]]
        plain = [r.final_train_loss for r in groups[("plain", batch_size)]]
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        evidence = f"final training loss bn {summary(bn)} vs plain {summary(plain)}; p={p:.3f}"
        return ClaimResult(claim.name, claim.statement, _rule("bn lower", claim.alpha), evidence,
                           decide(p, q, claim.alpha), p)

    return Claim(
        name=f"bn-lower-final-loss-bs{batch_size}",
        statement=f"At batch size {batch_size}, BN ends training with a lower training loss than plain.",
        needs=(("bn", batch_size), ("plain", batch_size)),
        judge=judge,
        alpha=settings.alpha,
    )


def bn_accuracy_at_least_plain(batch_size: int, settings: ClaimSettings) -> Claim:
    margin = settings.accuracy_margin

    def judge(claim: Claim, groups) -> ClaimResult:
        bn = [r.test_accuracy for r in groups[("bn", batch_size)]]
        plain = [r.test_accuracy for r in groups[("plain", batch_size)]]
        # Non-inferiority: plain below bn + margin is the claim; bn + margin below plain its opposite.
        p = p_smaller(plain, [v + margin for v in bn])
        q = p_smaller([v + margin for v in bn], plain)
        evidence = f"test accuracy % bn {summary(bn, 2)} vs plain {summary(plain, 2)}; p={p:.3f}"
        rule = _rule(f"plain below bn + {margin} points", claim.alpha)
        return ClaimResult(claim.name, claim.statement, rule, evidence, decide(p, q, claim.alpha), p)

    return Claim(
        name=f"bn-accuracy-at-least-plain-bs{batch_size}",
        statement=f"At batch size {batch_size}, BN's test accuracy is at least plain's.",
        needs=(("bn", batch_size), ("plain", batch_size)),
        judge=judge,
        alpha=settings.alpha,
    )


def bn_converges_faster(batch_size: int, settings: ClaimSettings) -> Claim:
    target_loss = settings.target_loss

    def judge(claim: Claim, groups) -> ClaimResult:
        def epochs(runs):
            return [float(r.epochs_to_target(target_loss) or math.inf) for r in runs]

        bn, plain = epochs(groups[("bn", batch_size)]), epochs(groups[("plain", batch_size)])
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        evidence = (f"epochs to training loss <= {target_loss}: bn {_epoch_list(bn)} vs plain {_epoch_list(plain)}; "
                    f"p={p:.3f}")
        return ClaimResult(claim.name, claim.statement, _rule("bn fewer epochs", claim.alpha), evidence,
                           decide(p, q, claim.alpha), p)

    return Claim(
        name=f"bn-converges-faster-bs{batch_size}",
        statement=(f"At batch size {batch_size}, BN reaches a training loss of {target_loss} "
                   "in fewer epochs than plain."),
        needs=(("bn", batch_size), ("plain", batch_size)),
        judge=judge,
        alpha=settings.alpha,
    )


def _epoch_list(values: list[float]) -> str:
    return "[" + ", ".join("never" if math.isinf(v) else str(int(v)) for v in values) + "]"


def final_loss_rises_with_batch_size(variant: str, batch_sizes: tuple[int, ...], settings: ClaimSettings) -> Claim:
    ordered = tuple(sorted(batch_sizes))

    def judge(claim: Claim, groups) -> ClaimResult:
        losses = {batch: [r.final_train_loss for r in groups[(variant, batch)]] for batch in ordered}
        steps = list(itertools.pairwise(ordered))
        p_values = [p_smaller(losses[small], losses[large]) for small, large in steps]
        q_values = [p_smaller(losses[large], losses[small]) for small, large in steps]
        if all(p <= claim.alpha for p in p_values):
            verdict = SUPPORTED
        elif any(q <= claim.alpha for q in q_values):
            verdict = CONTRADICTED
        else:
            verdict = NOT_SHOWN
        evidence = "final training loss " + "; ".join(f"bs{batch} {summary(losses[batch])}" for batch in ordered)
        evidence += "; p per step " + ", ".join(f"{p:.3f}" for p in p_values)
        rule = _rule("smaller batch lower, for each consecutive pair of batch sizes", claim.alpha)
        return ClaimResult(claim.name, claim.statement, rule, evidence, verdict, max(p_values))

    return Claim(
        name=f"{variant}-final-loss-rises-with-batch-size",
        statement=(f"For {variant}, a larger batch ends with a higher training loss "
                   f"(batch sizes {', '.join(map(str, ordered))}, same epochs, so fewer steps)."),
        needs=tuple((variant, batch) for batch in ordered),
        judge=judge,
        alpha=settings.alpha,
    )


def study_claims(variants: tuple[str, ...], batch_sizes: tuple[int, ...], settings: ClaimSettings) -> list[Claim]:
    """The claims a study of these variants and batch sizes can check, judged with `settings`."""
    claims: list[Claim] = []
    if {"bn", "plain"} <= set(variants):
        for batch_size in sorted(batch_sizes):
            claims += [
                bn_lower_final_loss(batch_size, settings),
                bn_accuracy_at_least_plain(batch_size, settings),
                bn_converges_faster(batch_size, settings),
            ]
    if len(batch_sizes) > 1:
        claims += [final_loss_rises_with_batch_size(variant, batch_sizes, settings) for variant in variants]
    return claims


def gate(result: ClaimResult, known: KnownException | None) -> tuple[str, str]:
    """What the claims gate does with a verdict: ("pass", ""), ("xfail", why) or ("fail", why).

    A claim passes when it holds. A known exception is an expected failure
    only while the verdict is the one it records: a claim that starts to hold,
    or whose verdict moves (from "not shown" to "contradicted", say), fails
    until the exception is updated.
    """
    if known is None:
        return ("pass", "") if result.holds else ("fail", result.describe())
    if result.verdict == known.verdict:
        return "xfail", f"not supported in our measurements ({known.verdict}: {known.reason}). {result.describe()}"
    if result.holds:
        return "fail", f"{result.name} now holds: take it off the study's known exceptions. {result.describe()}"
    return "fail", (f"{result.name} is now {result.verdict}, not {known.verdict} as its known exception says: "
                    f"check what changed, then update the exception. {result.describe()}")
