"""The noisy-BN study (Santurkar et al. 2018, section 2.1): is a steadier distribution of each layer's inputs
what makes BN work?

`bn-noisy` is BN with noise added after each BN layer in training, per unit of a mean and scale drawn fresh at
every step and per image on top (bnsuite.batchnorm.NoisyBatchNorm1d says the values and why), so the inputs to
every ReLU move from step to step far more than without BN. If BN helped by keeping those inputs steady, noisy BN
would lose what BN gains over plain; Santurkar et al. found it trains about as well as BN. At batch 64, the batch
study's, with the same epochs, so plain's and bn's runs are the batch study's (trained once).
"""

from __future__ import annotations

import pandas as pd

from bnsuite.core import plots
from bnsuite.core.claims import Claim, activation_drift, at_least, needs, smaller
from bnsuite.core.registry import SectionContext, register_study
from bnsuite.core.report_parts import claims_block, colors, opening, variant_order, variant_rows, write_figure
from bnsuite.core.spec import CONTRADICTED, NOT_SHOWN, UNSETTLED, KnownException, Study, StudySpec

NAME = "noise"
PLAIN, BN, NOISY = "plain", "bn", "bn-noisy"
MATRICES = {profile: Study(NAME, variants=(PLAIN, BN, NOISY), batch_sizes=(64,), epochs=epochs)
            for profile, epochs in (("full", 10), ("quick", 4), ("smoke", 2))}
DRIFT = "drift (mean move between checkpoints / spread)"
NO_PROBE = ("the activation probe", "records of schema 2 or earlier, or a network without a probe point")
KNOWN_EXCEPTIONS = {
    "full": (KnownException("bn-noisy-accuracy-within-margin-of-bn-bs64", UNSETTLED,
                            "noisy BN's mean test accuracy is BN's within seed noise, at the 0.1-point margin: "
                            "not shown on an Intel Xeon (98.22% against 98.22%, seeds 0-6), supported on an AMD "
                            "EPYC Zen 4 (98.21% against 98.19%, the same seeds, p = 0.017), whose rounding "
                            "trains other bits"),),
    "quick": (
        KnownException("bn-noisy-accuracy-within-margin-of-bn-bs64", NOT_SHOWN,
                       "after 4 epochs on 20,000 images noisy BN is about 0.3 points behind BN (96.67% against "
                       "96.98%), within seed noise but past the 0.1-point margin"),
        KnownException("bn-noisy-larger-drift-than-plain-bs64", UNSETTLED,
                       "over 4 epochs on 20,000 images noisy BN's inputs drift more than plain's by about the seed "
                       "spread: supported on an Intel Xeon (0.202 against 0.167, p = 0.048), not shown on an AMD "
                       "EPYC Zen 4 (0.202 against 0.171, p = 0.11), 5 seeds"),
    ),
    "smoke": (
        KnownException("bn-noisy-accuracy-within-margin-of-bn-bs64", CONTRADICTED,
                       "after 2 epochs on 4,000 images the noise costs BN about half a point (93.0% against 93.6%)"),
        KnownException("bn-noisy-larger-drift-than-plain-bs64", CONTRADICTED,
                       "in its first 2 epochs on 4,000 images plain's inputs move fast as it starts to learn (drift "
                       "about 1.0 against noisy BN's 0.19); over the full study's 10 epochs noisy BN's is the larger"),
    ),
}


