"""The ghost-batch study: how BN depends on the images its statistics see (Wu & He 2018, Fig. 1).

At batch 128, BN with its statistics over ghost batches of 2 to 32 images
(`bn-ghostG`), `bn` (the whole batch) and LayerNorm (`ln`), whose statistics
involve no other image. A batch of B with ghost size g computes what
data-parallel training on B/g devices computes without synchronized BN.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import pandas as pd

from bnsuite.core import plots
from bnsuite.core.claims import (
    Claim,
    ClaimResult,
    Comparison,
    Runs,
    batch_statistics_accuracy,
    compare,
    held_out_accuracy,
    needs,
    not_recorded,
    precise_accuracy,
    result,
    summary,
)
from bnsuite.core.registry import ANY_NETWORK, SectionContext, register_study
from bnsuite.core.report_parts import claims_block, colors, opening, write_figure
from bnsuite.core.spec import NOT_SHOWN, UNSETTLED, KnownException, Study, StudySpec

NAME = "ghost"
BN, LN = "bn", "ln"  # BN over the whole batch, and the batch-free reference
GHOST_BATCH = 128
# Wu & He (2018, Fig. 1) go from 32 images per device down to 2; a ghost batch of the whole batch (128) is bn.
GHOST_VARIANTS = ("bn-ghost2", "bn-ghost4", "bn-ghost8", "bn-ghost16", "bn-ghost32", BN, LN)
# The same epochs as the batch study's, so bn at batch 128 is the same runs in both.
# On the ConvNet the batch study's ConvNet epochs, for the same reason.
# Precise statistics (bnsuite.precise) at a few epoch ends, for the train-test inconsistency claim.
MATRICES = {profile: Study(NAME, variants=GHOST_VARIANTS, batch_sizes=(GHOST_BATCH,), epochs=epochs,
                           network_epochs=(("cnn", cnn_epochs),), measures=("precise",))
            for profile, epochs, cnn_epochs in (("full", 10, 10), ("quick", 4, 2), ("smoke", 2, 2))}


def ghost_sizes(spec: StudySpec, study: Study, batch_size: int) -> dict[int, str]:
    """The study's variants with batch statistics by the number of images a statistic sees, from their
    descriptions: {ghost size: variant}; one without a ghost size (`bn`) sees the whole batch."""
    sizes = {}
    for name in study.variants:
        variant = spec.variant(name, study.networks[0])
        if variant.batch_statistics:
            sizes[variant.images_per_statistic or batch_size] = name
    return dict(sorted(sizes.items()))


class AgainstLayerNorm(NamedTuple):
    """BN at one ghost size against LayerNorm, on held-out accuracy."""

    ghost: int
    verdict: str  # "behind" (BN below LN at p <= alpha), "ahead" (above at q <= alpha) or "not shown"
    comparison: Comparison  # p: that BN is below LayerNorm; q: that BN is above it

    @property
    def p(self) -> float:
        return self.comparison.p

    @property
    def q(self) -> float:
        return self.comparison.q

    @property
    def p_of_verdict(self) -> float:
        """The p-value of the verdict's direction; that of "behind" when neither is shown."""
        return self.q if self.verdict == "ahead" else self.p


