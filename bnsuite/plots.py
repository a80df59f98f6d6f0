"""The report's figures, drawn headless (matplotlib's Agg backend) from the epoch and run tables.

Each function takes the frames from bnsuite.records and returns PNG bytes, so
the report decides where they go and writes them atomically.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display: CI machines and servers have none

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = {"plain": "tab:orange", "bn": "tab:blue", "bn-scratch": "tab:green"}


def _color(variant: str) -> str:
    return COLORS.get(variant, "tab:gray")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _per_epoch_panels(epochs: pd.DataFrame, column: str, ylabel: str, title: str, *, log: bool) -> bytes:
    batch_sizes = sorted(epochs["batch_size"].unique())
    figure, axes = plt.subplots(1, len(batch_sizes), figsize=(4.2 * len(batch_sizes), 3.6), sharey=True, squeeze=False)
    for axis, batch_size in zip(axes[0], batch_sizes, strict=True):
        for variant, runs in epochs[epochs["batch_size"] == batch_size].groupby("variant"):
            by_epoch = runs.groupby("epoch")[column]
            mean, low, high = by_epoch.mean(), by_epoch.min(), by_epoch.max()
            seeds = runs["seed"].nunique()
            axis.plot(mean.index, mean.values, marker="o", markersize=3, color=_color(variant),
                      label=f"{variant} (mean of {seeds} seeds)")
            axis.fill_between(mean.index, low.values, high.values, color=_color(variant), alpha=0.25, linewidth=0)
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


def training_loss_plot(epochs: pd.DataFrame) -> bytes:
    return _per_epoch_panels(epochs, "train_loss", "mean training loss per epoch (cross-entropy, log scale)",
                             "Training loss per epoch", log=True)


def held_out_accuracy_plot(epochs: pd.DataFrame, column: str, label: str) -> bytes:
    return _per_epoch_panels(epochs, column, f"{label} accuracy (%)", f"{label.capitalize()} accuracy per epoch",
                             log=False)


def accuracy_by_batch_size_plot(runs: pd.DataFrame) -> bytes:
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for variant, group in runs.groupby("variant"):
        stats = group.groupby("batch_size")["test_accuracy"].agg(["mean", "std", "count"]).fillna(0.0)
        axis.errorbar(stats.index, stats["mean"], yerr=stats["std"], marker="o", capsize=4, color=_color(variant),
                      label=f"{variant} (mean ± std over seeds)")
    axis.set_xscale("log", base=2)
    batch_sizes = sorted(runs["batch_size"].unique())
    axis.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axis.set_xlabel("batch size (images)")
    axis.set_ylabel("final test accuracy (%)")
    axis.set_title("Final test accuracy against batch size")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    return _png(figure)
