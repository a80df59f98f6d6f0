"""The report's figures, drawn headless (matplotlib's Agg backend) from the epoch and run tables.

Each function takes the frames from bnsuite.records and returns PNG bytes, so
the report decides where they go and writes them atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # no display: CI machines and servers have none

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Colors = Mapping[str, str]  # variant -> its colour, from the records' variant descriptions (Variant.color)


def _color(colors: Colors, variant: str) -> str:
    return colors.get(variant, "tab:gray")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _per_epoch_panels(epochs: pd.DataFrame, column: str, ylabel: str, title: str, *, log: bool, colors: Colors,
                      baseline: pd.DataFrame | None = None) -> bytes:
    """One panel per batch size, one line per variant (mean over seeds, band min to max); a baseline's
    curves, if given, dashed over them."""
    batch_sizes = sorted(epochs["batch_size"].unique())
    figure, axes = plt.subplots(1, len(batch_sizes), figsize=(4.2 * len(batch_sizes), 3.6), sharey=True, squeeze=False)
    for axis, batch_size in zip(axes[0], batch_sizes, strict=True):
        if baseline is not None:
            for variant, runs in baseline[baseline["batch_size"] == batch_size].groupby("variant"):
                mean = runs.groupby("epoch")[column].mean()
                axis.plot(mean.index, mean.values, linestyle="--", color=_color(colors, variant), alpha=0.8,
                          label=f"{variant}, baseline (mean of {runs['seed'].nunique()} seeds)")
        for variant, runs in epochs[epochs["batch_size"] == batch_size].groupby("variant"):
            by_epoch = runs.groupby("epoch")[column]
            mean, low, high = by_epoch.mean(), by_epoch.min(), by_epoch.max()
            seeds = runs["seed"].nunique()
            axis.plot(mean.index, mean.values, marker="o", markersize=3, color=_color(colors, variant),
                      label=f"{variant} (mean of {seeds} seeds)")
            axis.fill_between(mean.index, low.values, high.values, color=_color(colors, variant), alpha=0.25,
                              linewidth=0)
        axis.set_title(f"batch size {batch_size}")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(loc="best", fontsize=8)
    figure.suptitle(f"{title} (band: min to max over seeds)")
    return _png(figure)


def training_loss_plot(epochs: pd.DataFrame, colors: Colors) -> bytes:
    return _per_epoch_panels(epochs, "train_loss", "mean training loss per epoch (cross-entropy, log scale)",
                             "Training loss per epoch", log=True, colors=colors)


def held_out_accuracy_plot(epochs: pd.DataFrame, column: str, label: str, colors: Colors) -> bytes:
    return _per_epoch_panels(epochs, column, f"{label} accuracy (%)", f"{label.capitalize()} accuracy per epoch",
                             log=False, colors=colors)


def baseline_plot(epochs: pd.DataFrame, baseline: pd.DataFrame, column: str, label: str, colors: Colors) -> bytes:
    return _per_epoch_panels(epochs, column, f"{label} accuracy (%)",
                             f"{label.capitalize()} accuracy per epoch, now (solid) and baseline (dashed)",
                             log=False, colors=colors, baseline=baseline)


def accuracy_by_batch_size_plot(runs: pd.DataFrame, colors: Colors) -> bytes:
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for variant, group in runs.groupby("variant"):
        stats = group.groupby("batch_size")["test_accuracy"].agg(["mean", "std", "count"]).fillna(0.0)
        axis.errorbar(stats.index, stats["mean"], yerr=stats["std"], marker="o", capsize=4,
                      color=_color(colors, variant), label=f"{variant} (mean ± std over seeds)")
    axis.set_xscale("log", base=2)
    batch_sizes = sorted(runs["batch_size"].unique())
    axis.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axis.set_xlabel("batch size (images)")
    axis.set_ylabel("final test accuracy (%)")
    axis.set_title("Final test accuracy against batch size")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    return _png(figure)


def _seed_points(axis, x, y, color, *, marker="o") -> None:
    axis.scatter(x, y, color=color, s=14, alpha=0.7, marker=marker, linewidths=1)


def learning_rate_plot(runs: pd.DataFrame, trained_accuracy: float, colors: Colors) -> bytes:
    """Held-out accuracy and final training loss against the learning rate (log axis); diverged runs marked x."""
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant, group in runs.groupby("variant"):
        color = _color(colors, variant)
        finished, diverged = group[~group["diverged"]], group[group["diverged"]]
        means = finished.groupby("lr")[["held_out_accuracy", "final_train_loss"]].mean()
        accuracy_axis.plot(means.index, means["held_out_accuracy"], color=color, marker="o", label=variant)
        loss_axis.plot(means.index, means["final_train_loss"], color=color, marker="o", label=variant)
        _seed_points(accuracy_axis, finished["lr"], finished["held_out_accuracy"], color)
        _seed_points(loss_axis, finished["lr"], finished["final_train_loss"], color)
        if not diverged.empty:  # no accuracy or loss to plot: marked at the bottom of the accuracy axis
            _seed_points(accuracy_axis, diverged["lr"], [0.0] * len(diverged), color, marker="x")
    accuracy_axis.axhline(trained_accuracy, color="gray", linestyle=":", linewidth=1,
                          label=f"trained: >= {trained_accuracy:g}%")
    for axis, label in ((accuracy_axis, "final held-out accuracy (%); x: diverged"),
                        (loss_axis, "final training loss (log scale)")):
        axis.set_xscale("log")
        axis.set_xlabel("learning rate (log scale)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    loss_axis.set_yscale("log")
    accuracy_axis.legend(loc="best", fontsize=8)
    figure.suptitle("Learning-rate study (lines: mean of the seeds that did not diverge; points: seeds)")
    return _png(figure)


def init_scale_plot(runs: pd.DataFrame, colors: Colors) -> bytes:
    """Held-out accuracy against the init scale (log axis), one line per variant, seeds as points."""
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for variant, group in runs.groupby("variant"):
        means = group.groupby("init_scale")["held_out_accuracy"].mean()
        axis.plot(means.index, means.values, color=_color(colors, variant), marker="o",
                  label=f"{variant} (mean of seeds)")
        _seed_points(axis, group["init_scale"], group["held_out_accuracy"], _color(colors, variant))
    axis.set_xscale("log")
    axis.set_xlabel("init scale: default Linear weights x k (log scale)")
    axis.set_ylabel("final held-out accuracy (%)")
    axis.set_title("Initialization study")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    return _png(figure)


def dropout_plot(runs: pd.DataFrame, order: list[str], colors: Colors, lighter: set[str]) -> bytes:
    """Held-out accuracy and generalization gap per variant (in `order`), seeds as points; the `lighter`
    variants' bars (dropout added) paler than those they derive from."""
    finished = runs[~runs["diverged"]]
    return bars_plot(finished, order, colors, (("held_out_accuracy", "final held-out accuracy (%)"),
                                               ("gap", "gap: training - held-out accuracy (points)")),
                     "Dropout study (bars: mean over seeds; points: seeds)", lighter=lighter)


