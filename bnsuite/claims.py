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

Each claim belongs to one study (bnsuite.spec.STUDIES) and checks one of the
reasons the original study gives for BN (`REASONS`). Claims our own
measurements do not support under a profile are listed with the profile
(bnsuite.study.PROFILES) as known exceptions, with the verdict they give;
the claims gate never loosens a rule instead.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats

from bnsuite.models import ghost_size
from bnsuite.records import RunRecord
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
                                   batch_size=self.batch_size)


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


def _not_recorded(claim: Claim, what: str, *, why: str = "records migrated from schema 1") -> ClaimResult:
    return ClaimResult(claim.name, claim.statement, "needs the measure in every run",
                       f"{what} not recorded in some runs ({why})", NOT_SHOWN, None)


def _rule(direction: str, alpha: float) -> str:
    return f"one-sided exact permutation test over seeds, {direction}, p <= {alpha}"


def _result(claim: Claim, direction: str, evidence: str, p: float, q: float) -> ClaimResult:
    return ClaimResult(claim.name, claim.statement, _rule(direction, claim.alpha), evidence,
                       decide(p, q, claim.alpha), p)


def held_out_accuracy(record: RunRecord) -> float:
    """Final held-out accuracy (validation if the run has a split, else test); 0 for a diverged run."""
    if record.diverged or not record.epochs:
        return 0.0
    last = record.epochs[-1]
    return last.validation_accuracy if last.validation_accuracy is not None else last.test_accuracy


def train_accuracy(record: RunRecord) -> float:
    """The final model's accuracy on its training images (eval mode); 0 for a diverged run, NaN if not measured."""
    if record.diverged:
        return 0.0
    return math.nan if record.final_train_accuracy_eval is None else record.final_train_accuracy_eval


def _needs(study_spec: StudySpec, study: Study, variants: Iterable[str], batch_size: int) -> tuple[RunSpec, ...]:
    return tuple(study_spec.run_spec(study, variant, batch_size, seed, lr=lr, init_scale=scale)
                 for variant in variants for lr in study.lrs for scale in study.init_scales
                 for seed in study_spec.seeds)


def _at_least(measure: Callable[[RunRecord], float], what: str, margin: float,
              **select) -> Callable[[Claim, Runs], ClaimResult]:
    """A judge: BN's `measure` is at least plain's, within `margin` (non-inferiority), on the runs `select` picks."""
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        bn = [measure(r) for r in runs.of(select["bn"], select["batch_size"], **select.get("at", {}))]
        plain = [measure(r) for r in runs.of(select["plain"], select["batch_size"], **select.get("at", {}))]
        if any(math.isnan(value) for value in bn + plain):
            return _not_recorded(claim, what)
        # Non-inferiority: plain below bn + margin is the claim; bn + margin below plain its opposite.
        p, q = p_smaller(plain, [v + margin for v in bn]), p_smaller([v + margin for v in bn], plain)
        evidence = f"{what} bn {summary(bn, 2)} vs plain {summary(plain, 2)}; p={p:.3f}"
        return _result(claim, f"plain below bn + {margin} points", evidence, p, q)

    return judge


# --- the batch-size study: the original study's comparison ---


