"""`python -m bnsuite.docs`: the parts of README.md and docs/ that list what the code defines, made from the code.

The table of studies, the claims of each study with its known exceptions, the
verdicts of the committed full reference by reason for BN (judged from its
records as the report judges them), and the table of `--bn-*` options (their
help text, the one source of option descriptions) sit in the documents between
`<!-- bnsuite:NAME -->` and
`<!-- /bnsuite:NAME -->`. `python -m bnsuite.docs` rewrites them;
`python -m bnsuite.docs --check` (and tests/test_docs.py) fails when a document
says something the code no longer does.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from bnsuite.core import registry
from bnsuite.core.claims import REASONS, study_claims
from bnsuite.core.files import write_atomically
from bnsuite.core.records import load_records
from bnsuite.core.report import evaluate_claims
from bnsuite.core.report_parts import study_title
from bnsuite.core.spec import Study, StudySpec, network_prefix
from bnsuite.study import PROFILE_SETTINGS, on_networks, profile_spec

ROOT = Path(__file__).resolve().parents[1]
FULL_REFERENCE = ROOT / "results" / "reference" / "full"
CONVNET_REFERENCE = ROOT / "results" / "reference" / "full-cnn"  # the ConvNet's studies on MNIST
FASHION_REFERENCE = ROOT / "results" / "reference" / "full-cnn-fashion-mnist"  # and on Fashion-MNIST


def pinned_now(records) -> StudySpec:
    """The study spec of a reference's records with the known exceptions the code pins now for its profile,
    dataset, studies and networks (a reference keeps those it was run with; pins made after it are the code's)."""
    recorded = {study.name for record in records for study in record.study.studies}
    networks = {network for record in records for study in record.study.studies for network in study.networks}
    spec = on_networks(profile_spec(records[0].study.profile,
                                    [definition for definition in registry.studies() if definition.name in recorded],
                                    records[0].study.dataset), tuple(sorted(networks, reverse=True)))  # mlp first
    return dataclasses.replace(spec, seeds=records[0].study.seeds)


def _markdown(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _values(values) -> str:
    return ", ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values)


def trains(study: Study) -> str:
    """What a study's matrix trains, in words."""
    text = f"{_values(study.variants)} at batch {_values(study.batch_sizes)}; {study.epochs} epochs"
    if len(study.lrs) > 1:
        text += f"; learning rates {_values(study.lrs)}"
    if len(study.init_scales) > 1:
        text += f"; init scales {_values(study.init_scales)} (x PyTorch's default)"
    return text


def studies_table() -> str:
    """Each registered study: its name, what its full profile trains, and the reasons for BN its claims test."""
    rows = []
    for definition in registry.studies():
        full = profile_spec("full", [definition])
        study = full.studies[0]
        reasons = dict.fromkeys(REASONS.get(claim.reason, claim.reason) for claim in study_claims(full))
        rows.append({"study": f"`{definition.name}`", "what it trains (full profile)": trains(study),
                     "the reasons for BN its claims test": "; ".join(reasons),
                     "runs by default": "yes" if definition.default else (
                         f"by option (`--bn-studies {definition.name}`)")})
    return _markdown(rows)


def claims_tables() -> str:
    """Per study: every claim its full profile judges, the reason it tests, its statement, and each profile's
    known exceptions with the verdict they pin."""
    parts = []
    for definition in registry.studies():
        full = on_networks(profile_spec("full", [definition]), None)  # the ConvNet's claims too
        rows = [{"claim": f"`{claim.name}`", "reason": claim.reason, "statement": claim.statement}
                for claim in study_claims(full)]
        parts += [f"#### `{definition.name}`: {definition.title}", "", _markdown(rows) if rows else "_No claims._", ""]
        known = [{"profile": profile, "claim": f"`{exception.claim}`", "pinned verdict": exception.verdict,
                  "why": exception.reason}
                 for profile in sorted(definition.known_exceptions, key=_profile_order)
                 for exception in definition.known_exceptions[profile]]
        parts += ["Known exceptions: " + ("none." if not known else ""), ""]
        if known:
            parts += [_markdown(known), ""]
    return "\n".join(parts).rstrip()


def _profile_order(key: str) -> tuple[int, str]:
    """Known exceptions' keys (`full`, `full:fashion-mnist`) in the profiles' order, a profile's own dataset first."""
    profile, _, dataset = key.partition(":")
    return list(PROFILE_SETTINGS).index(profile), dataset


def verdicts_table(reference: Path = FULL_REFERENCE) -> str:
    """Each reason for BN the studies test (the study's, then the field's), the studies that test it, and each of
    their claims with its verdict on the committed full reference: judged from its records with the settings they
    recorded, as `python -m bnsuite.report` judges them. A claim the code pins as a known exception says so."""
    records = load_records(reference)
    results = evaluate_claims(records, records[0].study)
    spec = pinned_now(records)
    family = max(result.holm_family or 0 for result in results)
    rows = []
    for reason in list(REASONS) + sorted({result.reason for result in results} - set(REASONS)):
        judged = [result for result in results if result.reason == reason]
        if not judged:
            continue
        verdicts = []
        for result in judged:
            pinned = " (known exception)" if spec.claims.known_exception(result.name) else ""
            after = f", after Holm {result.holm_verdict}" if result.holm_verdict is not None else ""
            verdicts.append(f"`{result.name}`: {result.verdict}{pinned}{after}")
        text = REASONS.get(reason, reason)
        rows.append({"reason for BN": text[0].upper() + text[1:],
                     "studies": ", ".join(dict.fromkeys(study_title(result.study) for result in judged)),
                     f"claims: verdict on the full reference, and after Holm over its {family} claims":
                         "; ".join(verdicts)})
    return _markdown(rows)


def convnet_verdicts_table(convnet: Path = CONVNET_REFERENCE, mlp: Path = FULL_REFERENCE,
                           fashion: Path = FASHION_REFERENCE) -> str:
    """Each claim of the committed ConvNet reference (full profile, `--bn-network cnn`) with its verdict, next to
    the same claim's on the MLP's full reference and on the ConvNet's Fashion-MNIST reference; each judged from its
    records as the report judges them, "(known exception)" where the code pins that verdict now."""
    cnn_records, mlp_records = load_records(convnet), load_records(mlp)
    fashion_records = load_records(fashion) if fashion.is_dir() else []

    def judged(records) -> tuple[dict, StudySpec | None]:
        if not records:
            return {}, None
        return {result.name: result for result in evaluate_claims(records, records[0].study)}, pinned_now(records)

    on_mlp, on_cnn, on_fashion = judged(mlp_records), judged(cnn_records), judged(fashion_records)

    def verdict(result, spec) -> str:
        if result is None:
            return "not judged"
        pinned = " (known exception)" if spec.claims.known_exception(result.name) else ""
        return f"{result.verdict}{pinned}"

    rows = []
    for name, result in on_cnn[0].items():
        mlp_name = name.removeprefix(network_prefix(result.network))
        row = {"claim": f"`{mlp_name}`", "study": study_title(result.study),
               "the study's MLP (10 epochs)": verdict(on_mlp[0].get(mlp_name), on_mlp[1]),
               f"the ConvNet ({cnn_records[0].spec.epochs} epochs)": verdict(result, on_cnn[1])}
        if fashion_records:
            row[f"the ConvNet on Fashion-MNIST ({fashion_records[0].spec.epochs} epochs)"] = verdict(
                on_fashion[0].get(name), on_fashion[1])
        rows.append(row)
    return _markdown(rows)


class _Options:
    """Stands in for pytest's option group: collects what bnsuite.plugin adds."""

    def __init__(self):
        self.options: list[tuple[str, dict]] = []

    def getgroup(self, *args, **kwargs):
        return self

    def addoption(self, name, **kwargs):
        self.options.append((name, kwargs))


def options_table() -> str:
    """Every `--bn-*` option with its help text, as `pytest --help` prints it."""
    from bnsuite import plugin

    collected = _Options()
    plugin.pytest_addoption(collected)
    return _markdown([{"option": f"`{name}`" + (f" ({', '.join(kwargs['choices'])})" if kwargs.get("choices") else ""),
                       "what it does": kwargs["help"]} for name, kwargs in collected.options])


# Each document's generated blocks.
GENERATED: dict[str, dict[str, Callable[[], str]]] = {
    "README.md": {"studies": studies_table, "verdicts": verdicts_table, "convnet": convnet_verdicts_table},
    "docs/studies.md": {"studies": studies_table, "claims": claims_tables},
    "docs/options.md": {"options": options_table},
}


def render(text: str, blocks: dict[str, Callable[[], str]], *, path: str = "document") -> str:
    """`text` with each generated block rewritten; a block marker that is missing is an error naming it."""
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- bnsuite:{name} -->\n)(.*?\n)?(<!-- /bnsuite:{name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{path} has no block <!-- bnsuite:{name} --> ... <!-- /bnsuite:{name} -->; put "
                             "the two markers, each on a line of its own, where the generated text belongs")
        match = pattern.search(text)
        text = text[:match.start()] + match.group(1) + make() + "\n" + match.group(3) + text[match.end():]
    return text


def stale(root: Path = ROOT) -> list[str]:
    """The documents whose generated blocks no longer say what the code defines."""
    return [path for path, blocks in GENERATED.items()
            if render((root / path).read_text(), blocks, path=path) != (root / path).read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnsuite.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which documents are out of date (exit 1)")
    args = parser.parse_args(argv)
    try:
        return _rewrite(check=args.check)
    except ValueError as error:
        print(f"bnsuite.docs: {error}", file=sys.stderr)
        return 2


def _rewrite(*, check: bool) -> int:
    if check:
        out_of_date = stale()
        for path in out_of_date:
            print(f"{path} is out of date: run python -m bnsuite.docs")
        return 1 if out_of_date else 0
    for path, blocks in GENERATED.items():
        text = (ROOT / path).read_text()
        new = render(text, blocks, path=path)
        if new != text:
            write_atomically(ROOT / path, new.encode())
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