def against_layernorm(runs: Runs, sizes: dict[int, str], batch_size: int, alpha: float) -> list[AgainstLayerNorm]:
    """BN at each ghost size of `sizes` against LayerNorm, smallest ghost size first."""
    ln = [held_out_accuracy(r) for r in runs.of(LN, batch_size)]
    rows = []
    for g, variant in sizes.items():
        bn = [held_out_accuracy(r) for r in runs.of(variant, batch_size)]
        c = compare(bn, ln, what=f"LayerNorm - {variant} held-out accuracy (points)")
        rows.append(AgainstLayerNorm(g, "behind" if c.p <= alpha else "ahead" if c.q <= alpha else "not shown", c))
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
        sizes = ghost_sizes(spec, study, batch_size)
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
                needs=needs(spec, study, (sizes[small], sizes[large]), batch_size),
                judge=_ghost_falls(sizes[small], sizes[large], batch_size), **common))
        if len(sizes) >= 3 and batch_size in sizes:
            middle = [g for g in sizes if ghosts[0] < g < batch_size]
            claims.append(Claim(
                "bn-accuracy-peaks-at-intermediate-ghost-batch",
                statement=at + f"BN's held-out accuracy is higher with ghost batches of some size between {ghosts[0]} "
                f"and the whole batch ({', '.join(map(str, middle))}) than both with ghost batches of {ghosts[0]} and "
                "with the whole batch (Summers & Dinneen 2019: ghost batches help most at an intermediate size); "
                f"p is Bonferroni's over the {len(middle)} sizes between.",
                short="BN's held-out accuracy peaked at an intermediate ghost-batch size",
                needs=needs(spec, study, tuple(sizes.values()), batch_size),
                judge=_peaks_between(sizes, batch_size), **common))
        if ghosts and batch_size in sizes:
            claims.append(Claim(
                "bn-train-test-inconsistency-widens-at-small-ghost-batches",
                statement=at + f"the train-test inconsistency of BN with statistics over ghost batches of {ghosts[0]} "
                "images (how far its held-out accuracy with precise population statistics, as at inference, is "
                "from its accuracy with each batch's own statistics, as in training) is wider than with the whole "
                "batch (Wu & Johnson 2021, section 4).",
                short=f"BN's train-test inconsistency was wider with ghost batches of {ghosts[0]}",
                needs=needs(spec, study, (sizes[ghosts[0]], sizes[batch_size]), batch_size),
                judge=_inconsistency_widens(sizes[ghosts[0]], sizes[batch_size], batch_size),
                **{**common, "reason": "inference"}))
        if ghosts and LN in study.variants:
            claims.append(Claim(
                "bn-behind-layernorm-at-smallest-ghost-batch",
                statement=at + f"BN with statistics over ghost batches of {ghosts[0]} images has a lower held-out "
                "accuracy than LayerNorm, whose statistics do not involve the batch (Wu & He 2018, Fig. 1: GN stays "
                "flat where BN falls); the evidence names the ghost size below which BN falls behind.",
                short=f"BN with ghost batches of {ghosts[0]} fell behind LayerNorm",
                needs=needs(spec, study, (*sizes.values(), LN), batch_size),
                judge=_behind_layernorm(sizes, batch_size), **common))
    return claims