def bars_plot(runs: pd.DataFrame, order: list[str], colors: Colors, panels: tuple[tuple[str, str], ...], title: str,
              *, lighter: set[str] = frozenset()) -> bytes:
    """One panel per (column, label) of `panels`: a bar per variant (in `order`) at its mean over `runs`, its seeds
    as points; an accuracy panel's axis starts near its lowest value. `lighter` variants' bars are paler."""
    variants = [variant for variant in order if variant in set(runs["variant"])]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for axis, (column, label) in zip(axes[0], panels, strict=True):
        for position, variant in enumerate(variants):
            values = runs[runs["variant"] == variant][column]
            color = _color(colors, variant)
            axis.bar(position, values.mean(), color=color, alpha=0.35 if variant in lighter else 0.6)
            _seed_points(axis, [position] * len(values), values, color)
        axis.set_xticks(range(len(variants)), variants, rotation=15)
        axis.set_ylabel(label)
        axis.grid(True, axis="y", alpha=0.3)
        if "accuracy" in column and len(runs[column]):
            axis.set_ylim(max(0.0, runs[column].min() - 1.0), min(100.0, runs[column].max() + 0.5))
    figure.suptitle(title)
    return _png(figure)


def activation_plot(traces: pd.DataFrame, colors: Colors, points: Mapping[str, str],
                    nonlinearity: str = "ReLU") -> bytes:
    """Ioffe & Szegedy's Fig. 1 for the study's networks: one unit's 15th, 50th and 85th input percentiles
    against training steps, one panel per variant (in the frame's order). `traces`: variant, step, percentile,
    value; `points`: each variant's probe point."""
    variants = list(dict.fromkeys(traces["variant"]))
    figure, axes = plt.subplots(1, len(variants), figsize=(4.6 * len(variants), 3.6), squeeze=False)
    for axis, variant in zip(axes[0], variants, strict=True):
        _percentile_lines(axis, traces[traces["variant"] == variant], _color(colors, variant))
        axis.set_title(f"{variant}: {points[variant]} output")
    axes[0][0].set_ylabel(f"input to the last hidden {nonlinearity}")
    figure.suptitle("One hidden unit's input distribution over training (probe batch of held-out images)")
    return _png(figure)


