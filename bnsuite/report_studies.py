"""Report sections for the studies that test the reasons given for BN (learning rate, initialization, dropout)
and how BN depends on the batch (ghost batches against LayerNorm).

Each section is a table of what was measured, a figure, and the study's
claims with their evidence; bnsuite.report places them after the batch-size
study. Like the rest of the report, they read records only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bnsuite import plots
from bnsuite.claims import (
    ClaimResult,
    Runs,
    against_layernorm,
    batch_statistics_accuracy,
    generalization_gap,
    ghost_sizes,
    held_out_accuracy,
    highest_trained_lr,
    summary,
    train_accuracy,
    where_bn_falls_behind,
)
from bnsuite.files import write_atomically
from bnsuite.records import RunRecord
from bnsuite.spec import ClaimSettings, Study, StudySpec

VARIANT_ORDER = ("plain", "bn", "plain-dropout", "bn-dropout")


def claims_table(claims: list[ClaimResult], settings: ClaimSettings | None) -> str:
    if settings is None:
        return "_These runs were made outside a study, so they carry no claim settings and no claim is judged._"
    if not claims:
        return "_No claim applies to these runs (they need both plain and bn)._"
    rows = []
    for c in claims:
        known = settings.known_exception(c.name)
        rows.append({"claim": c.name, "statement": c.statement, "evidence": c.evidence, "rule": c.rule,
                     "verdict": f"**{c.verdict}**",
                     "known exception": f"{known.verdict}: {known.reason}" if known else ""})
    return pd.DataFrame(rows).to_markdown(index=False)


def runs_table(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run, with what the studies compare: held-out and training accuracy, loss, divergence."""
    return pd.DataFrame([{
        "variant": r.spec.variant, "batch_size": r.spec.batch_size, "lr": r.spec.lr, "init_scale": r.spec.init_scale,
        "seed": r.spec.seed, "diverged": r.diverged, "diverged_at_epoch": r.diverged_at_epoch,
        "held_out_accuracy": held_out_accuracy(r), "train_accuracy": train_accuracy(r),
        "final_train_loss": r.final_train_loss, "gap": generalization_gap(r),
    } for r in records])


def _cell(values: list[float], digits: int = 2) -> str:
    return summary(values, digits) if values else "n/a"


def _write_figure(out: Path, name: str, title: str, png: bytes) -> list[str]:
    write_atomically(out.parent / name, png)
    return [f"![{title}]({name})", ""]


def _held_out_name(spec: StudySpec) -> str:
    return "validation" if spec.validation_size > 0 else "test"


def _study_claims(claims: list[ClaimResult], study: Study) -> list[ClaimResult]:
    return [claim for claim in claims if claim.study == study.name]


