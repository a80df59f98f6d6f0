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

from bnsuite.core.claims import (
    REASONS,
    ClaimResult,
    activation_drift,
    generalization_gap,
    held_out_accuracy,
    summary,
    train_accuracy,
)
from bnsuite.core.files import write_atomically
from bnsuite.core.records import RunRecord
from bnsuite.core.registry import study_definition
from bnsuite.core.spec import NOT_SHOWN, SUPPORTED, ClaimSettings, Variant


def claims_table(claims: list[ClaimResult], settings: ClaimSettings | None) -> str:
    if settings is None:
        return "_These runs were made outside a study, so they carry no claim settings and no claim is judged._"
    if not claims:
        return "_No claim applies to these runs (they need both plain and bn)._"
    rows = []
    for c in claims:
        known = settings.known_exception(c.name)
        effect = c.effect
        rows.append({"claim": c.name, "statement": c.statement, "evidence": c.evidence,
                     "effect [interval]": "" if effect is None else (
                         f"{effect.what}: {effect.estimate_and_interval()} ({effect.confidence:.0%})"),
                     "P(improvement)": "" if effect is None else f"{effect.improvement:.2f}",
                     "p": "" if c.p_value is None else f"{c.p_value:.3g}",
                     "verdict": f"**{c.verdict}**",
                     "after Holm over the run's claims": "" if c.holm_p is None else (
                         f"{c.holm_verdict} (p {c.holm_p:.3g}; family of {c.holm_family})"),
                     "what these seeds can show": c.power(), "rule": c.rule,
                     "known exception": f"{known.verdict}: {known.reason}" if known else ""})
    return pd.DataFrame(rows).to_markdown(index=False)


def family_statement(claims: list[ClaimResult]) -> list[str]:
    """What the section's claims are as part of the run's family: how many were judged here, the smallest p their
    seeds allow, and how many supported verdicts survive Holm's correction over every claim the run judged."""
    tested = [claim for claim in claims if claim.comparison is not None and claim.holm_p is not None]
    if not tested:
        return []
    smallest = sorted({claim.comparison.smallest_p for claim in tested})
    supported = [claim for claim in tested if claim.holds]
    survive = [claim for claim in supported if claim.holm_verdict == SUPPORTED]
    alphas = sorted({claim.alpha for claim in tested})
    family = max(claim.holm_family for claim in tested)
    floor = " to ".join(f"{value:.3g}" for value in (smallest[0], smallest[-1])) if len(smallest) > 1 else (
        f"{smallest[0]:.3g}")
    text = (f"{len(tested)} claims were judged here, each by its own one-sided exact "
            f"test at alpha {', '.join(map(str, alphas))} (the claims gate uses these verdicts: each claim is a "
            f"pre-registered test). The family is every claim the run judged, in every study: {family} claims. "
            f"The smallest p the test can give at the seeds used is {floor}, so Holm's step-down correction over "
            f"the family (family-wise alpha {alphas[0]}) keeps a verdict only where p <= {alphas[0]} / {family} = "
            f"{alphas[0] / family:.2g} is possible for the first claim it takes. {len(supported)} verdicts are "
            f"supported here; {len(survive)} of them survive the correction (the \"after Holm\" column).")
    if supported and not survive and smallest[0] > alphas[0] / family:
        text += (" With these seeds no verdict can survive it: a supported claim here means \"every seed of one "
                 "side beat every seed of the other\", one claim at a time, not a family-wise finding.")
    return [text, ""]


NO_RUNS = "_No runs of this study yet._"


def opening(context, title: str, protocol: str) -> list[str]:
    """What every study section starts with: its heading and protocol paragraph, then, where the study has no runs
    yet, the line that says so (the section returns these lines as they are: `if not context.records`).
    `context`: the section's bnsuite.registry.SectionContext."""
    lines = [f"{context.h} {title}", "", protocol, ""]
    return lines if context.records else lines + [NO_RUNS, ""]


def claims_block(context, title: str) -> list[str]:
    """What every study section ends with: its own claims, judged, under "Claims: `title`"."""
    return [f"{context.h} Claims: {title}", "", claims_table(context.own_claims, context.spec.claims), ""]

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
    families = {claim.holm_family for claim in claims if claim.holm_family is not None}
    if families:
        sentences.append(f"- **The family of claims:** each verdict below is followed by its verdict after Holm's "
                         f"correction over all {max(families)} claims the run judged, in every study: what holds "
                         "when every question asked is counted.")
    reasons = list(REASONS) + sorted({claim.reason for claim in claims} - set(REASONS))
    for reason in reasons:
        checked = [claim for claim in claims if claim.reason == reason and claim.name not in said]
        if checked:
            study = ", ".join(dict.fromkeys(study_title(claim.study) for claim in checked))
            verdicts = "; ".join(f"{claim.short}{_at(claim)}: **{claim.verdict}**{_after_holm(claim)}"
                                 f"{_not_shown(claim)}" for claim in checked)
            text = REASONS.get(reason, reason)
            sentences.append(f"- **{text[0].upper()}{text[1:]}** ({study}): {verdicts}.")
    if diverged:
        sentences.append(f"- **Divergence:** {len(diverged)} run(s) diverged: {', '.join(diverged)}.")
    return sentences or ["_Not enough runs for a discussion._"]


def _after_holm(claim: ClaimResult) -> str:
    """The claim's verdict after Holm's correction over the run's whole family of claims, in words."""
    if claim.holm_verdict is None:
        return ""
    return f" (after Holm: {claim.holm_verdict})"


def _not_shown(claim: ClaimResult) -> str:
    """For a claim not shown, what that means at its seeds, in words."""
    if claim.verdict != NOT_SHOWN or claim.comparison is None:
        return ""
    m, n = claim.comparison.sizes
    seeds = f"{m} seeds a side" if m == n else f"{m} and {n} seeds"
    more = claim.comparison.seeds_needed(claim.alpha)
    if more is None:
        return f" (not shown with {seeds}; the measured effect does not point the claim's way)"
    return f" (not shown with {seeds}, which is not shown false; an effect of the measured size needs about {more})"


def _at(claim: ClaimResult) -> str:
    return f" (batch size {claim.batch_size})" if claim.batch_size is not None else ""


def variant_rows(records: list[RunRecord], *, drift: str) -> str:
    """A table with one row per batch size and variant: test accuracy, final training loss and the drift of the
    last hidden layer's inputs (column `drift`; empty where a run was not probed), each over seeds."""
    order = variant_order(records)
    rows = []
    for batch_size, variant in sorted({(r.spec.batch_size, r.spec.variant) for r in records},
                                      key=lambda key: (key[0], order(key[1]))):
        mine = [r for r in records if r.spec.variant == variant and r.spec.batch_size == batch_size]
        finished = [r for r in mine if not r.diverged]
        rows.append({"batch size": batch_size, "variant": variant,
                     "test acc %": summary([r.test_accuracy for r in finished], 2),
                     "final train loss": summary([r.final_train_loss for r in finished], 4),
                     drift: summary([activation_drift(r) for r in mine], 3)
                     if all(r.activations is not None for r in mine) else ""})
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