def _ghost_falls(small: str, large: str, batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        a = [held_out_accuracy(r) for r in runs.of(small, batch_size)]
        b = [held_out_accuracy(r) for r in runs.of(large, batch_size)]
        comparison = compare(a, b, what=f"{large} - {small} held-out accuracy (points)")
        evidence = f"held-out accuracy % {small} {summary(a, 2)} vs {large} {summary(b, 2)}; p={comparison.p:.3f}"
        return result(claim, f"{small} lower", evidence, comparison)

    return judge


def inconsistency(record) -> float:
    """|held-out accuracy with precise statistics - with batch statistics| at the end, in points; NaN where either
    was not measured, infinite for a diverged run (worst)."""
    if record.diverged:
        return math.inf
    return abs(precise_accuracy(record) - batch_statistics_accuracy(record))


def _inconsistency_widens(small: str, whole: str, batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        a, b = ([inconsistency(r) for r in runs.of(variant, batch_size)] for variant in (whole, small))
        if any(math.isnan(value) for value in a + b):
            return not_recorded(claim, "precise or batch statistics", why="a study that did not ask for them")
        comparison = compare(a, b, what=f"{small} - {whole} inconsistency (points)")
        evidence = (f"|precise - batch statistics| held-out accuracy (points): {small} {summary(b, 2)} vs {whole} "
                    f"{summary(a, 2)}; p={comparison.p:.3f}")
        return result(claim, f"{whole}'s smaller", evidence, comparison)

    return judge


def _peaks_between(sizes: dict[int, str], batch_size: int):
    """Some ghost size strictly between the smallest and the whole batch above both ends, on held-out accuracy.

    Within one size both comparisons must hold, so its p is the larger of the two (an intersection-union test);
    the size is not chosen after looking, so the p is Bonferroni's over every size between. The opposite (q): every
    size between is below the whole batch, the accuracy rising all the way to it."""
    ghosts = list(sizes)
    smallest, whole, middle = ghosts[0], ghosts[-1], ghosts[1:-1]

    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        accuracy = {g: [held_out_accuracy(r) for r in runs.of(sizes[g], batch_size)] for g in ghosts}
        tests = {g: tuple(compare(accuracy[end], accuracy[g], what=f"{sizes[g]} - {sizes[end]} held-out accuracy "
                                                                     "(points)") for end in (whole, smallest))
                 for g in middle}
        best = min(middle, key=lambda g: max(test.p for test in tests[g]))
        p = min(1.0, len(middle) * max(test.p for test in tests[best]))
        q = max(tests[g][0].q for g in middle)
        comparison = dataclasses.replace(tests[best][0], p=p, q=q)  # the effect: the best size over the whole batch
        evidence = ("held-out accuracy % " + "; ".join(f"g={g} {summary(accuracy[g], 2)}" for g in ghosts)
                    + f"; g={best} above both ends: p={p:.3f} (Bonferroni over {len(middle)} sizes)")
        return result(claim, f"ghost size {best} above both {smallest} and {whole}", evidence, comparison)

    return judge


def _behind_layernorm(sizes: dict[int, str], batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        rows = against_layernorm(runs, sizes, batch_size, claim.alpha)
        ln = [held_out_accuracy(r) for r in runs.of(LN, batch_size)]
        per_size = "; ".join(
            f"g={row.ghost} {summary([held_out_accuracy(r) for r in runs.of(sizes[row.ghost], batch_size)], 2)} "
            f"{row.verdict} (p={row.p_of_verdict:.3f})" for row in rows)
        evidence = f"held-out accuracy % LayerNorm {summary(ln, 2)}; BN {per_size}; {where_bn_falls_behind(rows)}"
        return result(claim, f"BN at ghost size {rows[0].ghost} below LayerNorm", evidence, rows[0].comparison)

    return judge


# --- the report section ---


def ghost_section(context: SectionContext) -> list[str]:
    spec, study, records, out, prefix, with_plots = (
        context.spec, context.study, context.records, context.out, context.prefix, context.with_plots)
    settings = spec.claims
    lines = opening(
        context, "Batch statistics at small batches: ghost-batch BN against LayerNorm",
        f"Batches of {', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs; BN's statistics computed "
        "over ghost batches of g consecutive images within each training batch (`bn-ghostG`; `bn` is g = the "
        "batch). A batch of B with ghost size g computes what data-parallel training on B/g devices computes "
        "without synchronized BN, so this is Wu & He's per-device effect (2018, Fig. 1) without a cluster; the "
        "running estimates follow the first ghost batch, as DistributedDataParallel's broadcast of rank 0's "
        "buffers makes them. LayerNorm (`ln`) normalizes each image over its own features: no statistic "
        "involves another image.")
    if not records:
        return lines
    steps = {r.spec.variant: r.training_step for r in records if r.training_step == "eager"}
    steps = [f"{variant}: {steps[variant]}" for variant in study.variants if variant in steps]
    if steps:
        lines += ["Not covered by the fast step, so trained by the eager step (autograd + torch.optim), as their "
                  "records say: " + ", ".join(steps) + ".", ""]
    runs = Runs({record.spec: record for record in records})
    palette = colors(records)
    for batch_size in study.batch_sizes:
        sizes = ghost_sizes(spec, study, batch_size)
        rows = []
        against = (against_layernorm(runs, sizes, batch_size, settings.alpha)
                   if runs.of(LN, batch_size) and all(runs.of(v, batch_size) for v in sizes.values()) else [])
        verdicts = {row.ghost: row for row in against}
        for g, variant in [*sizes.items(), (None, LN)]:
            mine = runs.of(variant, batch_size)
            if not mine:
                continue
            row = {"variant": variant, "images per statistic": str(g) if g else "1 (its own features)",
                   "held-out acc % (running estimates)": summary([held_out_accuracy(r) for r in mine], 2),
                   "held-out acc % (batch statistics)": summary([v for v in map(batch_statistics_accuracy, mine)
                                                               if v == v], 2) if g else "",
                   "held-out acc % (precise statistics)": summary([v for v in map(precise_accuracy, mine)
                                                                 if v == v], 2) if g else "",
                   "final train loss": summary([r.final_train_loss for r in mine], 4)}
            if g in verdicts:
                row["against LayerNorm"] = f"{verdicts[g].verdict} (p={verdicts[g].p_of_verdict:.3f})"
            rows.append(row)
        lines += [pd.DataFrame(rows).fillna("").to_markdown(index=False, disable_numparse=True), ""]
        if against:
            lines += [f"**{where_bn_falls_behind(against)}** (behind: lower at p <= {settings.alpha}).", ""]
        if with_plots:
            frame = pd.DataFrame([{"ghost": g, "seed": r.spec.seed, "held_out_accuracy": held_out_accuracy(r),
                                   "batch_statistics_accuracy": r.epochs[-1].batch_statistics_accuracy
                                   if r.epochs and not r.diverged else None}
                                  for g, variant in [*sizes.items(), (None, LN)]
                                  for r in runs.of(variant, batch_size)])
            name = f"{prefix}ghost_batch{'' if len(study.batch_sizes) == 1 else f'_bs{batch_size}'}.png"
            png = plots.ghost_plot(frame, batch_size, palette.get(BN, "tab:blue"), palette.get(LN, "tab:purple"))
            lines += write_figure(out, name, "Held-out accuracy against the ghost batch size, LayerNorm as reference",
                                  png)
    return lines + claims_block(context, "batch statistics at small batches")


# On the ConvNet each statistic of a ghost batch of g images sees g x H x W values per channel (1,568 at g = 2 for
# conv1's 28x28 maps), not g as in the MLP: in the smoke profile its ghost-batch BN holds up.
# Summers & Dinneen's peak: on the MLP BN at ghost size 16 or 32 is about the whole batch's accuracy, a few
# hundredths of a point apart, where their peak was on ImageNet-scale networks.
PEAK = "bn-accuracy-peaks-at-intermediate-ghost-batch-bs128"
INCONSISTENCY = "bn-train-test-inconsistency-widens-at-small-ghost-batches-bs128"
# The ConvNet's full references (MNIST, Fashion-MNIST) were made before runs recorded precise statistics.
NOT_MEASURED_ON_THE_CONVNET = ("not measured: the committed ConvNet references were made before runs recorded precise "
                               "statistics (schema 9); the ConvNet's runs of this code measure them")
KNOWN_EXCEPTIONS = {"full": (
    KnownException(PEAK, NOT_SHOWN,
                   "after 10 epochs BN at ghost size 16 is at 98.23% held-out against 98.15% with the whole batch "
                   "and 75.54% at 2 (7 seeds): above the whole batch in most seed pairs (P 0.82) but p 0.096 after "
                   "Bonferroni over the 4 sizes between"),
    KnownException(f"cnn-{PEAK}", NOT_SHOWN,
                   "after 10 epochs the ConvNet's BN is within 0.05 points at every ghost size (98.70-98.75% "
                   "held-out, 6 seeds): no size stands out"),
    KnownException("cnn-bn-accuracy-falls-at-small-ghost-batches-bs128", NOT_SHOWN,
                   "after 10 epochs the ConvNet's BN at ghost batch 2 is at 98.70% held-out against 98.72% at 32 (6 "
                   "seeds, p 0.64): each statistic sees every position of the maps, 1,568 values at g = 2"),
    KnownException("cnn-bn-behind-layernorm-at-smallest-ghost-batch-bs128", NOT_SHOWN,
                   "after 10 epochs the ConvNet's BN is within 0.03 points of LayerNorm (98.72% held-out) at every "
                   "ghost size measured, never behind it"),
    KnownException(f"cnn-{INCONSISTENCY}", NOT_SHOWN, NOT_MEASURED_ON_THE_CONVNET),
), "full:fashion-mnist": (
    KnownException(f"cnn-{INCONSISTENCY}", NOT_SHOWN, NOT_MEASURED_ON_THE_CONVNET),
    KnownException("cnn-bn-accuracy-falls-at-small-ghost-batches-bs128", NOT_SHOWN,
                   "on Fashion-MNIST the ConvNet's BN at ghost batch 2 is at 89.55% held-out against 89.84% at 32 (6 "
                   "seeds, p 0.12): each statistic sees every position of the maps"),
    KnownException("cnn-bn-behind-layernorm-at-smallest-ghost-batch-bs128", NOT_SHOWN,
                   "on Fashion-MNIST the ConvNet's BN is within 0.25 points of LayerNorm (89.61% held-out) at every "
                   "ghost size, never behind it (6 seeds)"),
    KnownException(f"cnn-{PEAK}", NOT_SHOWN,
                   "on Fashion-MNIST the ConvNet's BN is within 0.3 points at every ghost size (89.55-89.84% "
                   "held-out, 6 seeds), highest at 32 and the whole batch: no peak between"),
), "quick": (
    KnownException(PEAK, NOT_SHOWN,
                   "in 4 epochs on 20,000 images BN at ghost size 32 is at 96.73% held-out against 96.66% with the "
                   "whole batch (5 seeds, p 0.9 after Bonferroni): the accuracy levels off from 16 on"),
), "smoke": (
    KnownException(PEAK, NOT_SHOWN,
                   "in 2 epochs on 4,000 images BN's held-out accuracy rises with the ghost size up to the whole batch "
                   "(66.8% at 2, 91.4% at 32, 91.5% at 128; 3 seeds), no size between above it"),
    KnownException(f"cnn-{PEAK}", NOT_SHOWN,
                   "in 64 steps the ConvNet's BN is within 0.4 points at every ghost size (3 seeds): no size stands "
                   "out"),
    KnownException("cnn-bn-accuracy-falls-at-small-ghost-batches-bs128", NOT_SHOWN,
                   "in 64 steps the ConvNet's BN at ghost batch 2 is within seed noise of ghost batch 32 (93.5% "
                   "against 93.9% held-out, p 0.2): its statistics see every position of the maps"),
    KnownException("cnn-bn-behind-layernorm-at-smallest-ghost-batch-bs128", NOT_SHOWN,
                   "the ConvNet's BN is ahead of LayerNorm at every ghost size measured (93.5-93.9% against 92.7% "
                   "held-out), never behind it"),
    KnownException(f"cnn-{INCONSISTENCY}", UNSETTLED,
                   "in 64 steps the ConvNet's inconsistency at ghost batch 2 is a tenth of a point, about the seed "
                   "spread of 3 seeds: supported on an Intel Xeon (0.19 against 0.03 points, p = 0.05), not shown "
                   "on an AMD EPYC Zen 4 (0.16 against 0.06, p = 0.15)"),
)}
register_study(NAME, title="ghost-batch study", matrices=MATRICES, section=ghost_section,
               known_exceptions=KNOWN_EXCEPTIONS, networks=("mlp", "cnn", ANY_NETWORK))(ghost_study_claims)