def lr_section(spec: StudySpec, study: Study, records: list[RunRecord], claims: list[ClaimResult], *, out: Path,
               prefix: str, with_plots: bool, h: str) -> list[str]:
    settings = spec.claims
    floor = settings.trained_accuracy
    lines = [f"{h} Learning rate: does BN allow higher learning rates?", "",
             f"Batch size {', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs, learning rates "
             f"{', '.join(f'{lr:g}' for lr in study.lrs)}, seeds {', '.join(map(str, spec.seeds))}. A run *trains* "
             f"when it does not diverge and ends at {floor}% {_held_out_name(spec)} accuracy or more; a diverged "
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
            row[f"{variant} held-out acc %"] = _cell(list(finished["held_out_accuracy"]))
            row[f"{variant} final train loss"] = _cell(list(finished["final_train_loss"]), 4)
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
        lines += _write_figure(out, f"{prefix}learning_rate.png", "Held-out accuracy and training loss against the "
                               "learning rate", plots.learning_rate_plot(table, floor))
    return lines + [f"{h} Claims: learning rate", "", claims_table(_study_claims(claims, study), settings), ""]


def init_section(spec: StudySpec, study: Study, records: list[RunRecord], claims: list[ClaimResult], *, out: Path,
                 prefix: str, with_plots: bool, h: str) -> list[str]:
    settings = spec.claims
    lines = [f"{h} Initialization: is BN less sensitive to it?", "",
             f"Every Linear weight of PyTorch's default initialization multiplied by the init scale (biases and BN "
             f"parameters unchanged); scales {', '.join(f'{k:g}' for k in study.init_scales)}, batch size "
             f"{', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs, learning rate {study.lrs[0]:g}.", ""]
    if not records:
        return lines + ["_No runs of this study yet._", ""]
    table = runs_table(records)
    rows = []
    for (batch_size, scale), at in table.groupby(["batch_size", "init_scale"]):
        row = {"batch size": batch_size, "init scale": f"{scale:g}"}
        for variant in ("plain", "bn"):
            runs = at[at["variant"] == variant]
            row[f"{variant} held-out acc % (diverged count as 0)"] = _cell(list(runs["held_out_accuracy"]))
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
        lines += _write_figure(out, f"{prefix}init_scale.png", "Held-out accuracy against the init scale",
                               plots.init_scale_plot(table))
    return lines + [f"{h} Claims: initialization", "", claims_table(_study_claims(claims, study), settings), ""]


def dropout_section(spec: StudySpec, study: Study, records: list[RunRecord], claims: list[ClaimResult], *,
                    out: Path, prefix: str, with_plots: bool, h: str) -> list[str]:
    settings = spec.claims
    lines = [f"{h} Regularization: does BN reduce the need for dropout?", "",
             f"Dropout after each hidden ReLU in the `-dropout` variants; batch size "
             f"{', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs. Training accuracy is the final "
             "model's, on its own training images in eval mode; the gap is that minus the held-out accuracy.", ""]
    if not records:
        return lines + ["_No runs of this study yet._", ""]
    table = runs_table(records)
    rows = []
    for (batch_size, variant), runs in sorted(table.groupby(["batch_size", "variant"]),
                                              key=lambda item: (item[0][0], _order(item[0][1]))):
        finished = runs[~runs["diverged"]]
        row = {"batch size": batch_size, "variant": variant,
               "train acc % (final model)": _cell(list(finished["train_accuracy"])),
               "held-out acc %": _cell(list(finished["held_out_accuracy"])),
               "gap (points)": _cell(list(finished["gap"]))}
        base = table[(table["batch_size"] == batch_size) & (table["variant"] == variant.removesuffix("-dropout"))]
        if variant.endswith("-dropout") and len(base):
            gains = [with_dropout - without for with_dropout, without in
                     zip(runs.sort_values("seed")["held_out_accuracy"], base.sort_values("seed")["held_out_accuracy"],
                         strict=False)]
            row["gain from dropout (points)"] = _cell(gains)
        rows.append(row)
    lines += [pd.DataFrame(rows).fillna("").to_markdown(index=False, disable_numparse=True), ""]
    if with_plots:
        lines += _write_figure(out, f"{prefix}dropout.png", "Held-out accuracy and generalization gap, with and "
                               "without dropout", plots.dropout_plot(table, VARIANT_ORDER))
    return lines + [f"{h} Claims: regularization", "", claims_table(_study_claims(claims, study), settings), ""]


def ghost_section(spec: StudySpec, study: Study, records: list[RunRecord], claims: list[ClaimResult], *,
                  out: Path, prefix: str, with_plots: bool, h: str) -> list[str]:
    settings = spec.claims
    lines = [f"{h} Batch statistics at small batches: ghost-batch BN against LayerNorm", "",
             f"Batches of {', '.join(map(str, study.batch_sizes))}, {study.epochs} epochs; BN's statistics computed "
             "over ghost batches of g consecutive images within each training batch (`bn-ghostG`; `bn` is g = the "
             "batch). A batch of B with ghost size g computes what data-parallel training on B/g devices computes "
             "without synchronized BN, so this is Wu & He's per-device effect (2018, Fig. 1) without a cluster; the "
             "running estimates follow the first ghost batch, as DistributedDataParallel's broadcast of rank 0's "
             "buffers makes them. LayerNorm (`ln`) normalizes each image over its own features: no statistic "
             "involves another image.", ""]
    if not records:
        return lines + ["_No runs of this study yet._", ""]
    steps = {r.spec.variant: r.training_step for r in records if r.training_step not in (None, "fast")}
    steps = [f"{variant}: {steps[variant]}" for variant in study.variants if variant in steps]
    if steps:
        lines += ["Not covered by the fast step, so trained by the eager step (autograd + torch.optim), as their "
                  "records say: " + ", ".join(steps) + ".", ""]
    runs = Runs({record.spec: record for record in records})
    for batch_size in study.batch_sizes:
        sizes = ghost_sizes(study, batch_size)
        rows = []
        against = (against_layernorm(runs, sizes, batch_size, settings.alpha)
                   if runs.of("ln", batch_size) and all(runs.of(v, batch_size) for v in sizes.values()) else [])
        verdicts = {row.ghost: row for row in against}
        for g, variant in [*sizes.items(), (None, "ln")]:
            mine = runs.of(variant, batch_size)
            if not mine:
                continue
            row = {"variant": variant, "images per statistic": str(g) if g else "1 (its own features)",
                   "held-out acc % (running estimates)": _cell([held_out_accuracy(r) for r in mine]),
                   "held-out acc % (batch statistics)": _cell([v for v in map(batch_statistics_accuracy, mine)
                                                               if v == v]) if g else "",
                   "final train loss": _cell([r.final_train_loss for r in mine], 4)}
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
                                  for g, variant in [*sizes.items(), (None, "ln")]
                                  for r in runs.of(variant, batch_size)])
            name = f"{prefix}ghost_batch{'' if len(study.batch_sizes) == 1 else f'_bs{batch_size}'}.png"
            lines += _write_figure(out, name, "Held-out accuracy against the ghost batch "
                                   "size, LayerNorm as reference", plots.ghost_plot(frame, batch_size))
    return lines + [f"{h} Claims: batch statistics at small batches", "",
                    claims_table(_study_claims(claims, study), settings), ""]


def _order(variant: str) -> int:
    return VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)


SECTIONS = {"lr": lr_section, "init": init_section, "dropout": dropout_section, "ghost": ghost_section}