def _percentile_lines(axis, trace: pd.DataFrame, color: str) -> None:
    for percentile, line in trace.groupby("percentile"):
        axis.plot(line["step"], line["value"], color=color, alpha=0.45 + 0.35 * (percentile == 50), linewidth=1.2,
                  label=f"{percentile:g}th percentile")
    axis.set_xlabel("training step")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="best", fontsize=8)


def ioffe_plot(accuracy: pd.DataFrame, traces: pd.DataFrame, colors: Colors, *, plain: str, bn: str,
               held_out: str, unit: int) -> bytes:
    """Ioffe & Szegedy's Figure 1 as they draw it: (a) held-out accuracy against training steps, plain and BN (mean
    over seeds, band min to max); (b, c) one last-hidden-layer unit's 15th, 50th and 85th input percentiles (the
    sigmoid's input) against steps, without and with BN. `accuracy`: variant, seed, step, accuracy (in %);
    `traces`: variant, step, percentile, value (one seed)."""
    figure, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    for variant, style in ((plain, "--"), (bn, "-")):
        by_step = accuracy[accuracy["variant"] == variant].groupby("step")["accuracy"]
        mean, low, high = by_step.mean(), by_step.min(), by_step.max()
        color = _color(colors, variant)
        seeds = accuracy[accuracy["variant"] == variant]["seed"].nunique()
        axes[0].plot(mean.index, mean.values / 100, linestyle=style, color=color,
                     label=f"{variant} (mean of {seeds} seeds)")
        axes[0].fill_between(mean.index, low.values / 100, high.values / 100, color=color, alpha=0.2, linewidth=0)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel(f"{held_out} accuracy")
    lowest = accuracy["accuracy"].min() / 100
    axes[0].set_ylim(0.7 if lowest >= 0.7 else max(0.0, lowest - 0.02), 1.0)  # theirs: 0.7 to 1
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title("(a) held-out accuracy")
    for axis, variant, letter in ((axes[1], plain, "b"), (axes[2], bn, "c")):
        _percentile_lines(axis, traces[traces["variant"] == variant], _color(colors, variant))
        axis.set_title(f"({letter}) {variant}: unit {unit}'s sigmoid input")
    axes[2].sharey(axes[1])
    figure.suptitle("Ioffe & Szegedy (2015), Figure 1, on this run's records")
    return _png(figure)


