"""What every report section is made of: the claims table, the runs table, figures written beside the report,
variant order and colours from the records, and the discussion's lines per reason.

bnsuite.report lays out a report; each study's module (bnsuite.studies) writes
its own section from these parts. Like the rest of the report, they read
records only: a variant's place and colour come from its description in the
records (bnsuite.spec.Variant), never from its name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from bnsuite.claims import REASONS, ClaimResult, generalization_gap, held_out_accuracy, train_accuracy
from bnsuite.files import write_atomically
from bnsuite.records import RunRecord
from bnsuite.registry import study_definition
from bnsuite.spec import ClaimSettings, Variant


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


def write_figure(out: Path, name: str, title: str, png: bytes) -> list[str]:
    """Write a figure beside the report; the markdown lines that show it."""
    write_atomically(out.parent / name, png)
    return [f"![{title}]({name})", ""]


def variants_of(records: Iterable[RunRecord]) -> dict[str, Variant]:
    """The records' variant descriptions by name."""
    return {record.variant.name: record.variant for record in records}


def variant_order(records: Iterable[RunRecord]) -> Callable[[str], tuple[int, str]]:
    """A sort key for variant names: each variant's order as its description gives it, ties by name."""
    orders = {name: variant.order for name, variant in variants_of(records).items()}
    return lambda name: (orders.get(name, 100), name)


def colors(records: Iterable[RunRecord]) -> dict[str, str]:
    return {name: variant.color for name, variant in variants_of(records).items()}


def study_title(name: str) -> str:
    """A study's title, from its definition; its name where its plugin is not loaded here."""
    definition = study_definition(name)
    return definition.title if definition is not None else f"{name} study"


def discussion(claims: list[ClaimResult], *, leading: list[str] = (), said: set[str] = frozenset(),
               diverged: list[str] = ()) -> list[str]:
    """Sentences that each restate a measured number or a claim verdict, nothing else.

    `leading` first (a study's own sentences), then one line per reason the study gives for BN naming the claims
    that check it and their verdicts, except the claims `said` already; then the runs that diverged.
    """
    sentences = list(leading)
    reasons = list(REASONS) + sorted({claim.reason for claim in claims} - set(REASONS))
    for reason in reasons:
        checked = [claim for claim in claims if claim.reason == reason and claim.name not in said]
        if checked:
            study = ", ".join(dict.fromkeys(study_title(claim.study) for claim in checked))
            verdicts = "; ".join(f"{claim.short}{_at(claim)}: **{claim.verdict}**" for claim in checked)
            text = REASONS.get(reason, reason)
            sentences.append(f"- **{text[0].upper()}{text[1:]}** ({study}): {verdicts}.")
    if diverged:
        sentences.append(f"- **Divergence:** {len(diverged)} run(s) diverged: {', '.join(diverged)}.")
    return sentences or ["_Not enough runs for a discussion._"]


def _at(claim: ClaimResult) -> str:
    return f" (batch size {claim.batch_size})" if claim.batch_size is not None else ""

