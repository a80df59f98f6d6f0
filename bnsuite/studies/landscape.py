"""The landscape study (Santurkar et al. 2018): does BN reduce internal covariate shift measured by gradients, and
does it make the loss landscape smoother?

Plain and BN at batch 64, the batch study's runs (trained once). The study asks its runs to measure the
landscape (`measures=("landscape",)`): at 20 checkpoints along training, the gradient-based covariate shift of fc2
and fc3 on a fixed batch and the loss landscape along the gradient on that step's batch (bnsuite.landscape says
how; the record keeps it, `landscape`). Only the runs of a study that asks measure it: it costs about 27 training
steps per model per checkpoint (on an AMD EPYC), which a 2-epoch sweep of many models would feel.
Santurkar et al. found BN's ICS similar or larger and its landscape smoother: the verdicts here are data.

The ICS claims judge a scale-free form, 1 - cos(G, G') (the angle G' turns from G): BN's weight gradients are
smaller than plain's, so the absolute ||G - G'|| of Definition 2.1 shrinks with them whatever the shift. The
absolute form stays in each claim's evidence and the section's table, beside ||G - G'|| / ||G||, which records of
schema 9 keep (the cosine is in every record that measured the landscape, so the claims judge it).
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from bnsuite.core import plots
from bnsuite.core.claims import Claim, needs, smaller, summary
from bnsuite.core.records import RunRecord
from bnsuite.core.registry import SectionContext, register_study
from bnsuite.core.report_parts import claims_block, colors, variant_order, write_figure
from bnsuite.core.spec import NOT_SHOWN, NOT_SUPPORTED, KnownException, Study, StudySpec

NAME = "landscape"
PLAIN, BN = "plain", "bn"
MATRICES = {profile: Study(NAME, variants=(PLAIN, BN), batch_sizes=(64,), epochs=epochs, measures=("landscape",))
            for profile, epochs in (("full", 10), ("quick", 4), ("smoke", 2))}
NOT_MEASURED = ("the landscape measurements", "records of schema 6 or earlier, or the original pipeline")
# (series, layer, claim kind, what, short)
MEASURES = (
    ("ics_turn", "fc2", "bn-smaller-gradient-ics-fc2", "fc2's gradient-based ICS, 1 - cos(G, G')",
     "BN's gradient-based covariate shift of fc2 (scale-free) was smaller"),
    ("ics_turn", "fc3", "bn-smaller-gradient-ics-fc3", "fc3's gradient-based ICS, 1 - cos(G, G')",
     "BN's gradient-based covariate shift of fc3 (scale-free) was smaller"),
    ("loss_variation", None, "bn-loss-varies-less-along-the-gradient", "loss variation along the gradient",
     "BN's loss varied less along the gradient"),
    ("gradient_predictiveness", None, "bn-gradient-more-predictive", "largest gradient change along the gradient",
     "BN's gradient was more predictive"),
    ("beta_smoothness", None, "bn-lower-effective-beta-smoothness", "effective beta-smoothness",
     "BN's effective beta-smoothness was lower"),
)
KNOWN_EXCEPTIONS = {
    "full": (KnownException("bn-lower-effective-beta-smoothness-bs64", NOT_SHOWN,
                            "over 10 epochs BN's effective beta-smoothness is about plain's (27.8 against 27.1, 7 "
                            "seeds), within seed noise, though its loss varies less and its gradient is more "
                            "predictive"),),
    "quick": (KnownException("bn-lower-effective-beta-smoothness-bs64", NOT_SUPPORTED,
                             "over 4 epochs on 20,000 images BN's effective beta-smoothness is above plain's, though "
                             "its loss varies less and its gradient changes less: less in all, but not less per unit "
                             "of distance moved along it. Within seed noise on an Intel Xeon with the fused step (30.1 "
                             "against 27.6, 5 seeds: not shown), past it on AMD EPYCs (Zen 3 with the ATen step, 29.2 "
                             "against 26.9; Zen 4 with the fused step, 28.1 against 26.4, p = 0.98: contradicted)"),),
    "smoke": (KnownException("bn-loss-varies-less-along-the-gradient-bs64", NOT_SHOWN,
                             "in 2 epochs on 4,000 images the loss varies about as much along the gradient with BN as "
                             "without (0.102 against 0.096 on an AMD EPYC), within seed noise"),),
}


def mean_of(series: str, layer: str | None):
    """A run's mean of `series` over its checkpoints after step 0; infinite (worst) if it diverged, NaN if it was not
    measured. `ics_turn` is 1 - the mean of `ics_cosine`: how far G' turns from G, blind to the gradients' scale."""
    def measure(record: RunRecord) -> float:
        if record.diverged:
            return math.inf
        if record.landscape is None:
            return math.nan
        if series == "ics_turn":
            return 1.0 - record.landscape.mean("ics_cosine", layer)
        return record.landscape.mean(series, layer)

    return measure


def with_absolute_ics(judge, layer: str, batch_size: int):
    """`judge`, its evidence followed by the absolute ||G - G'|| of both variants (Definition 2.1 as written), which
    the verdict does not rest on: it follows the gradients' scale."""
    absolute = mean_of("ics", layer)

    def judged(claim: Claim, runs):
        result = judge(claim, runs)
        values = {variant: [absolute(r) for r in runs.of(variant, batch_size)] for variant in (BN, PLAIN)}
        return dataclasses.replace(result, evidence=result.evidence + (
            f"; absolute ||G - G'|| (not judged) bn {summary(values[BN], 4, significant=True)} vs plain "
            f"{summary(values[PLAIN], 4, significant=True)}"))

    return judged


