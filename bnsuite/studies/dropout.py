"""The regularization study: does BN reduce the need for dropout? Plain and BN at batch 64, each with and
without dropout after every hidden ReLU, and their generalization gaps.
"""

from __future__ import annotations

import math

import pandas as pd

from bnsuite.core import plots
from bnsuite.core.claims import (
    Claim,
    ClaimResult,
    Runs,
    compare,
    generalization_gap,
    held_out_accuracy,
    needs,
    not_recorded,
    result,
    summary,
)
from bnsuite.core.registry import ANY_NETWORK, SectionContext, register_study
from bnsuite.core.report_parts import (
    claims_block,
    colors,
    opening,
    runs_table,
    variant_order,
    variants_of,
    write_figure,
)
from bnsuite.core.spec import CONTRADICTED, NOT_SHOWN, UNSETTLED, KnownException, Study, StudySpec

NAME = "dropout"
PLAIN, BN = "plain", "bn"
WITH_DROPOUT = {PLAIN: "plain-dropout", BN: "bn-dropout"}  # each network and the same with dropout
# The same epochs as the batch study's, so plain and bn at batch 64 are the same runs in both.
MATRICES = {profile: Study(NAME, variants=(PLAIN, BN, *WITH_DROPOUT.values()), batch_sizes=(64,), epochs=epochs)
            for profile, epochs in (("full", 10), ("quick", 4), ("smoke", 2))}
KNOWN_EXCEPTIONS = {
    "full": (
        KnownException("bn-smaller-generalization-gap-bs64", CONTRADICTED,
                       "BN's final model fits its training images almost perfectly, so its gap to held-out accuracy "
                       "is the larger (1.68 against 1.31 points, 7 seeds), though its held-out accuracy is also the "
                       "higher"),
        KnownException("dropout-gains-bn-less-than-plain-bs64", NOT_SHOWN,
                       "dropout changes either variant's accuracy by less than plain's seed spread in 10 epochs "
                       "(+0.09 and +0.18 points, 7 seeds)"),
    ),
    "quick": (
        KnownException("bn-smaller-generalization-gap-bs64", CONTRADICTED,
                       "BN's final model fits its 20,000 training images almost perfectly, so its gap to held-out "
                       "accuracy is the larger"),
        KnownException("dropout-gains-bn-less-than-plain-bs64", UNSETTLED,
                       "dropout's gain differs between the variants by about the seed spread in 4 epochs: of three "
                       "disjoint sets of 5 seeds (0-4, 5-9, 10-14), measured on an AMD EPYC, 0-4 support it "
                       "(p = 0.020) and the others do not show it (p = 0.58, 0.11); of five sets of 3, none does"),
    ),
    "smoke": (
        KnownException("bn-smaller-generalization-gap-bs64", CONTRADICTED,
                       "after 2 epochs on 4,000 images BN already fits its training images closely while plain still "
                       "underfits them, so BN's gap is the larger"),
        KnownException("dropout-gains-bn-less-than-plain-bs64", NOT_SHOWN,
                       "after 2 epochs dropout costs both variants accuracy, by amounts within plain's seed spread"),
    ),
}


def dropout_study_claims(spec: StudySpec, study: Study) -> list[Claim]:
    settings = spec.claims
    claims = []
    for batch_size in sorted(study.batch_sizes):
        common = dict(batch_size=batch_size, study=study.name, reason="regularizer", alpha=settings.alpha)
        if {BN, PLAIN} <= set(study.variants):
            claims.append(Claim(
                "bn-smaller-generalization-gap", statement=f"At batch size {batch_size}, BN's generalization gap (the "
                "final model's training accuracy minus its held-out accuracy) is smaller than plain's.",
                short="BN's generalization gap was smaller than plain's",
                needs=needs(spec, study, ("bn", "plain"), batch_size), judge=_smaller_gap(batch_size), **common))
        if {BN, PLAIN, *WITH_DROPOUT.values()} <= set(study.variants):
            claims.append(Claim(
                "dropout-gains-bn-less-than-plain", statement=f"At batch size {batch_size}, adding dropout gains BN "
                "less held-out accuracy than it gains plain (seed by seed: with dropout minus without).",
                short="dropout gained BN less held-out accuracy than plain",
                needs=needs(spec, study, (BN, PLAIN, WITH_DROPOUT[BN], WITH_DROPOUT[PLAIN]), batch_size),
                judge=_dropout_gains_less(batch_size), **common))
    return claims


