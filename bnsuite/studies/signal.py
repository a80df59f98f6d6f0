"""Signal propagation at initialization (Brock, De & Smith 2021): `signal2021`, in the default run.

A deep plain network (bnsuite.models.DeepMLP: 20 hidden ReLU layers of 100 units, PyTorch's default init) and
the same network with BN before each ReLU. Before the first step, on a batch of the run's training images, each
hidden layer's output is measured as the next layer takes it: the mean over channels of the squared channel mean
and of the channel variance (bnsuite.signal), which their signal-propagation plot draws against depth. The runs
then train a few epochs, so the claims can ask whether the network whose signal fades trains worse.

At PyTorch's default init a Linear layer's weights are uniform with variance 1 / (3 fan-in), so each ReLU layer
keeps about a sixth of its input's second moment; the biases, constant across images, keep a channel mean while
the variance across images shrinks layer after layer. BN restores a unit variance before every ReLU.
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
    held_out_accuracy,
    needs,
    not_recorded,
    result,
    smaller,
    summary,
)
from bnsuite.core.registry import SectionContext, register_study
from bnsuite.core.report_parts import claims_block, colors, opening, write_figure
from bnsuite.core.spec import SIGNAL_IMAGES, Study, StudySpec

NAME = "signal2021"
PLAIN, BN = "deep-plain", "deep-bn"
BATCH_SIZE = 64
ORDERS = 2  # "by orders of magnitude": plain's variance range above BN's by more than this many powers of ten
MATRICES = {profile: Study(NAME, variants=(PLAIN, BN), batch_sizes=(BATCH_SIZE,), epochs=epochs,
                           measures=("signal",))
            for profile, epochs in (("full", 3), ("quick", 3), ("smoke", 2))}
RANGE = "channel variance range across depth (largest layer / smallest)"


def variance_range(record) -> float:
    """The record's largest over smallest per-layer channel variance at initialization; NaN if not measured."""
    return math.nan if record.signal is None else record.signal.variance_range()


