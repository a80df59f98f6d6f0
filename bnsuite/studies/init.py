"""The initialization study: is BN less sensitive to initialization? Plain and BN at batch 64 with every Linear
weight of PyTorch's default init multiplied by an init scale (biases and BN parameters unchanged).
"""

from __future__ import annotations

import statistics

import pandas as pd

from bnsuite.core import plots
from bnsuite.core.claims import Claim, ClaimResult, Runs, at_least, compare, held_out_accuracy, needs, result, summary
from bnsuite.core.registry import SectionContext, register_study
from bnsuite.core.report_parts import claims_block, colors, opening, runs_table, write_figure
from bnsuite.core.spec import Study, StudySpec

NAME = "init"
PLAIN, BN = "plain", "bn"
INIT_SCALES = (0.1, 0.3, 1.0, 3.0, 10.0)
MATRICES = {
    "full": Study(NAME, variants=(PLAIN, BN), batch_sizes=(64,), epochs=2, init_scales=INIT_SCALES),
    "quick": Study(NAME, variants=(PLAIN, BN), batch_sizes=(64,), epochs=2, init_scales=INIT_SCALES),
    "smoke": Study(NAME, variants=(PLAIN, BN), batch_sizes=(64,), epochs=2, init_scales=(0.1, 1.0, 10.0)),
}


def init_study_claims(spec: StudySpec, study: Study) -> list[Claim]:
    settings = spec.claims
    if not {BN, PLAIN} <= set(study.variants) or len(study.init_scales) < 2:
        return []
    claims = []
    scales = sorted(study.init_scales)
    for batch_size in sorted(study.batch_sizes):
        common = dict(batch_size=batch_size, study=study.name, reason="init",
                      needs=needs(spec, study, ("bn", "plain"), batch_size), alpha=settings.alpha)
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
                "plain's", judge=at_least(held_out_accuracy, "held-out accuracy %", settings.accuracy_margin,
                                          variant=BN, reference=PLAIN, batch_size=batch_size, at={"init_scale": end}),
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
        comparison = compare(bn, plain, what="plain - bn range of held-out accuracy over the scales (points)")
        evidence = (f"range of the per-scale mean held-out accuracy: bn {range_of_means('bn'):.2f} vs plain "
                    f"{range_of_means('plain'):.2f} points; per seed bn {summary(bn, 2)} vs plain "
                    f"{summary(plain, 2)}; p={comparison.p:.3f}")
        return result(claim, "bn's range smaller", evidence, comparison)

    return judge


# --- the report section ---


def init_section(context: SectionContext) -> list[str]:
    study, records, out, prefix, with_plots = (
        context.study, context.records, context.out, context.prefix, context.with_plots)
    lines = opening(
        context, "Initialization: is BN less sensitive to it?",
        f"Every Linear weight of PyTorch's default initialization multiplied by the init scale (biases and BN "
        f"parameters unchanged); scales {', '.join(f'{k:g}' for k in study.init_scales)}, batch size "
        f"{', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs, learning rate {study.lrs[0]:g}.")
    if not records:
        return lines
    table = runs_table(records)
    rows = []
    for (batch_size, scale), at in table.groupby(["batch_size", "init_scale"]):
        row = {"batch size": batch_size, "init scale": f"{scale:g}"}
        for variant in ("plain", "bn"):
            runs = at[at["variant"] == variant]
            row[f"{variant} held-out acc % (diverged count as 0)"] = summary(list(runs["held_out_accuracy"]), 2)
            row[f"{variant} diverged"] = str(int(runs["diverged"].sum()))
        rows.append(row)
    lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    spans = []
    for variant in ("plain", "bn"):
        means = table[table["variant"] == variant].groupby("init_scale")["held_out_accuracy"].mean()
        if len(means):
            spans.append(f"{variant} {means.max() - means.min():.2f}")
    lines += ["Range of the per-scale mean held-out accuracy (points): " + ", ".join(spans) + ".", ""]
    if with_plots:
        lines += write_figure(out, f"{prefix}init_scale.png", "Held-out accuracy against the init scale",
                               plots.init_scale_plot(table, colors(records)))
    return lines + claims_block(context, "initialization")


register_study(NAME, title="initialization study", matrices=MATRICES, section=init_section)(init_study_claims)