def noise_claims(spec: StudySpec, study: Study) -> list[Claim]:
    if not {PLAIN, BN, NOISY} <= set(study.variants):
        return []
    settings, margin = spec.claims, spec.claims.accuracy_margin
    claims = []
    for batch_size in sorted(study.batch_sizes):
        at = f"At batch size {batch_size}, "

        def common(*variants, batch_size=batch_size):
            return dict(batch_size=batch_size, study=study.name, reason="distribution", alpha=settings.alpha,
                        variant=NOISY, needs=needs(spec, study, variants, batch_size))

        claims += [
            Claim("bn-noisy-accuracy-at-least-plain", statement=at + "BN with unstable noise after each BN layer "
                  "(noisy BN) reaches a test accuracy at least plain's (Santurkar et al. 2018, Fig. 2).",
                  short=f"noisy BN's test accuracy was at least plain's (within {margin} points)",
                  judge=at_least(lambda r: r.test_accuracy, "test accuracy %", margin, variant=NOISY,
                                 reference=PLAIN, batch_size=batch_size), **common(NOISY, PLAIN)),
            Claim("bn-noisy-accuracy-within-margin-of-bn", statement=at + f"noisy BN's test accuracy is within "
                  f"{margin} points of BN's or above it: the noise costs BN none of what it gains.",
                  short=f"noisy BN's test accuracy was within {margin} points of BN's",
                  judge=at_least(lambda r: r.test_accuracy, "test accuracy %", margin, variant=NOISY, reference=BN,
                                 batch_size=batch_size), **common(NOISY, BN)),
            Claim("bn-noisy-larger-drift-than-bn", statement=at + "the percentiles of the last hidden layer's inputs "
                  "to its ReLU move more over training, relative to their spread, with noisy BN than with BN: the "
                  "noise does make the distribution unstable.", short="noisy BN's hidden-layer input distribution "
                  "drifted more than BN's", judge=smaller(activation_drift, DRIFT, digits=3, direction="bn smaller",
                                                          variant=BN, reference=NOISY, batch_size=batch_size,
                                                          missing=NO_PROBE), **common(NOISY, BN)),
            Claim("bn-noisy-larger-drift-than-plain", statement=at + "the same percentiles move more with noisy BN "
                  "than without BN at all: noisy BN's layer inputs are less steady than plain's.",
                  short="noisy BN's hidden-layer input distribution drifted more than plain's",
                  judge=smaller(activation_drift, DRIFT, digits=3, direction="plain smaller", variant=PLAIN,
                                reference=NOISY, batch_size=batch_size, missing=NO_PROBE), **common(NOISY, PLAIN)),
        ]
    return claims


def noise_section(context: SectionContext) -> list[str]:
    study, records = context.study, context.records
    lines = opening(
        context, "Noisy BN: is it steadier distributions? (Santurkar et al. 2018)",
        f"Batch size {', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs. `bn-noisy` adds, in "
        "training only, y = s * bn(x) + m + e after each BN layer: per unit a scale s and a shift m drawn fresh "
        "at every step, per image e (bnsuite.batchnorm.NoisyBatchNorm1d; the values, and why, in "
        "docs/studies.md). Drift is the batch study's measure on each network's probe point (the input to the "
        "last hidden ReLU, noise included).")
    if not records:
        return lines
    lines += [variant_rows(records, drift=DRIFT), ""]
    if context.with_plots:
        order = variant_order(records)
        frame = pd.DataFrame([{"variant": r.spec.variant, "test_accuracy": r.test_accuracy,
                               "drift": activation_drift(r)} for r in records if r.activations is not None])
        if not frame.empty:
            lines += write_figure(context.out, f"{context.prefix}noisy_bn.png", "Test accuracy and drift of the last "
                                  "hidden layer's inputs: plain, BN and noisy BN",
                                  plots.bars_plot(frame, sorted(set(frame["variant"]), key=order), colors(records),
                                                  (("test_accuracy", "final test accuracy (%)"),
                                                   ("drift", "drift of the last ReLU's input")),
                                                  "Noisy BN (bars: mean over seeds; points: seeds)"))
    return lines + claims_block(context, "noisy BN")


register_study(NAME, title="noisy-BN study", matrices=MATRICES, section=noise_section, default=False,
               known_exceptions=KNOWN_EXCEPTIONS, options={"batch-sizes", "epochs", "lr"})(noise_claims)