def _orders_of_magnitude(batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        mine, theirs = ([variance_range(r) for r in runs.of(variant, batch_size)] for variant in (PLAIN, BN))
        if any(math.isnan(value) for value in mine + theirs):
            return not_recorded(claim, "the signal at initialization", why="a study that did not ask")
        plain_orders, bn_orders = ([math.log10(value) for value in values] for values in (mine, theirs))
        # BN's range times 10^ORDERS below plain's is the claim; the effect is how many orders plain's exceeds it by.
        comparison = compare(bn_orders, plain_orders, offset=-ORDERS,
                             what=f"log10 {PLAIN} range - log10 {BN} range (orders of magnitude)")
        evidence = (f"{RANGE}: {PLAIN} {summary(mine, 3, significant=True)} vs {BN} "
                    f"{summary(theirs, 3, significant=True)}; p={comparison.p:.3f}")
        return result(claim, f"{PLAIN}'s range above {BN}'s x 10^{ORDERS}", evidence, comparison)

    return judge


def _trains_better(batch_size: int):
    def judge(claim: Claim, runs: Runs) -> ClaimResult:
        mine, theirs = ([held_out_accuracy(r) for r in runs.of(variant, batch_size)] for variant in (BN, PLAIN))
        comparison = compare(theirs, mine, what=f"{BN} - {PLAIN} held-out accuracy (points)")
        evidence = f"held-out accuracy % {BN} {summary(mine, 2)} vs {PLAIN} {summary(theirs, 2)}; p={comparison.p:.3f}"
        return result(claim, f"{PLAIN} below {BN}", evidence, comparison)

    return judge


def signal_claims(spec: StudySpec, study: Study) -> list[Claim]:
    if not {PLAIN, BN} <= set(study.variants):
        return []
    claims = []
    for batch_size in sorted(study.batch_sizes):
        at = f"On a deep network (20 hidden ReLU layers) at PyTorch's default init, batch size {batch_size}: "

        def common(batch_size=batch_size):
            return dict(batch_size=batch_size, study=study.name, reason="signal", alpha=spec.claims.alpha,
                        needs=needs(spec, study, (BN, PLAIN), batch_size))

        claims += [
            Claim(f"{BN}-steady-signal-across-depth", variant=BN, statement=at + "at initialization, the channel "
                  "variance of the BN network's hidden outputs stays within a small factor across depth (its "
                  "largest layer over its smallest), a smaller range than the network's without BN (Brock et al. "
                  "2021, signal-propagation plot).",
                  short="BN kept the hidden signal's variance steady across 20 layers at initialization",
                  judge=smaller(variance_range, RANGE, variant=BN, reference=PLAIN, batch_size=batch_size,
                                digits=3, significant=True,
                                missing=("the signal at initialization", "a study that did not ask")),
                  **common()),
            Claim(f"{PLAIN}-signal-drifts-by-orders-of-magnitude", variant=PLAIN, statement=at + "at "
                  "initialization, without BN the channel variance of the hidden outputs drifts across depth by "
                  f"orders of magnitude: its range is more than 10^{ORDERS} times the BN network's.",
                  short=f"without BN the signal's variance moved by more than {ORDERS} orders of magnitude "
                  "across depth", judge=_orders_of_magnitude(batch_size), **common()),
            Claim(f"{BN}-trains-where-plain-fades", variant=BN, statement=at + "after training, the BN network's "
                  "held-out accuracy is above the network's without BN, whose signal fades with depth.",
                  short="the deep BN network trained better than the deep network without BN",
                  judge=_trains_better(batch_size), **common()),
        ]
    return claims


def signal_section(context: SectionContext) -> list[str]:
    study, records = context.study, context.records
    lines = opening(
        context, "Signal propagation at initialization (Brock et al. 2021)",
        "A deep network (bnsuite.models.DeepMLP: 784 inputs, 20 hidden ReLU layers of 100 units, 10 outputs) at "
        "PyTorch's default init, without BN (`deep-plain`) and with BatchNorm1d before each ReLU (`deep-bn`). "
        f"Before the first step, on the run's first {min(SIGNAL_IMAGES, context.spec.train_size):,} training "
        "images in training mode, each hidden "
        "layer's output as the next layer takes it: the mean over units of the squared unit mean and of the unit "
        "variance across the images (their signal-propagation plot). Then each run trains "
        f"{study.epochs} epochs at batch size {', '.join(map(str, study.batch_sizes))}.")
    if not records:
        return lines
    measured = [r for r in records if r.signal is not None]
    rows = []
    for variant in (PLAIN, BN):
        mine = [r for r in measured if r.spec.variant == variant]
        if not mine:
            continue
        rows.append({"variant": variant,
                     "variance, first hidden output": summary([r.signal.variance[0] for r in mine], 3,
                                                              significant=True),
                     "variance, last hidden output": summary([r.signal.variance[-1] for r in mine], 3,
                                                             significant=True),
                     RANGE: summary([r.signal.variance_range() for r in mine], 3, significant=True),
                     "squared mean / variance, last": summary(
                         [r.signal.squared_mean[-1] / r.signal.variance[-1] if r.signal.variance[-1] else math.inf
                          for r in mine], 3, significant=True),
                     "held-out acc %": summary([held_out_accuracy(r) for r in records if r.spec.variant == variant],
                                               2)})
    if rows:
        lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    if context.with_plots and {r.spec.variant for r in measured} >= {PLAIN, BN}:
        signals = pd.DataFrame([{"variant": r.spec.variant, "seed": r.spec.seed, "depth": depth,
                                 "squared_mean": squared_mean, "variance": variance}
                                for r in measured
                                for depth, (squared_mean, variance) in enumerate(
                                    zip(r.signal.squared_mean, r.signal.variance, strict=True), start=1)])
        lines += write_figure(context.out, f"{context.prefix}signal2021.png",
                              "Signal propagation at initialization: squared channel mean and channel variance of "
                              "each hidden output against depth, every seed",
                              plots.signal_plot(signals, colors(records), plain=PLAIN, bn=BN))
    return lines + claims_block(context, "signal propagation")


register_study(NAME, title="signal-propagation study", matrices=MATRICES, section=signal_section,
               options={"epochs", "lr"})(signal_claims)