def _smaller_gap(batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        bn = [generalization_gap(r) for r in runs.of("bn", batch_size)]
        plain = [generalization_gap(r) for r in runs.of("plain", batch_size)]
        if any(math.isnan(value) for value in bn + plain):
            return not_recorded(claim, "the final model's training accuracy")
        comparison = compare(bn, plain, what="plain - bn generalization gap (points)")
        return result(claim, "bn smaller", f"gap (points) bn {summary(bn, 2)} vs plain {summary(plain, 2)}; "
                       f"p={comparison.p:.3f}", comparison)

    return judge


def _dropout_gains_less(batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        def gains(variant):
            return [held_out_accuracy(with_dropout) - held_out_accuracy(without)
                    for with_dropout, without in zip(runs.of(WITH_DROPOUT[variant], batch_size),
                                                     runs.of(variant, batch_size), strict=True)]

        bn, plain = gains("bn"), gains("plain")
        comparison = compare(bn, plain, what="plain - bn held-out accuracy gained by dropout (points)")
        evidence = (f"held-out accuracy gained by dropout (points) bn {summary(bn, 2)} vs plain "
                    f"{summary(plain, 2)}; p={comparison.p:.3f}")
        return result(claim, "bn's gain smaller", evidence, comparison)

    return judge


# --- the report section ---


def dropout_section(context: SectionContext) -> list[str]:
    study, records, out, prefix, with_plots = (
        context.study, context.records, context.out, context.prefix, context.with_plots)
    lines = opening(
        context, "Regularization: does BN reduce the need for dropout?",
        f"Dropout after each hidden ReLU in the `-dropout` variants; batch size "
        f"{', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs. Training accuracy is the final "
        "model's, on its own training images in eval mode; the gap is that minus the held-out accuracy.")
    if not records:
        return lines
    table = runs_table(records)
    order, described = variant_order(records), variants_of(records)
    # A variant that derives from another of the study (bn-dropout from bn) is shown with what dropout gained it.
    bases = {name: variant.derives_from for name, variant in described.items() if variant.derives_from in described}
    rows = []
    for (batch_size, variant), runs in sorted(table.groupby(["batch_size", "variant"]),
                                              key=lambda item: (item[0][0], order(item[0][1]))):
        finished = runs[~runs["diverged"]]
        row = {"batch size": batch_size, "variant": variant,
               "train acc % (final model)": summary(list(finished["train_accuracy"]), 2),
               "held-out acc %": summary(list(finished["held_out_accuracy"]), 2),
               "gap (points)": summary(list(finished["gap"]), 2)}
        base = table[(table["batch_size"] == batch_size) & (table["variant"] == bases.get(variant))]
        if len(base):
            gains = [with_dropout - without for with_dropout, without in
                     zip(runs.sort_values("seed")["held_out_accuracy"], base.sort_values("seed")["held_out_accuracy"],
                         strict=False)]
            row["gain from dropout (points)"] = summary(gains, 2)
        rows.append(row)
    lines += [pd.DataFrame(rows).fillna("").to_markdown(index=False, disable_numparse=True), ""]
    if with_plots:
        lines += write_figure(out, f"{prefix}dropout.png", "Held-out accuracy and generalization gap, with and "
                              "without dropout", plots.dropout_plot(table, sorted(described, key=order),
                                                                    colors(records), set(bases)))
    return lines + claims_block(context, "regularization")


register_study(NAME, title="dropout study", matrices=MATRICES, section=dropout_section,
               known_exceptions=KNOWN_EXCEPTIONS, networks=("mlp", ANY_NETWORK))(dropout_study_claims)