def landscape_claims(spec: StudySpec, study: Study) -> list[Claim]:
    if not {PLAIN, BN} <= set(study.variants):
        return []
    claims = []
    for batch_size in sorted(study.batch_sizes):
        at = f"At batch size {batch_size}, "
        for series, layer, kind, what, short in MEASURES:
            statement = at + f"BN's {what}, averaged over the checkpoints of training, is smaller than plain's"
            statement += (" (Santurkar et al. 2018, Definition 2.1 in a scale-free form they also report; they found "
                          "the shift similar or larger with BN)." if series == "ics_turn"
                          else " (Santurkar et al. 2018, Fig. 4).")
            judge = smaller(mean_of(series, layer), what, digits=4, direction="bn smaller", variant=BN,
                            reference=PLAIN, batch_size=batch_size, missing=NOT_MEASURED)
            if series == "ics_turn":
                judge = with_absolute_ics(judge, layer, batch_size)
            claims.append(Claim(
                kind, batch_size=batch_size, study=study.name, reason="landscape", alpha=spec.claims.alpha,
                variant=BN, needs=needs(spec, study, (PLAIN, BN), batch_size), statement=statement, short=short,
                judge=judge))
    return claims


def landscape_section(context: SectionContext) -> list[str]:
    study, records, h = context.study, context.records, context.h
    lines = [f"{h} Covariate shift by gradients, and the loss landscape (Santurkar et al. 2018)", "",
             f"Batch size {', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs, at 20 checkpoints along "
             "each run. ICS of a layer: ||G - G'||, G its weight's gradient on a fixed batch of 256 training images, "
             "G' the same after every layer before it took a gradient step of the run's learning rate; its "
             "scale-free forms ||G - G'|| / ||G|| and the cosine between G and G', on which the claims are judged "
             "(BN's gradients are smaller, and the absolute form shrinks with them). Along the gradient g, on the "
             "checkpoint's training batch, at distances of 0.25 to 4 "
             "learning rates: the range of the loss (loss variation), the largest change of the gradient (gradient "
             "predictiveness) and that change over the distance moved (effective beta-smoothness). Means over the "
             "checkpoints after step 0 (bnsuite.landscape).", ""]
    measured = [r for r in records if r.landscape is not None]
    if not measured:
        return lines + ["_No run of this study carries the landscape measurements._", ""]
    order = variant_order(measured)
    rows = []
    for variant in sorted({r.spec.variant for r in measured}, key=order):
        mine = [r for r in measured if r.spec.variant == variant]
        row = {"variant": variant}
        for layer in mine[0].landscape.ics_layers:
            row[f"ICS {layer}"] = summary([r.landscape.mean("ics", layer) for r in mine], 4, significant=True)
            row[f"ICS / ||G|| {layer}"] = summary([r.landscape.mean("ics_relative", layer) for r in mine], 4,
                                                  significant=True)  # n/a in records of schema 8 or earlier
            row[f"cos(G, G') {layer}"] = summary([r.landscape.mean("ics_cosine", layer) for r in mine], 4)
        for series, _, _, what, _ in MEASURES[2:]:
            row[what] = summary([r.landscape.mean(series) for r in mine], 4, significant=True)
        rows.append(row)
    lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    if context.with_plots:
        frame = pd.DataFrame([
            {"variant": r.spec.variant, "seed": r.spec.seed, "step": step, "loss_variation": lv,
             "gradient_predictiveness": gp, "beta_smoothness": beta, "ics": ics[-1]}
            for r in measured for step, lv, gp, beta, ics in zip(
                r.landscape.steps, r.landscape.loss_variation, r.landscape.gradient_predictiveness,
                r.landscape.beta_smoothness, r.landscape.ics, strict=True)])
        lines += write_figure(context.out, f"{context.prefix}landscape.png", "The loss landscape along the gradient "
                              "over training, plain and BN (bands: min to max over seeds)",
                              plots.landscape_plot(frame, sorted(set(frame["variant"]), key=order), colors(records),
                                                   measured[0].landscape.ics_layers[-1]))
    return lines + claims_block(context, "covariate shift and the loss landscape")


register_study(NAME, title="landscape study", matrices=MATRICES, section=landscape_section,
               known_exceptions=KNOWN_EXCEPTIONS, options={"batch-sizes", "epochs", "lr"})(landscape_claims)