def batch_study_claims(spec: StudySpec, study: Study) -> list[Claim]:
    settings = spec.claims
    claims: list[Claim] = []
    if not {"bn", "plain"} <= set(study.variants):
        return claims
    margin = settings.accuracy_margin
    for batch_size in sorted(study.batch_sizes):
        common = dict(batch_size=batch_size, study=study.name, needs=_needs(spec, study, ("bn", "plain"), batch_size),
                      alpha=settings.alpha)
        select = dict(bn="bn", plain="plain", batch_size=batch_size)
        at = f"At batch size {batch_size}, "
        claims += [
            Claim("bn-lower-final-loss", statement=at + "BN ends training with a lower training loss than plain.",
                  short="BN ended with a lower training loss", reason="faster",
                  judge=_lower_final_loss(batch_size), **common),
            Claim("bn-accuracy-at-least-plain", statement=at + "BN's test accuracy is at least plain's.",
                  short=f"BN's test accuracy was at least plain's (within {margin} points)", reason="accuracy",
                  judge=_at_least(lambda r: r.test_accuracy, "test accuracy %", margin, **select), **common),
            Claim("bn-train-accuracy-at-least-plain",
                  statement=at + "BN's final model is at least as accurate as plain's on the training images.",
                  short="BN's final model was at least as accurate on the training images", reason="accuracy",
                  judge=_at_least(train_accuracy, "training-set accuracy % (final model)", margin, **select),
                  **common),
        ]
        if spec.validation_size > 0:
            claims.append(Claim(
                "bn-held-out-accuracy-at-least-plain", statement=at + "BN's final validation accuracy is at least "
                "plain's.", short="BN's validation accuracy was at least plain's", reason="accuracy",
                judge=_at_least(held_out_accuracy, "final validation accuracy %", margin, **select), **common))
        claims.append(Claim(
            "bn-converges-faster", statement=at + f"BN reaches a training loss of {settings.target_loss} in fewer "
            "epochs than plain.", short=f"BN reached training loss {settings.target_loss} in fewer epochs",
            reason="faster", judge=_converges_faster(batch_size, settings.target_loss), **common))
        claims.append(Claim(
            "bn-running-estimates-at-least-batch-statistics", statement=at + "BN's final held-out accuracy with its "
            "running estimates (eval mode, what the study reports) is at least its accuracy with each held-out batch "
            f"of {batch_size} normalized by its own statistics.",
            short=f"BN's running estimates did at least as well as batch statistics (within {margin} points)",
            reason="inference", judge=_running_at_least_batch(batch_size, margin),
            **{**common, "needs": _needs(spec, study, ("bn",), batch_size)}))
    if 64 in study.batch_sizes:  # Ioffe & Szegedy's Fig. 1, at the study's own batch size
        claims.append(Claim(
            "bn-steadier-activations", batch_size=64, study=study.name, reason="activations",
            needs=_needs(spec, study, ("bn", "plain"), 64), alpha=settings.alpha,
            statement="At batch size 64, the percentiles (15th, 50th, 85th) of the last hidden layer's inputs to its "
            "ReLU move less over training, relative to their spread, with BN than without (Ioffe & Szegedy 2015, "
            "Fig. 1).", short="BN's hidden-layer input distribution drifted less over training",
            judge=_steadier_activations(64)))
    if len(study.batch_sizes) > 1:
        ordered = tuple(sorted(study.batch_sizes))
        needs = tuple(run for batch_size in ordered for run in _needs(spec, study, ("bn", "plain"), batch_size))
        common = dict(batch_size=None, study=study.name, reason="batch", needs=needs, alpha=settings.alpha)
        sizes = ", ".join(map(str, ordered))
        claims += [
            Claim("bn-loss-advantage-grows-with-batch-size",
                  statement="BN's final training loss relative to plain's (bn / plain, seed by seed) is smaller at "
                  f"batch {ordered[-1]} than at batch {ordered[0]} (measured at {sizes}).",
                  short="BN's final-loss advantage over plain grows with the batch size",
                  judge=_advantage_grows(ordered, "loss"), **common),
            Claim("bn-accuracy-advantage-grows-with-batch-size",
                  statement=f"BN's test accuracy minus plain's (seed by seed) is larger at batch {ordered[-1]} than at "
                  f"batch {ordered[0]} (measured at {sizes}).",
                  short="BN's test-accuracy advantage over plain grows with the batch size",
                  judge=_advantage_grows(ordered, "accuracy"), **common),
        ]
    return claims


