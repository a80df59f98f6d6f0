"""The learning-rate study: does BN allow higher learning rates? Plain and BN at batch 64 over a grid of
learning rates from the study's 0.01 up in steps of about 3x, past where plain stops training.

A run *trains* when it does not diverge and ends at the profile's trained
accuracy or more on the held-out set; a diverged run counts as accuracy 0.
"""

from __future__ import annotations

import dataclasses
import statistics

import pandas as pd

from bnsuite import plots
from bnsuite.claims import Claim, ClaimResult, Runs, compare, decide, held_out_accuracy, needs, result, rule, summary
from bnsuite.records import RunRecord
from bnsuite.registry import SectionContext, register_study
from bnsuite.report_parts import claims_table, colors, runs_table, write_figure
from bnsuite.spec import Study, StudySpec

NAME = "lr"
PLAIN, BN = "plain", "bn"
LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)  # the study's 0.01 up in steps of about 3x, past where plain stops training
# The verdicts are the same after 2 epochs as after 3: runs that diverge do so in their first epoch, and the others
# are already far above or below the trained-accuracy floor.
MATRICES = {
    "full": Study(NAME, variants=(PLAIN, BN), batch_sizes=(64,), epochs=2, lrs=LR_GRID),
    "quick": Study(NAME, variants=(PLAIN, BN), batch_sizes=(64,), epochs=2, lrs=LR_GRID),
    "smoke": Study(NAME, variants=(PLAIN, BN), batch_sizes=(64,), epochs=2, lrs=(0.01, 0.1, 1.0)),
}


def lr_study_claims(spec: StudySpec, study: Study) -> list[Claim]:
    settings = spec.claims
    if not {BN, PLAIN} <= set(study.variants) or len(study.lrs) < 2:
        return []
    claims = []
    floor = settings.trained_accuracy
    grid = ", ".join(f"{lr:g}" for lr in sorted(study.lrs))
    for batch_size in sorted(study.batch_sizes):
        common = dict(batch_size=batch_size, study=study.name, reason="lr",
                      needs=needs(spec, study, ("bn", "plain"), batch_size), alpha=settings.alpha)
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
        rows, comparisons = [], []
        for lr in sorted(study.lrs):
            bn = [_trained(r, floor) for r in runs.of("bn", batch_size, lr=lr)]
            plain = [_trained(r, floor) for r in runs.of("plain", batch_size, lr=lr)]
            comparisons.append(compare(plain, bn, what=f"bn - plain fraction of seeds trained at lr {lr:g}"))
            rows.append(f"lr {lr:g}: bn {int(sum(bn))}/{len(bn)}, plain {int(sum(plain))}/{len(plain)}")
        clearest = min(comparisons, key=lambda c: c.p)  # the learning rate where the claim shows best
        best_q = min(c.q for c in comparisons)
        evidence = "seeds trained " + "; ".join(rows) + f"; best p={clearest.p:.3f}"
        return ClaimResult(claim.name, claim.statement,
                           rule("bn trained and plain not, at the learning rate where that is clearest", claim.alpha),
                           evidence, decide(clearest.p, best_q, claim.alpha), clearest.p,
                           comparison=dataclasses.replace(clearest, q=best_q), alpha=claim.alpha)

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
        comparison = compare(scaled, bn, ratio=True,
                             what=f"bn / ({factor:g} x plain) highest learning rate that trains")
        evidence = (f"highest learning rate that trains, per seed: bn {_lrs(bn)} vs plain {_lrs(plain)}; "
                    f"p={comparison.p:.3f}")
        return result(claim, f"plain's times {factor:g} below bn's", evidence, comparison)

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
        comparison = compare(plain, bn, offset=margin, what="bn - plain held-out accuracy at each's best lr (points)")
        evidence = (f"held-out accuracy % bn {summary(bn, 2)} at lr {bn_at:g} vs plain {summary(plain, 2)} "
                    f"at lr {plain_at:g}; p={comparison.p:.3f}")
        return result(claim, f"plain below bn + {margin} points", evidence, comparison)

    return judge


# --- the report section ---


def lr_section(context: SectionContext) -> list[str]:
    spec, study, records, out, prefix, with_plots, h = (
        context.spec, context.study, context.records, context.out, context.prefix, context.with_plots, context.h)
    settings = spec.claims
    floor = settings.trained_accuracy
    lines = [f"{h} Learning rate: does BN allow higher learning rates?", "",
             f"Batch size {', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs, learning rates "
             f"{', '.join(f'{lr:g}' for lr in study.lrs)}, seeds {', '.join(map(str, spec.seeds))}. A run *trains* "
             f"when it does not diverge and ends at {floor}% {spec.held_out} accuracy or more; a diverged "
             "run counts as accuracy 0 and infinite loss.", ""]
    if not records:
        return lines + ["_No runs of this study yet._", ""]
    table = runs_table(records)
    rows = []
    for (batch_size, lr), at in table.groupby(["batch_size", "lr"]):
        row = {"batch size": batch_size, "learning rate": f"{lr:g}"}
        for variant in ("plain", "bn"):
            runs = at[at["variant"] == variant]
            finished = runs[~runs["diverged"]]
            row[f"{variant} held-out acc %"] = summary(list(finished["held_out_accuracy"]), 2)
            row[f"{variant} final train loss"] = summary(list(finished["final_train_loss"]), 4)
            row[f"{variant} trained"] = f"{int((finished['held_out_accuracy'] >= floor).sum())}/{len(runs)}"
            row[f"{variant} diverged"] = str(int(runs["diverged"].sum()))
        rows.append(row)
    lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    highest = []
    for variant in ("plain", "bn"):
        for batch_size in study.batch_sizes:
            per_seed = [highest_trained_lr([r for r in records if r.spec.variant == variant and r.spec.seed == seed
                                            and r.spec.batch_size == batch_size], floor) for seed in spec.seeds]
            highest.append(f"{variant} (batch {batch_size}) " + ", ".join(f"{v:g}" if v else "none" for v in per_seed))
    lines += ["Highest learning rate that trains, seed by seed: " + "; ".join(highest) + ".", ""]
    if with_plots:
        lines += write_figure(out, f"{prefix}learning_rate.png", "Held-out accuracy and training loss against the "
                              "learning rate", plots.learning_rate_plot(table, floor, colors(records)))
    return lines + [f"{h} Claims: learning rate", "", claims_table(context.own_claims, settings), ""]


register_study(NAME, title="learning-rate study", matrices=MATRICES, section=lr_section,
               options={"epochs"})(lr_study_claims)
