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
1 time in 20. A diverged run counts as the worst possible outcome (infinite
loss, accuracy 0, never reaching the target, never "trained"), so divergence
is weighed, never dropped.

Each claim belongs to one study (its module in bnsuite.studies, or a user's
plugin) and checks one of the reasons the original study gives for BN
(`REASONS`). Claims our own measurements do not support under a profile are
listed with the study as known exceptions, with the verdict they give; the
claims gate never loosens a rule instead. This module is the machinery every
study's claims are made of: the rule, the judges, the measures.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from bnsuite.records import RunRecord
from bnsuite.registry import study_definition
from bnsuite.spec import CONTRADICTED, NOT_SHOWN, SUPPORTED, KnownException, RunSpec, Study, StudySpec

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
}


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

    @property
    def holds(self) -> bool:
        return self.verdict == SUPPORTED

    def describe(self) -> str:
        return f"{self.name}: {self.verdict}. {self.statement} Evidence: {self.evidence}. Rule: {self.rule}."


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

    @property
    def name(self) -> str:
        return self.kind if self.batch_size is None else f"{self.kind}-bs{self.batch_size}"

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
                                   batch_size=self.batch_size, variant=self.variant)


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


def result(claim: Claim, direction: str, evidence: str, p: float, q: float) -> ClaimResult:
    """A claim's result under the rule: `p` that the claim holds, `q` that its opposite does."""
    return ClaimResult(claim.name, claim.statement, rule(direction, claim.alpha), evidence,
                       decide(p, q, claim.alpha), p)


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
        p, q = p_smaller(theirs, [v + margin for v in mine]), p_smaller([v + margin for v in mine], theirs)
        evidence = f"{what} {variant} {summary(mine, 2)} vs {reference} {summary(theirs, 2)}; p={p:.3f}"
        return result(claim, f"{reference} below {variant} + {margin} points", evidence, p, q)

    return judge


def smaller(measure: Callable[[RunRecord], float], what: str, *, variant: str, reference: str, batch_size: int,
            digits: int = 4, direction: str | None = None,
            missing: tuple[str, str] | None = None) -> Callable[[Claim, Runs], ClaimResult]:
    """A judge: `variant`'s `measure` is smaller than `reference`'s at `batch_size`. `missing`: (what, why) to
    say when a run did not record the measure (NaN)."""
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        mine = [measure(r) for r in runs.of(variant, batch_size)]
        theirs = [measure(r) for r in runs.of(reference, batch_size)]
        if missing is not None and any(math.isnan(value) for value in mine + theirs):
            return not_recorded(claim, missing[0], why=missing[1])
        p, q = p_smaller(mine, theirs), p_smaller(theirs, mine)
        evidence = f"{what} {variant} {summary(mine, digits)} vs {reference} {summary(theirs, digits)}; p={p:.3f}"
        return result(claim, direction or f"{variant} smaller", evidence, p, q)

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


def generalization_gap(record: RunRecord) -> float:
    """The final model's training accuracy minus its held-out accuracy, in points; infinite if diverged (worst)."""
    return math.inf if record.diverged else train_accuracy(record) - held_out_accuracy(record)



def study_claims(spec: StudySpec) -> list[Claim]:
    """Every claim the studies of `spec` can check, judged with its claim settings; a study whose definition is
    not registered in this process (its plugin is not loaded) has none here."""
    claims = []
    for study in spec.studies:
        definition = study_definition(study.name)
        if definition is not None:
            claims += definition.claims(spec, study)
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
