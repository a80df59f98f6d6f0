"""The Batch Renormalization study (Ioffe 2017): at small ghost batches, does correcting each ghost batch's
statistics toward the running estimates recover what BN loses?

At batch 128, as the ghost-batch study, BN with statistics over ghost batches of 2, 4 and 8 images
(`bn-ghostG`, the ghost study's runs, trained once) against Batch Renormalization over the same ghost batches
(`bn-renormG`: bnsuite.batchnorm.BatchRenorm1d, whose r_max, d_max and warm-up docs/studies.md states). Batch
Renorm was made for exactly this: small or non-i.i.d. minibatches, where the training-time statistics and the
inference-time running estimates part.
"""

from __future__ import annotations

import pandas as pd

from bnsuite.core import plots
from bnsuite.core.claims import Claim, Runs, batch_statistics_accuracy, held_out_accuracy, needs, smaller, summary
from bnsuite.core.registry import SectionContext, register_study
from bnsuite.core.report_parts import claims_block, colors, opening, write_figure
from bnsuite.core.spec import NOT_SHOWN, KnownException, Study, StudySpec

NAME = "renorm"
GHOSTS = (2, 4, 8)
BATCH = 128  # the ghost study's batch, so its bn-ghostG runs are shared
MATRICES = {profile: Study(NAME, variants=tuple(f"{kind}{g}" for kind in ("bn-ghost", "bn-renorm") for g in GHOSTS),
                           batch_sizes=(BATCH,), epochs=epochs)
            for profile, epochs in (("full", 10), ("quick", 4), ("smoke", 2))}
KNOWN_EXCEPTIONS = {
    "smoke": (KnownException("bn-renorm-more-accurate-at-smallest-ghost-batch-bs128", NOT_SHOWN,
                             "2 epochs on 4,000 images at batch 128 are 64 steps: Batch Renorm is plain ghost-batch BN "
                             "for the first 50 (its warm-up) and its bounds barely open after, so the two are within "
                             "seed noise"),),
}


def pairs(spec: StudySpec, study: Study) -> dict[int, tuple[str, str]]:
    """{ghost size: (ghost-batch BN variant, Batch Renorm variant)} for the sizes where the study has both, from the
    variants' descriptions (a renorm variant derives from the ghost-batch variant of its size)."""
    found = {}
    for name in study.variants:
        variant = spec.variant(name, study.networks[0])
        if variant.derives_from in study.variants and variant.images_per_statistic is not None \
                and spec.variant(variant.derives_from, study.networks[0]).images_per_statistic \
                == variant.images_per_statistic:
            found[variant.images_per_statistic] = (variant.derives_from, name)
    return dict(sorted(found.items()))


def renorm_claims(spec: StudySpec, study: Study) -> list[Claim]:
    found = pairs(spec, study)
    if not found:
        return []
    ghost, (bn, renorm) = next(iter(found.items()))
    claims = []
    for batch_size in sorted(study.batch_sizes):
        claims.append(Claim(
            "bn-renorm-more-accurate-at-smallest-ghost-batch", batch_size=batch_size, study=study.name,
            reason="batch", alpha=spec.claims.alpha, variant=renorm,
            needs=needs(spec, study, (bn, renorm), batch_size),
            statement=f"In batches of {batch_size}, with statistics over ghost batches of {ghost} images, Batch "
            "Renormalization reaches a higher held-out accuracy than BN (Ioffe 2017: it removes the dependence of "
            "each example's output on the rest of its small minibatch).",
            short=f"Batch Renorm was more accurate than BN with ghost batches of {ghost}",
            judge=smaller(held_out_accuracy, "held-out accuracy (points):", digits=2, direction=f"{bn} lower",
                          variant=bn, reference=renorm, batch_size=batch_size, ratio=False)))
    return claims


def renorm_section(context: SectionContext) -> list[str]:
    spec, study, records = context.spec, context.study, context.records
    lines = opening(
        context, "Batch Renormalization at small ghost batches (Ioffe 2017)",
        f"Batches of {', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs. `bn-ghostG` normalizes "
        "each ghost batch of G images by its own statistics; `bn-renormG` corrects them toward the running "
        "estimates by r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mean_B - mean) / sigma, -d_max, "
        "d_max), held constant in backprop, after a warm-up as plain BN (bnsuite.batchnorm.BatchRenorm1d; the "
        "values in docs/studies.md). Both use their running estimates at inference.")
    if not records:
        return lines
    runs = Runs({record.spec: record for record in records})
    found = pairs(spec, study)
    for batch_size in study.batch_sizes:
        rows, frame = [], []
        for ghost, (bn, renorm) in found.items():
            row = {"images per statistic": ghost}
            for label, variant in (("BN", bn), ("Batch Renorm", renorm)):
                mine = runs.of(variant, batch_size)
                row[f"{label} held-out acc % (running estimates)"] = summary([held_out_accuracy(r) for r in mine], 2)
                row[f"{label} held-out acc % (batch statistics)"] = summary(
                    [v for v in map(batch_statistics_accuracy, mine) if v == v], 2)
                frame += [{"family": label, "variant": variant, "ghost": ghost,
                           "held_out_accuracy": held_out_accuracy(r)} for r in mine]
            rows.append(row)
        lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
        if context.with_plots and frame:
            name = f"{context.prefix}batch_renorm{'' if len(study.batch_sizes) == 1 else f'_bs{batch_size}'}.png"
            lines += write_figure(context.out, name, "Held-out accuracy against the ghost batch size: BN and Batch "
                                  "Renorm", plots.by_ghost_size_plot(pd.DataFrame(frame), batch_size,
                                                                     colors(records), "BN and Batch Renorm against "
                                                                     "the images a statistic sees"))
    return lines + claims_block(context, "Batch Renormalization")


register_study(NAME, title="Batch Renorm study", matrices=MATRICES, section=renorm_section, default=False,
               known_exceptions=KNOWN_EXCEPTIONS, options={"epochs", "lr"})(renorm_claims)
