"""The study's claims about BN, each a named check with its evidence and a verdict.

Every claim compares groups of runs that differ only in the seed. One run per
group would make any verdict a coin toss, so the decision rule is an exact
one-sided permutation test (Mann-Whitney: the fraction of seed-relabellings
at least as one-sided as what was measured) at ALPHA = 0.05:

- supported:    the data show the claim (p <= ALPHA);
- contradicted: the data show its opposite (p <= ALPHA the other way);
- not shown:    neither (seed noise is as large as the effect, or too few seeds).

With 3 seeds per group, p <= 0.05 means every run of one group beats every
run of the other: a rule that seed noise cannot pass by luck more often than
1 time in 20. A diverged run counts as the worst possible (infinite loss,
never reaching the target), so divergence is weighed, never dropped.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from scipy import stats

from bnsuite.records import RunRecord

ALPHA = 0.05
ACCURACY_MARGIN = 0.1  # percentage points: "at least" tolerates a difference smaller than this
SUPPORTED, CONTRADICTED, NOT_SHOWN = "supported", "contradicted", "not shown"

Group = tuple[str, int]  # (variant, batch size)

# Claims that our own measurements do not support under a profile, and why. The
# benchmark reports them as expected failures with their evidence; if one starts
# to hold, the run fails until it is taken off this list. Never loosen a rule instead.
NOT_SUPPORTED_IN_OUR_MEASUREMENTS: dict[tuple[str, str], str] = {
    ("smoke", "bn-converges-faster-bs32"): (
        "in 2 epochs on 4,000 images both variants first reach loss 0.5 in epoch 2 of 2, "
        "so the epoch counts tie; the full study's 10 epochs separate them"
    ),
    ("full", "bn-final-loss-rises-with-batch-size"): (
        "contradicted: over 10 full epochs BN's final training loss falls as the batch grows from 32 to 128; "
        "the rise holds only in short runs (smoke), where larger batches mean too few steps"
    ),
    ("full", "plain-final-loss-rises-with-batch-size"): (
        "not shown: plain's final loss rises from batch 64 to 128, but at 32 and 64 the seeds overlap"
    ),
}


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
    judge: Callable[["Claim", dict[Group, list[RunRecord]]], ClaimResult]

    def evaluate(self, records: Iterable[RunRecord]) -> ClaimResult:
        groups: dict[Group, list[RunRecord]] = {group: [] for group in self.needs}
        for record in records:
            group = (record.spec.variant, record.spec.batch_size)
            if group in groups:
                groups[group].append(record)
        missing = [f"{variant} bs{batch}" for (variant, batch), runs in groups.items() if not runs]
        if missing:
            return ClaimResult(self.name, self.statement, "needs runs of every group", f"no runs of {', '.join(missing)}",
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


def decide(p_claim: float, p_opposite: float) -> str:
    if p_claim <= ALPHA:
        return SUPPORTED
    if p_opposite <= ALPHA:
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


def _rule(direction: str) -> str:
    return f"one-sided exact permutation test over seeds, {direction}, p <= {ALPHA}"


def bn_lower_final_loss(batch_size: int) -> Claim:
    def judge(claim: Claim, groups) -> ClaimResult:
        bn = [r.final_train_loss for r in groups[("bn", batch_size)]]
        plain = [r.final_train_loss for r in groups[("plain", batch_size)]]
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        evidence = f"final training loss bn {summary(bn)} vs plain {summary(plain)}; p={p:.3f}"
        return ClaimResult(claim.name, claim.statement, _rule("bn lower"), evidence, decide(p, q), p)

    return Claim(
        name=f"bn-lower-final-loss-bs{batch_size}",
        statement=f"At batch size {batch_size}, BN ends training with a lower training loss than plain.",
        needs=(("bn", batch_size), ("plain", batch_size)),
        judge=judge,
    )


def bn_accuracy_at_least_plain(batch_size: int) -> Claim:
    def judge(claim: Claim, groups) -> ClaimResult:
        bn = [r.test_accuracy for r in groups[("bn", batch_size)]]
        plain = [r.test_accuracy for r in groups[("plain", batch_size)]]
        # Non-inferiority: plain below bn + margin is the claim; bn + margin below plain its opposite.
        p = p_smaller(plain, [v + ACCURACY_MARGIN for v in bn])
        q = p_smaller([v + ACCURACY_MARGIN for v in bn], plain)
        evidence = f"test accuracy % bn {summary(bn, 2)} vs plain {summary(plain, 2)}; p={p:.3f}"
        rule = _rule(f"plain below bn + {ACCURACY_MARGIN} points")
        return ClaimResult(claim.name, claim.statement, rule, evidence, decide(p, q), p)

    return Claim(
        name=f"bn-accuracy-at-least-plain-bs{batch_size}",
        statement=f"At batch size {batch_size}, BN's test accuracy is at least plain's.",
        needs=(("bn", batch_size), ("plain", batch_size)),
        judge=judge,
    )


def bn_converges_faster(batch_size: int, target_loss: float) -> Claim:
    def judge(claim: Claim, groups) -> ClaimResult:
        def epochs(runs):
            return [float(r.epochs_to_target(target_loss) or math.inf) for r in runs]

        bn, plain = epochs(groups[("bn", batch_size)]), epochs(groups[("plain", batch_size)])
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        evidence = (f"epochs to training loss <= {target_loss}: bn {_epoch_list(bn)} vs plain {_epoch_list(plain)}; "
                    f"p={p:.3f}")
        return ClaimResult(claim.name, claim.statement, _rule("bn fewer epochs"), evidence, decide(p, q), p)

    return Claim(
        name=f"bn-converges-faster-bs{batch_size}",
        statement=f"At batch size {batch_size}, BN reaches a training loss of {target_loss} in fewer epochs than plain.",
        needs=(("bn", batch_size), ("plain", batch_size)),
        judge=judge,
    )


def _epoch_list(values: list[float]) -> str:
    return "[" + ", ".join("never" if math.isinf(v) else str(int(v)) for v in values) + "]"


def final_loss_rises_with_batch_size(variant: str, batch_sizes: tuple[int, ...]) -> Claim:
    ordered = tuple(sorted(batch_sizes))

    def judge(claim: Claim, groups) -> ClaimResult:
        losses = {batch: [r.final_train_loss for r in groups[(variant, batch)]] for batch in ordered}
        steps = [(small, large) for small, large in zip(ordered, ordered[1:])]
        p_values = [p_smaller(losses[small], losses[large]) for small, large in steps]
        q_values = [p_smaller(losses[large], losses[small]) for small, large in steps]
        if all(p <= ALPHA for p in p_values):
            verdict = SUPPORTED
        elif any(q <= ALPHA for q in q_values):
            verdict = CONTRADICTED
        else:
            verdict = NOT_SHOWN
        evidence = "final training loss " + "; ".join(f"bs{batch} {summary(losses[batch])}" for batch in ordered)
        evidence += "; p per step " + ", ".join(f"{p:.3f}" for p in p_values)
        rule = _rule("smaller batch lower, for each consecutive pair of batch sizes")
        return ClaimResult(claim.name, claim.statement, rule, evidence, verdict, max(p_values))

    return Claim(
        name=f"{variant}-final-loss-rises-with-batch-size",
        statement=(f"For {variant}, a larger batch ends with a higher training loss "
                   f"(batch sizes {', '.join(map(str, ordered))}, same epochs, so fewer steps)."),
        needs=tuple((variant, batch) for batch in ordered),
        judge=judge,
    )


def study_claims(variants: tuple[str, ...], batch_sizes: tuple[int, ...], target_loss: float) -> list[Claim]:
    """The claims a study of these variants and batch sizes can check."""
    claims: list[Claim] = []
    if {"bn", "plain"} <= set(variants):
        for batch_size in sorted(batch_sizes):
            claims += [
                bn_lower_final_loss(batch_size),
                bn_accuracy_at_least_plain(batch_size),
                bn_converges_faster(batch_size, target_loss),
            ]
    if len(batch_sizes) > 1:
        claims += [final_loss_rises_with_batch_size(variant, batch_sizes) for variant in variants]
    return claims