def _lower_final_loss(batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        bn = [r.final_train_loss for r in runs.of("bn", batch_size)]
        plain = [r.final_train_loss for r in runs.of("plain", batch_size)]
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        return _result(claim, "bn lower", f"final training loss bn {summary(bn)} vs plain {summary(plain)}; p={p:.3f}",
                       p, q)

    return judge


def _converges_faster(batch_size: int, target_loss: float):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        def epochs(records):
            return [float(r.epochs_to_target(target_loss) or math.inf) for r in records]

        bn, plain = epochs(runs.of("bn", batch_size)), epochs(runs.of("plain", batch_size))
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        evidence = (f"epochs to training loss <= {target_loss}: bn {_epoch_list(bn)} vs plain {_epoch_list(plain)}; "
                    f"p={p:.3f}")
        return _result(claim, "bn fewer epochs", evidence, p, q)

    return judge


def _epoch_list(values: list[float]) -> str:
    return "[" + ", ".join("never" if math.isinf(v) else str(int(v)) for v in values) + "]"


def _advantage_grows(ordered: tuple[int, ...], measure: str):
    """Seed by seed, BN against plain at each batch size; the advantage at the largest against the smallest.

    The ends, not every step: how the advantage moves between neighbouring sizes depends on the protocol
    (in short runs a middle step sits within seed noise), while the change from end to end holds in every
    profile."""
    def advantage(runs: Runs, batch_size: int) -> list[float]:
        pairs = zip(runs.of("bn", batch_size), runs.of("plain", batch_size), strict=True)
        if measure == "loss":  # bn / plain: smaller is a larger advantage; a diverged bn run is the worst
            return [bn.final_train_loss / plain.final_train_loss if math.isfinite(plain.final_train_loss)
                    else (0.0 if math.isfinite(bn.final_train_loss) else 1.0) for bn, plain in pairs]
        return [bn.test_accuracy - plain.test_accuracy for bn, plain in pairs]

    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        values = {batch_size: advantage(runs, batch_size) for batch_size in ordered}
        small, large = values[ordered[0]], values[ordered[-1]]
        if measure == "loss":  # the ratio falls
            p, q = p_smaller(large, small), p_smaller(small, large)
            what, digits = "bn / plain final training loss", 3
        else:  # the difference grows
            p, q = p_smaller(small, large), p_smaller(large, small)
            what, digits = "bn - plain test accuracy (points)", 2
        evidence = (f"{what}: " + "; ".join(f"bs{b} {summary(values[b], digits)}" for b in ordered)
                    + f"; p={p:.3f}")
        return _result(claim, f"batch {ordered[-1]} against batch {ordered[0]}", evidence, p, q)

    return judge


# --- the learning-rate study ---


def lr_study_claims(spec: StudySpec, study: Study) -> list[Claim]:
    settings = spec.claims
    if not {"bn", "plain"} <= set(study.variants) or len(study.lrs) < 2:
        return []
    claims = []
    floor = settings.trained_accuracy
    grid = ", ".join(f"{lr:g}" for lr in sorted(study.lrs))
    for batch_size in sorted(study.batch_sizes):
        common = dict(batch_size=batch_size, study=study.name, reason="lr",
                      needs=_needs(spec, study, ("bn", "plain"), batch_size), alpha=settings.alpha)
        at = f"At batch size {batch_size}, "
        claims += [
            Claim("bn-trains-where-plain-does-not",
                  statement=at + f"some learning rate on the grid ({grid}) trains every BN seed and no plain seed "
                  f"(trained: did not diverge, final held-out accuracy >= {floor}%).",
                  short="some learning rate trained every BN seed and no plain seed",
                  judge=_trains_where_other_does_not(study, batch_size, floor), **common),
            Claim("bn-highest-trainable-lr-3x-plain",
                  statement=at + f"BN's highest learning rate that trains is at least 3x plain's (per seed, on the "
                  f"grid {grid}).", short="BN's highest learning rate that trains was at least 3x plain's",
                  judge=_highest_lr_ratio(study, batch_size, floor, 3.0), **common),
            Claim("bn-best-accuracy-over-lrs-at-least-plain",
                  statement=at + "BN's held-out accuracy at its best learning rate is at least plain's at its best.",
                  short="BN's held-out accuracy at its best learning rate was at least plain's at its best",
                  judge=_best_over_lrs(study, batch_size, settings.accuracy_margin), **common),
        ]
    return claims


def _trained(record: RunRecord, floor: float) -> float:
    return 1.0 if not record.diverged and held_out_accuracy(record) >= floor else 0.0


def _trains_where_other_does_not(study: Study, batch_size: int, floor: float):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        rows, best_p, best_q = [], 1.0, 1.0
        for lr in sorted(study.lrs):
            bn = [_trained(r, floor) for r in runs.of("bn", batch_size, lr=lr)]
            plain = [_trained(r, floor) for r in runs.of("plain", batch_size, lr=lr)]
            p, q = p_smaller(plain, bn), p_smaller(bn, plain)
            best_p, best_q = min(best_p, p), min(best_q, q)
            rows.append(f"lr {lr:g}: bn {int(sum(bn))}/{len(bn)}, plain {int(sum(plain))}/{len(plain)}")
        evidence = "seeds trained " + "; ".join(rows) + f"; best p={best_p:.3f}"
        return ClaimResult(claim.name, claim.statement,
                           _rule("bn trained and plain not, at the learning rate where that is clearest", claim.alpha),
                           evidence, decide(best_p, best_q, claim.alpha), best_p)

    return judge


def highest_trained_lr(records: list[RunRecord], floor: float) -> float:
    """The highest learning rate among `records` (one seed's runs over the grid) that trained; 0 if none did."""
    return max((r.spec.lr for r in records if _trained(r, floor)), default=0.0)


def _highest_lr_ratio(study: Study, batch_size: int, floor: float, factor: float):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        def per_seed(variant):
            by_seed: dict[int, list[RunRecord]] = {}
            for record in runs.of(variant, batch_size):
                by_seed.setdefault(record.spec.seed, []).append(record)
            return [highest_trained_lr(records, floor) for _, records in sorted(by_seed.items())]

        bn, plain = per_seed("bn"), per_seed("plain")
        # "At least factor x": plain's times the factor, a hair less so a grid step of exactly the factor counts.
        scaled = [factor * value * (1 - 1e-9) for value in plain]
        p, q = p_smaller(scaled, bn), p_smaller(bn, scaled)
        evidence = (f"highest learning rate that trains, per seed: bn {_lrs(bn)} vs plain {_lrs(plain)}; p={p:.3f}")
        return _result(claim, f"plain's times {factor:g} below bn's", evidence, p, q)

    return judge


def _lrs(values: list[float]) -> str:
    return "[" + ", ".join("none" if value == 0 else f"{value:g}" for value in values) + "]"


def _best_over_lrs(study: Study, batch_size: int, margin: float):
    """BN at its best learning rate against plain at its best (by mean held-out accuracy), non-inferiority."""
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        def best(variant):
            by_lr = {lr: [held_out_accuracy(r) for r in runs.of(variant, batch_size, lr=lr)] for lr in study.lrs}
            lr = max(study.lrs, key=lambda value: statistics.mean(by_lr[value]))
            return lr, by_lr[lr]

        (bn_at, bn), (plain_at, plain) = best("bn"), best("plain")
        p, q = p_smaller(plain, [v + margin for v in bn]), p_smaller([v + margin for v in bn], plain)
        evidence = (f"held-out accuracy % bn {summary(bn, 2)} at lr {bn_at:g} vs plain {summary(plain, 2)} "
                    f"at lr {plain_at:g}; p={p:.3f}")
        return _result(claim, f"plain below bn + {margin} points", evidence, p, q)

    return judge


# --- the initialization study ---


def init_study_claims(spec: StudySpec, study: Study) -> list[Claim]:
    settings = spec.claims
    if not {"bn", "plain"} <= set(study.variants) or len(study.init_scales) < 2:
        return []
    claims = []
    scales = sorted(study.init_scales)
    for batch_size in sorted(study.batch_sizes):
        common = dict(batch_size=batch_size, study=study.name, reason="init",
                      needs=_needs(spec, study, ("bn", "plain"), batch_size), alpha=settings.alpha)
        at = f"At batch size {batch_size}"
        claims.append(Claim(
            "bn-less-sensitive-to-init-scale",
            statement=f"{at}, BN's held-out accuracy varies less across the init scales "
            f"({', '.join(f'{k:g}' for k in scales)}) than plain's (range over the scales, seed by seed).",
            short="BN's held-out accuracy varied less across init scales", judge=_less_sensitive(scales, batch_size),
            **common))
        for end, which in ((scales[0], "smallest"), (scales[-1], "largest")):
            claims.append(Claim(
                f"bn-accuracy-at-least-plain-at-{which}-init", statement=f"{at} and init scale {end:g}, BN's "
                "held-out accuracy is at least plain's.", short=f"at init scale {end:g} BN's accuracy was at least "
                "plain's", judge=_at_least(held_out_accuracy, "held-out accuracy %", settings.accuracy_margin,
                                           bn="bn", plain="plain", batch_size=batch_size, at={"init_scale": end}),
                **common))
    return claims


def _less_sensitive(scales: list[float], batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        def ranges(variant):
            by_seed: dict[int, list[float]] = {}
            for record in runs.of(variant, batch_size):
                by_seed.setdefault(record.spec.seed, []).append(held_out_accuracy(record))
            return [max(values) - min(values) for _, values in sorted(by_seed.items())]

        def range_of_means(variant):
            means = [statistics.mean(held_out_accuracy(r) for r in runs.of(variant, batch_size, init_scale=k))
                     for k in scales]
            return max(means) - min(means)

        bn, plain = ranges("bn"), ranges("plain")
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        evidence = (f"range of the per-scale mean held-out accuracy: bn {range_of_means('bn'):.2f} vs plain "
                    f"{range_of_means('plain'):.2f} points; per seed bn {summary(bn, 2)} vs plain "
                    f"{summary(plain, 2)}; p={p:.3f}")
        return _result(claim, "bn's range smaller", evidence, p, q)

    return judge


# --- the regularization (dropout) study ---


def dropout_study_claims(spec: StudySpec, study: Study) -> list[Claim]:
    settings = spec.claims
    claims = []
    for batch_size in sorted(study.batch_sizes):
        common = dict(batch_size=batch_size, study=study.name, reason="regularizer", alpha=settings.alpha)
        if {"bn", "plain"} <= set(study.variants):
            claims.append(Claim(
                "bn-smaller-generalization-gap", statement=f"At batch size {batch_size}, BN's generalization gap (the "
                "final model's training accuracy minus its held-out accuracy) is smaller than plain's.",
                short="BN's generalization gap was smaller than plain's",
                needs=_needs(spec, study, ("bn", "plain"), batch_size), judge=_smaller_gap(batch_size), **common))
        if {"bn", "plain", "bn-dropout", "plain-dropout"} <= set(study.variants):
            claims.append(Claim(
                "dropout-gains-bn-less-than-plain", statement=f"At batch size {batch_size}, adding dropout gains BN "
                "less held-out accuracy than it gains plain (seed by seed: with dropout minus without).",
                short="dropout gained BN less held-out accuracy than plain",
                needs=_needs(spec, study, ("bn", "plain", "bn-dropout", "plain-dropout"), batch_size),
                judge=_dropout_gains_less(batch_size), **common))
    return claims


def activation_drift(record: RunRecord) -> float:
    """The drift of the last hidden layer's input percentiles (ActivationTrace.drift); infinite if diverged
    (worst), NaN if not probed."""
    if record.diverged:
        return math.inf
    return math.nan if record.activations is None else record.activations.drift()


def _steadier_activations(batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        bn = [activation_drift(r) for r in runs.of("bn", batch_size)]
        plain = [activation_drift(r) for r in runs.of("plain", batch_size)]
        if any(math.isnan(value) for value in bn + plain):
            return _not_recorded(claim, "the activation probe", why="records of schema 2 or earlier, or the "
                                 "original pipeline, are not probed")
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        return _result(claim, "bn smaller", f"drift (mean move between checkpoints / spread) bn {summary(bn, 3)} vs "
                       f"plain {summary(plain, 3)}; p={p:.3f}", p, q)

    return judge


def batch_statistics_accuracy(record: RunRecord) -> float:
    """Final held-out accuracy with each held-out batch's own statistics; 0 if diverged, NaN if not recorded."""
    if record.diverged:
        return 0.0
    value = record.epochs[-1].batch_statistics_accuracy if record.epochs else None
    return math.nan if value is None else value


def _running_at_least_batch(batch_size: int, margin: float):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        bn = runs.of("bn", batch_size)
        running, batch = [held_out_accuracy(r) for r in bn], [batch_statistics_accuracy(r) for r in bn]
        if any(math.isnan(value) for value in batch):
            return _not_recorded(claim, "the accuracy with batch statistics", why="records of schema 3 or earlier")
        p, q = p_smaller(batch, [v + margin for v in running]), p_smaller([v + margin for v in running], batch)
        evidence = (f"final held-out accuracy % with running estimates {summary(running, 2)} vs with batch statistics "
                    f"{summary(batch, 2)}; p={p:.3f}")
        return _result(claim, f"batch statistics below running estimates + {margin} points", evidence, p, q)

    return judge


def generalization_gap(record: RunRecord) -> float:
    """The final model's training accuracy minus its held-out accuracy, in points; infinite if diverged (worst)."""
    return math.inf if record.diverged else train_accuracy(record) - held_out_accuracy(record)


def _smaller_gap(batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        bn = [generalization_gap(r) for r in runs.of("bn", batch_size)]
        plain = [generalization_gap(r) for r in runs.of("plain", batch_size)]
        if any(math.isnan(value) for value in bn + plain):
            return _not_recorded(claim, "the final model's training accuracy")
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        return _result(claim, "bn smaller", f"gap (points) bn {summary(bn, 2)} vs plain {summary(plain, 2)}; "
                       f"p={p:.3f}", p, q)

    return judge


def _dropout_gains_less(batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        def gains(variant):
            return [held_out_accuracy(with_dropout) - held_out_accuracy(without)
                    for with_dropout, without in zip(runs.of(f"{variant}-dropout", batch_size),
                                                     runs.of(variant, batch_size), strict=True)]

        bn, plain = gains("bn"), gains("plain")
        p, q = p_smaller(bn, plain), p_smaller(plain, bn)
        evidence = (f"held-out accuracy gained by dropout (points) bn {summary(bn, 2)} vs plain "
                    f"{summary(plain, 2)}; p={p:.3f}")
        return _result(claim, "bn's gain smaller", evidence, p, q)

    return judge


# --- the ghost-batch study: how BN depends on the images its statistics see (Wu & He 2018, Fig. 1) ---


def ghost_sizes(study: Study, batch_size: int) -> dict[int, str]:
    """The study's BN variants by the number of images their statistics see: {ghost size: variant}; plain `bn`
    sees the whole batch."""
    sizes = {ghost_size(variant): variant for variant in study.variants if ghost_size(variant) is not None}
    if "bn" in study.variants:
        sizes[batch_size] = "bn"
    return dict(sorted(sizes.items()))


class AgainstLayerNorm(NamedTuple):
    """BN at one ghost size against LayerNorm, on held-out accuracy."""

    ghost: int
    verdict: str  # "behind" (BN below LN at p <= alpha), "ahead" (above at q <= alpha) or "not shown"
    p: float  # that BN is below LayerNorm
    q: float  # that BN is above it

    @property
    def p_of_verdict(self) -> float:
        """The p-value of the verdict's direction; that of "behind" when neither is shown."""
        return self.q if self.verdict == "ahead" else self.p


def against_layernorm(runs: Runs, sizes: dict[int, str], batch_size: int, alpha: float) -> list[AgainstLayerNorm]:
    """BN at each ghost size of `sizes` against LayerNorm, smallest ghost size first."""
    ln = [held_out_accuracy(r) for r in runs.of("ln", batch_size)]
    rows = []
    for g, variant in sizes.items():
        bn = [held_out_accuracy(r) for r in runs.of(variant, batch_size)]
        p, q = p_smaller(bn, ln), p_smaller(ln, bn)
        rows.append(AgainstLayerNorm(g, "behind" if p <= alpha else "ahead" if q <= alpha else "not shown", p, q))
    return rows


def where_bn_falls_behind(rows: list[AgainstLayerNorm]) -> str:
    """The ghost size below which BN falls behind LayerNorm (the smallest from which on it is never behind), said."""
    behind = [row.ghost for row in rows if row.verdict == "behind"]
    below = next((row.ghost for row in rows if row.ghost > max(behind, default=0)), None)
    if below is None:
        return "BN is behind LayerNorm at every ghost size measured"
    if not behind:
        return "BN is not behind LayerNorm at any ghost size measured"
    return f"BN falls behind LayerNorm below ghost size {below}"


def ghost_study_claims(spec: StudySpec, study: Study) -> list[Claim]:
    settings = spec.claims
    claims = []
    for batch_size in sorted(study.batch_sizes):
        sizes = ghost_sizes(study, batch_size)
        ghosts = [g for g in sizes if g < batch_size]
        common = dict(batch_size=batch_size, study=study.name, reason="batch", alpha=settings.alpha)
        at = f"In batches of {batch_size}, "
        if len(ghosts) >= 2:
            small, large = ghosts[0], ghosts[-1]
            claims.append(Claim(
                "bn-accuracy-falls-at-small-ghost-batches",
                statement=at + f"BN's held-out accuracy with statistics over ghost batches of {small} images is below "
                f"its accuracy with ghost batches of {large} (Wu & He 2018, Fig. 1: BN's error rises as the images "
                "per device fall).", short=f"BN with ghost batches of {small} was less accurate than with {large}",
                needs=_needs(spec, study, (sizes[small], sizes[large]), batch_size),
                judge=_ghost_falls(sizes[small], sizes[large], batch_size), **common))
        if ghosts and "ln" in study.variants:
            claims.append(Claim(
                "bn-behind-layernorm-at-smallest-ghost-batch",
                statement=at + f"BN with statistics over ghost batches of {ghosts[0]} images has a lower held-out "
                "accuracy than LayerNorm, whose statistics do not involve the batch (Wu & He 2018, Fig. 1: GN stays "
                "flat where BN falls); the evidence names the ghost size below which BN falls behind.",
                short=f"BN with ghost batches of {ghosts[0]} fell behind LayerNorm",
                needs=_needs(spec, study, (*sizes.values(), "ln"), batch_size),
                judge=_behind_layernorm(sizes, batch_size), **common))
    return claims


def _ghost_falls(small: str, large: str, batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        a = [held_out_accuracy(r) for r in runs.of(small, batch_size)]
        b = [held_out_accuracy(r) for r in runs.of(large, batch_size)]
        p, q = p_smaller(a, b), p_smaller(b, a)
        evidence = f"held-out accuracy % {small} {summary(a, 2)} vs {large} {summary(b, 2)}; p={p:.3f}"
        return _result(claim, f"{small} lower", evidence, p, q)

    return judge


def _behind_layernorm(sizes: dict[int, str], batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        rows = against_layernorm(runs, sizes, batch_size, claim.alpha)
        ln = [held_out_accuracy(r) for r in runs.of("ln", batch_size)]
        per_size = "; ".join(
            f"g={row.ghost} {summary([held_out_accuracy(r) for r in runs.of(sizes[row.ghost], batch_size)], 2)} "
            f"{row.verdict} (p={row.p_of_verdict:.3f})" for row in rows)
        evidence = f"held-out accuracy % LayerNorm {summary(ln, 2)}; BN {per_size}; {where_bn_falls_behind(rows)}"
        return _result(claim, f"BN at ghost size {rows[0].ghost} below LayerNorm", evidence, rows[0].p, rows[0].q)

    return judge


STUDY_CLAIMS = {"batch": batch_study_claims, "lr": lr_study_claims, "init": init_study_claims,
                "dropout": dropout_study_claims, "ghost": ghost_study_claims}


def study_claims(spec: StudySpec) -> list[Claim]:
    """Every claim the studies of `spec` can check, judged with its claim settings."""
    return [claim for study in spec.studies for claim in STUDY_CLAIMS[study.name](spec, study)]


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