def ghost_plot(runs: pd.DataFrame, batch_size: int, bn_color: str, reference_color: str) -> bytes:
    """Held-out accuracy against the images BN's statistics see (ghost size, log axis), with running estimates
    (solid) and with batch statistics (dashed); LayerNorm, which sees no other image, as a horizontal reference.
    `runs`: ghost (None for ln), seed, held_out_accuracy, batch_statistics_accuracy."""
    figure, axis = plt.subplots(figsize=(6.2, 4.0))
    bn = runs[runs["ghost"].notna()]
    means = bn.groupby("ghost")[["held_out_accuracy", "batch_statistics_accuracy"]].mean()
    axis.plot(means.index, means["held_out_accuracy"], color=bn_color, marker="o",
              label="BN, running estimates (eval mode; mean of seeds)")
    _seed_points(axis, bn["ghost"], bn["held_out_accuracy"], bn_color)
    axis.plot(means.index, means["batch_statistics_accuracy"], color=bn_color, marker="s", linestyle="--",
              alpha=0.7, label="BN, each held-out batch's own statistics")
    ln = runs[runs["ghost"].isna()]["held_out_accuracy"]
    if len(ln):
        axis.axhline(ln.mean(), color=reference_color, label="LayerNorm (mean of seeds; band: min to max)")
        axis.axhspan(ln.min(), ln.max(), color=reference_color, alpha=0.15, linewidth=0)
    axis.set_xscale("log", base=2)
    sizes = sorted(int(g) for g in means.index)
    axis.set_xticks(sizes, [str(g) for g in sizes])
    axis.set_xlabel(f"images per BN statistic (ghost batch size, within batches of {batch_size})")
    axis.set_ylabel("final held-out accuracy (%)")
    axis.set_title("BN against the images its statistics see (Wu & He 2018, Fig. 1)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    return _png(figure)


def running_vs_batch_plot(epochs: pd.DataFrame, color: str) -> bytes:
    """BN's held-out accuracy per epoch with running estimates (solid) and with batch statistics (dashed), one
    panel per batch size, mean over seeds. `epochs`: batch_size, epoch, seed, running, batch."""
    batch_sizes = sorted(epochs["batch_size"].unique())
    figure, axes = plt.subplots(1, len(batch_sizes), figsize=(4.2 * len(batch_sizes), 3.6), sharey=True,
                                squeeze=False)
    for axis, batch_size in zip(axes[0], batch_sizes, strict=True):
        means = epochs[epochs["batch_size"] == batch_size].groupby("epoch")[["running", "batch"]].mean()
        axis.plot(means.index, means["running"], color=color, marker="o", markersize=3,
                  label="running estimates (eval mode)")
        axis.plot(means.index, means["batch"], color=color, marker="s", markersize=3, linestyle="--",
                  alpha=0.7, label="each held-out batch's own statistics")
        axis.set_title(f"batch size {batch_size}")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[0][-1].legend(loc="best", fontsize=8)
    figure.suptitle("BN at inference: running estimates against batch statistics (mean over seeds)")
    return _png(figure)


def by_ghost_size_plot(runs: pd.DataFrame, batch_size: int, colors: Colors, title: str) -> bytes:
    """Held-out accuracy against the images a statistic sees (log axis), one line per `family` (its colour from
    `variant`), seeds as points. `runs`: family, variant, ghost, held_out_accuracy."""
    figure, axis = plt.subplots(figsize=(6.2, 4.0))
    for family, group in runs.groupby("family", sort=False):
        color = _color(colors, group["variant"].iloc[-1])
        means = group.groupby("ghost")["held_out_accuracy"].mean()
        axis.plot(means.index, means, color=color, marker="o", label=f"{family} (mean of seeds)")
        _seed_points(axis, group["ghost"], group["held_out_accuracy"], color)
    axis.set_xscale("log", base=2)
    sizes = sorted(int(g) for g in runs["ghost"].unique())
    axis.set_xticks(sizes, [str(g) for g in sizes])
    axis.set_xlabel(f"images per statistic (ghost batch size, within batches of {batch_size})")
    axis.set_ylabel("final held-out accuracy (%)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    return _png(figure)


def landscape_plot(runs: pd.DataFrame, order: list[str], colors: Colors, layer: str) -> bytes:
    """Santurkar et al.'s Fig. 4 (and the ICS of `layer`) over training steps: per variant the median over seeds
    and a band from the smallest to the largest seed. `runs`: variant, seed, step and one column per panel."""
    panels = (("loss_variation", "loss variation along the gradient"),
              ("gradient_predictiveness", "largest gradient change (l2)"),
              ("beta_smoothness", "effective beta-smoothness"), ("ics", f"gradient ICS of {layer} (l2)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for axis, (column, label) in zip(axes, panels, strict=True):
        for variant in order:
            mine = runs[runs["variant"] == variant].groupby("step")[column]
            color = _color(colors, variant)
            median = mine.median()
            axis.plot(median.index, median, color=color, label=variant)
            axis.fill_between(median.index, mine.min(), mine.max(), color=color, alpha=0.2, linewidth=0)
        axis.set_yscale("log")
        axis.set_xlabel("optimizer steps")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle("The loss landscape along the gradient, and covariate shift by gradients (Santurkar et al. 2018)")
    figure.tight_layout()
    return _png(figure)


def signal_plot(signals: pd.DataFrame, colors: Colors, *, plain: str, bn: str) -> bytes:
    """Brock et al.'s signal-propagation plot: (a) the mean squared channel mean and (b) the mean channel variance
    of each hidden layer's output at initialization, against depth (log axis), plain dashed, BN solid, one line per
    seed. `signals`: variant, seed, depth, squared_mean, variance."""
    figure, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), sharex=True)
    for axis, series, title in ((axes[0], "squared_mean", "(a) average squared channel mean"),
                                (axes[1], "variance", "(b) average channel variance")):
        for variant, style in ((plain, "--"), (bn, "-")):
            rows = signals[signals["variant"] == variant]
            for index, (_, seed) in enumerate(rows.groupby("seed")):
                axis.plot(seed["depth"], seed[series], linestyle=style, color=_color(colors, variant), alpha=0.7,
                          label=variant if index == 0 else None)
        axis.set_yscale("log")
        axis.set_xlabel("depth (hidden layer)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Signal propagation at initialization (Brock et al. 2021), on this run's records")
    return _png(figure)


def precise_plot(gaps: pd.DataFrame, colors: Colors) -> bytes:
    """Held-out accuracy with precise statistics minus with the running estimates, against the epoch, one line per
    variant (mean of seeds, seeds as points). `gaps`: variant, seed, epoch, gap (points)."""
    figure, axis = plt.subplots(figsize=(6.2, 4.0))
    for variant, rows in gaps.groupby("variant", sort=False):
        means = rows.groupby("epoch")["gap"].mean()
        color = _color(colors, variant)
        axis.plot(means.index, means.values, marker="o", color=color, label=f"{variant} (mean of seeds)")
        _seed_points(axis, rows["epoch"], rows["gap"], color)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("precise - running estimates (points)")
    axis.set_title("Precise BN against running averages (Wu & Johnson 2021)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    return _png(figure)
