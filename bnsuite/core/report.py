"""`python -m bnsuite.report`: the study's records as markdown tables, plots and a discussion.

Every number comes from the records in the results directory and the
pytest-benchmark JSON the report is pointed at, and every sentence of the
discussion from those numbers and the claims' verdicts. What a study asked
for (its matrix, its claim settings, its known exceptions) is read from the
records too: the report imports neither the profiles nor the training stack.
Records made under different protocols (dataset, epochs, training images,
profile, claim settings) are never pooled: each protocol gets its own section,
and the report says when there is more than one. A study with missing runs
is reported as incomplete, with what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bnsuite.core import baseline as gate
from bnsuite.core import plots
from bnsuite.core.claims import ClaimResult, holm, study_claims, summary
from bnsuite.core.files import write_atomically
from bnsuite.core.networks import title as network_title
from bnsuite.core.records import RecordError, RunRecord, epochs_frame, load_records
from bnsuite.core.registry import PluginError, SectionContext, load_plugins, plugin_option, study_definition
from bnsuite.core.report_parts import NO_RUNS, claims_table, colors, discussion, family_statement, variant_order
from bnsuite.core.spec import DEFAULT_NETWORK, ClaimSettings, SpecError, Study, StudySpec, network_prefix
from bnsuite.core.verdicts import StoredVerdict, VerdictsError, load_verdicts, still_valid

DEFAULT_RESULTS = Path("results") / "full"  # where `pytest benchmarks/` saves the full profile's records
DEFAULT_BENCHMARKS = Path(".benchmarks")
OUTSIDE_A_STUDY = "batch"  # the study whose section shows runs made outside a study: plain against BN, per batch size


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    out = args.out or args.results / "REPORT.md"
    try:  # an installed plugin that does not import is left out, said in one line: the records do not need it
        load_plugins(plugin_option(args.plugin), on_broken_entry_point=lambda problem: print(
            f"bnsuite.report: left out a plugin, going on with the records: {problem}", file=sys.stderr))
    except PluginError as error:
        print(f"bnsuite.report: {error}", file=sys.stderr)
        return 2
    try:
        markdown = build_report(args.results, out=out, benchmarks=args.benchmarks, with_plots=not args.no_plots,
                                baseline=args.baseline)
        write_atomically(out, markdown.encode())
    except (RecordError, FileNotFoundError, gate.BaselineError, SpecError, VerdictsError) as error:
        print(f"bnsuite.report: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"bnsuite.report: cannot write {out} ({error.strerror or error}); choose another --out", file=sys.stderr)
        return 2
    print(markdown)
    print(f"\nReport written to {out}", file=sys.stderr)
    return 0


def command_line() -> argparse.ArgumentParser:
    """The command line of `python -m bnsuite.report` (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m bnsuite.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help=f"results directory holding runs/*.json (default: {DEFAULT_RESULTS})")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default: RESULTS/REPORT.md)")
    parser.add_argument("--benchmarks", type=Path, default=DEFAULT_BENCHMARKS,
                        help="pytest-benchmark storage to read timings from (default: .benchmarks)")
    parser.add_argument("--baseline", default="auto",
                        help=f"results directory to report the numbers against; auto: the committed "
                             f"{gate.REFERENCE_DIR}/PROFILE when there is one; none: no such section")
    parser.add_argument("--no-plots", action="store_true", help="write tables only, no PNG figures")
    parser.add_argument("--plugin", default="", metavar="MODULE[,MODULE]",
                        help="plugin modules to import first, for the claims and sections of the studies they "
                             "define (variants need none: records describe them); the bnsuite.plugins entry points "
                             "of installed packages are imported anyway")
    return parser


def build_report(results: Path, *, out: Path, benchmarks: Path | None = None, with_plots: bool = True,
                 baseline: Path | str | None = None) -> str:
    """The report of the records in `results`; `baseline` (a directory, "auto" or None) adds "Against the
    baseline"."""
    records = load_records(results)
    stored, stale = [], []  # the verdicts a study run stored, and those a record changed since has made stale
    for verdict in load_verdicts(results):
        (stored if still_valid(results, verdict) else stale).append(verdict)
    sections = group_records(records)
    lines = ["# bnsuite report: Batch Normalization study", ""]
    if len(sections) > 1:
        lines += [f"> The results hold runs of {len(sections)} different protocols. They are reported in separate "
                  "sections and never pooled into one table.", ""]
    for index, (title, (spec, group)) in enumerate(sections.items(), start=1):
        prefix = "" if len(sections) == 1 else f"protocol{index}-"
        lines += plan_section(title, spec, group, out=out, prefix=prefix, with_plots=with_plots,
                              heading_level=2 if len(sections) == 1 else 3, stored=stored, stale=stale)
    baseline_dir = _baseline_dir(baseline, results, records)
    missing = _missing_reference(baseline, records)
    if missing is not None:  # said, not silent: an installed bnsuite carries no committed references
        lines += ["## Against the baseline", "", f"Not compared: there is no committed reference `{missing}` here "
                  "(references live in a clone of bnsuite's repository, not in the installed package); pass "
                  "`--baseline DIR` to compare with one, or `--baseline none` to leave this section out.", ""]
    if baseline_dir is not None:
        loaded = gate.Baseline.load(baseline_dir)
        try:
            gate.check_protocol(loaded, _one_study(records))
        except gate.BaselineError as error:
            if str(baseline) != "auto":
                raise
            # The committed reference of this profile, found by default, need not match a narrowed study.
            lines += ["## Against the baseline", "", f"Not compared: {error}.", ""]
        else:
            lines += baseline_section(records, loaded, out=out, with_plots=with_plots)
    lines += benchmark_section(benchmarks)
    lines += environment_section(records)
    return "\n".join(lines).rstrip() + "\n"


def _baseline_dir(baseline: Path | str | None, results: Path, records: list[RunRecord]) -> Path | None:
    """The baseline to report against: as given, or with "auto" the committed reference of the records' profile
    when one exists (never the results directory itself)."""
    if baseline is None or str(baseline) == "none":
        return None
    if str(baseline) != "auto":
        return Path(baseline)
    candidate = _reference_of(records)
    if candidate is None or not candidate.is_dir() or candidate.resolve() == Path(results).resolve():
        return None
    return candidate


def _missing_reference(baseline: Path | str | None, records: list[RunRecord]) -> Path | None:
    """With "auto", the committed reference the records' study would be compared with, where it does not exist."""
    if baseline is None or str(baseline) != "auto":
        return None
    candidate = _reference_of(records)
    return candidate if candidate is not None and not candidate.is_dir() else None


def _reference_of(records: list[RunRecord]) -> Path | None:
    """The committed reference directory of the records' one study (results/reference/NAME), None for several."""
    names = {gate.results_name(record.study) for record in records if record.study is not None}
    return gate.reference_dir(names.pop()) if len(names) == 1 else None


def baseline_section(records: list[RunRecord], baseline: gate.Baseline, *, out: Path, with_plots: bool) -> list[str]:
    """Per configuration: the baseline's numbers and now's, the change and the gate's verdict; a figure."""
    comparisons = gate.compare(records, baseline)
    rows = []
    for comparison in comparisons:
        accuracy, loss = comparison.metrics
        row = {"configuration": comparison.name, "rule": comparison.rule, "verdict": comparison.verdict}
        loss_change = f"{loss.change:+.1%}" if math.isfinite(loss.change) else "n/a (a diverged run)"
        for metric, change in ((accuracy, f"{accuracy.change:+.2f} points"), (loss, loss_change)):
            row[f"{metric.metric}: baseline"] = gate.summary(metric.baseline)
            row[f"{metric.metric}: now"] = gate.summary(metric.now)
            row[f"{metric.metric}: change"] = change
        rows.append(row)
    only_now, only_baseline = gate.unmatched([r.spec for r in records], baseline)
    lines = ["## Against the baseline", "",
             f"Baseline: `{baseline.directory}` ({len(baseline.records)} runs). Where a run's environment "
             "fingerprint and group equal its baseline run's, the exact rule requires every figure to be equal bit "
             "for bit; elsewhere the statistical rule compares final held-out accuracy and final training loss over "
             f"seeds: worse fails when a one-sided permutation test gives p <= {gate.ALPHA} after the new runs are "
             f"given a margin (the larger of {gate.ACCURACY_MARGIN} points or {gate.LOSS_MARGIN:.0%} and "
             f"{gate.SPREAD_FACTOR:g} times the baseline's seed standard deviation); better is reported, not failed.",
             ""]
    if rows:
        lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    failed = [c for c in comparisons if c.failed]
    lines += [f"{len(failed)} of {len(comparisons)} configurations fail the gate"
              + (": " + "; ".join(c.describe() for c in failed) if failed else "") + ".", ""]
    for label, names in (("Not in the baseline", only_now), ("In the baseline only", only_baseline)):
        if names:
            lines += [f"{label} (not compared): {', '.join(names)}.", ""]
    if with_plots and rows:
        spec = records[0].study
        first = _records_of(spec, spec.studies[0], records) if spec else records  # the first study's runs
        wanted = {gate.configuration(r.spec) for r in first}
        theirs = [r for r in baseline.records.values() if gate.configuration(r.spec) in wanted]
        if theirs:
            label = first[0].spec.held_out
            name = "against_baseline.png"
            write_atomically(out.parent / name, plots.baseline_plot(epochs_frame(first), epochs_frame(theirs),
                                                                    f"{label}_accuracy", label, colors(first)))
            lines += [f"![{label.capitalize()} accuracy per epoch against the baseline]({name})", ""]
    return lines


def _one_study(records: list[RunRecord]) -> StudySpec:
    studies = {record.study for record in records} - {None}
    if len(studies) != 1:
        raise gate.BaselineError("a report against a baseline needs the results of one study run; these records "
                                 f"come from {len(studies)} studies")
    return studies.pop()


def protocol_key(record: RunRecord) -> str:
    """The protocol a record was made under, as one line; records with different lines are never pooled."""
    protocol = record.spec.protocol()
    train = record.spec.train_size
    held_out = "seed protocol, no validation split" if protocol["validation_size"] == 0 else (
        f"{protocol['validation_size']} validation images")
    first = record.study.studies[0] if record.study else None  # the study the protocol line speaks for
    epochs, lr = (first.epochs, first.lrs[0] if len(first.lrs) == 1 else None) if first else (None, None)
    if record.study is None:
        epochs, lr = record.spec.epochs, record.spec.lr
    line = f"profile {record.profile or 'none'}: {protocol['dataset']}, "
    line += f"{epochs} epochs, " if epochs is not None else ""
    line += f"{train} training images ({held_out}), SGD "
    line += f"lr {lr} " if lr is not None else ""
    return line + f"momentum {protocol['momentum']}"


def group_records(records: list[RunRecord]) -> dict[str, tuple[StudySpec | None, list[RunRecord]]]:
    """Records by what their study asked for (or, made outside a study, by their protocol), one section each.

    A section's title is its protocol; the claim settings are named only where they tell sections apart.
    """
    groups: dict[tuple[str, StudySpec | None], list[RunRecord]] = defaultdict(list)
    for record in records:
        groups[(protocol_key(record), record.study)].append(record)
    by_run = {record.spec: record for record in records}  # a results directory holds one record per run
    for (_, spec), group in groups.items():
        # A run two studies share is one record, written by whichever study's pytest run trained it last: it
        # belongs to each study that asks for it, not only to the one it names.
        present = {record.spec for record in group}
        group += [by_run[run] for run in (spec.run_specs() if spec else ()) if run in by_run and run not in present]
    lines = [line for line, _ in groups]
    titled = {}
    for (line, spec), group in groups.items():
        title = line if lines.count(line) == 1 else f"{line}, {_describe_settings(spec.claims if spec else None)}"
        while title in titled:  # same protocol and claim settings, other matrices
            title += " (another study)"
        titled[title] = (spec, group)
    return titled


def _describe_settings(settings: ClaimSettings | None) -> str:
    if settings is None:
        return "made outside a study (no claim settings)"
    return (f"claims at target loss {settings.target_loss}, alpha {settings.alpha}, "
            f"margin {settings.accuracy_margin} points")


def plan_section(title: str, spec: StudySpec | None, records: list[RunRecord], *, out: Path, prefix: str,
                 with_plots: bool, heading_level: int, stored: list[StoredVerdict] = (),
                 stale: list[StoredVerdict] = ()) -> list[str]:
    """One section: the protocol, what is missing, then each study's section in the order the studies run. A study
    not registered here shows the verdicts its run stored (`stored`, bnsuite.verdicts) for its claims."""
    h = "#" * heading_level
    lines = [f"{h} Protocol", "", f"{title}.", ""]
    lines += completeness(records, spec)
    if spec is None:  # runs made outside a study: the batch-size study's tables of them, without claims
        section = study_definition(OUTSIDE_A_STUDY).section
        return lines + section(SectionContext(spec=None, study=None, records=records, claims=[], out=out,
                                              prefix=prefix, with_plots=with_plots, h=h))
    definitions = {study.name: study_definition(study.name) for study in spec.studies}
    unregistered = {name for name, definition in definitions.items() if definition is None}
    judged_here = [claim.evaluate(records) for claim in study_claims(spec)]
    # the family: every claim judged here, and the stored verdicts of the studies whose code is not here
    files = {record.filename for record in records}  # a stored verdict belongs to the section whose runs it judged
    from_store = [verdict.result for verdict in stored
                  if verdict.result.study in unregistered and set(verdict.judged) <= files]
    claims = holm(judged_here + from_store)
    if not any(definition is not None and definition.discusses for definition in definitions.values()):
        lines += [f"{h} Discussion", ""] + discussion(claims) + [""]
    for study in spec.studies:
        definition = definitions[study.name]
        if definition is None:
            own = [claim for claim in claims if claim.study == study.name]
            gone = sorted(verdict.result.name for verdict in stale if verdict.result.study == study.name)
            lines += [f"{h} Study {study.name}", "",
                      f"_The study {study.name!r} is not registered here, so its own section is not shown: load the "
                      "plugin that defines it with `python -m bnsuite.report --plugin MODULE`. Its runs and the "
                      "verdicts its run stored with them (bnsuite.verdicts) follow._", "",
                      runs_table(_records_of(spec, study, records)), ""]
            lines += [f"{h} Claims: {study.name} (as stored by its run)", "",
                      claims_table(own, spec.claims) if own else "_No stored verdict for its claims._", ""]
            if gone:
                lines += [f"_Stored verdicts not shown, as a record they judged has changed since: "
                          f"{', '.join(gone)}; run the study's claims again._", ""]
        else:
            for network in study.networks:  # one section per network, each with its own runs and claims
                lines += _network_section(definition, spec, dataclasses.replace(study, networks=(network,)),
                                          records, claims, out, prefix, with_plots, h)
    family = family_statement(claims)
    return lines + ([f"{h} The claims as a family", ""] + family if family else [])


def _network_section(definition, spec: StudySpec, study: Study, records: list[RunRecord], claims: list,
                     out: Path, prefix: str, with_plots: bool, h: str) -> list[str]:
    """A study's section on the one network of `study`: its runs, its claims, figures named apart by network;
    the ConvNet's heading says so."""
    network = study.networks[0]
    claims = [claim for claim in claims if claim.network == network]
    if definition.section is not None:
        lines = definition.section(SectionContext(spec, study, _records_of(spec, study, records), claims, out,
                                                  prefix + network_prefix(network), with_plots, h))
    else:  # a study without a section of its own: its runs, then its claims
        lines = [f"{h} {definition.title[:1].upper()}{definition.title[1:]}", "",
                 runs_table(_records_of(spec, study, records)), "",
                 f"{h} Claims: {definition.title}", "",
                 claims_table([c for c in claims if c.study == study.name], spec.claims), ""]
    if network != DEFAULT_NETWORK:
        first = next((index for index, line in enumerate(lines) if line.startswith("#")), None)
        if first is not None:
            lines = [*lines[:first], f"{lines[first]}, on the {network_title(network)}", *lines[first + 1:]]
    return lines


def _records_of(spec: StudySpec, study: Study | None, records: list[RunRecord]) -> list[RunRecord]:
    """The records of one study of `spec` (none if the spec has no such study)."""
    if study is None:
        return []
    wanted = set(spec.study_runs(study))
    return [record for record in records if record.spec in wanted]


def completeness(records: list[RunRecord], spec: StudySpec | None) -> list[str]:
    """Which runs the section's study asked for and are missing, and which runs diverged."""
    present = {record.spec for record in records}
    expected = set(spec.run_specs()) if spec else set()
    missing = [run for run in (spec.run_specs() if spec else []) if run not in present]
    diverged = [r.spec.case_id for r in records if r.diverged]
    lines = []
    if missing:
        names = ", ".join(run.case_id for run in missing[:12]) + (
            f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        lines += [f"> **The study is incomplete:** {len(present & expected)} of {len(expected)} runs are present; "
                  f"missing: {names}. Numbers below use the runs that finished.", ""]
    if diverged:
        shown = ", ".join(diverged[:12]) + (f" and {len(diverged) - 12} more" if len(diverged) > 12 else "")
        lines += [f"> **Diverged runs:** {shown} (training loss blew up; they stop at that epoch, "
                  "count as the worst outcome in the claims, and are left out of means).", ""]
    return lines


def runs_table(records: list[RunRecord]) -> str:
    """A study's runs without a section of their own: per network, variant, batch size, learning rate and init
    scale, the seeds' final training loss and test accuracy."""
    if not records:
        return NO_RUNS
    rows = []
    keys = sorted({(r.spec.network, r.spec.variant, r.spec.batch_size, r.spec.lr, r.spec.init_scale)
                   for r in records}, key=lambda key: (key[0], variant_order(records)(key[1]), *key[2:]))
    for network, variant, batch_size, lr, scale in keys:
        mine = [r for r in records if (r.spec.network, r.spec.variant, r.spec.batch_size, r.spec.lr,
                                       r.spec.init_scale) == (network, variant, batch_size, lr, scale)]
        rows.append({"network": network, "variant": variant, "batch size": batch_size, "lr": lr,
                     "init scale": scale, "final train loss": summary([r.final_train_loss for r in mine], 4),
                     "test acc %": summary([r.test_accuracy for r in mine], 2)})
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def evaluate_claims(records: list[RunRecord], spec: StudySpec | None) -> list[ClaimResult]:
    """The claims of the section's studies, judged with the settings they recorded; none without a study."""
    return holm([claim.evaluate(records) for claim in study_claims(spec)]) if spec else []


def benchmark_section(benchmarks: Path | None) -> list[str]:
    """pytest-benchmark's timing of each case and the speed benchmark's figures, from one saved run.

    `benchmarks` is a pytest-benchmark JSON file, or a storage directory whose
    newest run (by pytest-benchmark's run counter) that timed study cases is
    used. Benchmarks are recognised by the `bnsuite` kind their extra_info
    carries (benchmarks/), never by test names.
    """
    if benchmarks is None or not benchmarks.exists():
        return []
    paths = [benchmarks] if benchmarks.is_file() else sorted(benchmarks.glob("*/*.json"), key=lambda p: p.name)
    for path in reversed(paths):
        data = read_benchmark_json(path)
        cases = [bench for bench in data.get("benchmarks", []) if _kind(bench) == "case"]
        if not cases:
            continue
        rows = [{"case": bench["extra_info"]["case"],
                 "profile": bench["extra_info"]["profile"],
                 "runs": len(bench["extra_info"]["runs"]),
                 "wall time for the case (s)": f"{bench['stats']['median']:.2f}",
                 "rounds": bench["stats"]["rounds"]} for bench in cases]
        return ["## pytest-benchmark timings", "",
                f"From `{path}` ({data.get('datetime', 'unknown time')}); one round per case, each case "
                "training its runs together, training and per-epoch evaluation included.", "",
                pd.DataFrame(rows).to_markdown(index=False), ""] + study_floor_rows(data) + speed_rows(data)
    return []


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"  # a smoke study's floor is under a second


def study_floor_rows(data: dict) -> list[str]:
    """The whole study against its floor (bnsuite.speed.StudyFloor), as the pytest session wrote it into the JSON."""
    floor = (data.get("bnsuite") or {}).get("study_floor")
    if not isinstance(floor, dict):
        return []  # saved before the whole-study figure, or by a session that trained no case
    cpu = ((data.get("machine_info") or {}).get("cpu") or {}).get("brand_raw", "this machine")
    wall = floor.get("wall_time_s")
    row = {"machine": cpu, "runs": floor["runs"], "run-epochs": floor["run_epochs"],
           "training GFLOP": f"{floor['gflop']:,.0f}", "matmul peak (GFLOP/s)": f"{floor['peak_gflops']:.0f}",
           "floor: compute / traffic (s)": f"{_seconds(floor['compute_s'])} / {_seconds(floor['traffic_s'])}",
           "floor (s)": _seconds(floor['floor_s']), "training time (s)": _seconds(floor['train_time_s']),
           "training / floor": f"{floor['train_ratio']:.2f}x",
           "wall time (s)": "not measured" if wall is None else _seconds(wall),
           "wall / floor": "" if wall is None else f"{floor['wall_ratio']:.2f}x"}
    return ["### The whole study against its floor (bnsuite.speed.StudyFloor)", "",
            "Each run's floor is its step roofline summed over what it trained: its matmul FLOPs at the measured "
            "float32 matmul peak, or the least bytes its steps must move at the bandwidth measured over their "
            "working set, whichever is larger; the study's floor sums them. Training time sums the records' "
            "training times (evaluation excluded); wall time is the pytest session's, from the plugin's start "
            "to the benchmark JSON (start-up, data, evaluation, probes and the speed benchmark included).", "",
            pd.DataFrame([row]).to_markdown(index=False, disable_numparse=True), ""]


def read_benchmark_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: not a readable pytest-benchmark JSON file ({error}); "
                          "delete it or point --benchmarks elsewhere") from error
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):
        raise RecordError(f"{path}: not a pytest-benchmark JSON file (no list of benchmarks)")
    return data


def _kind(bench: dict) -> str | None:
    info = bench.get("extra_info") if isinstance(bench, dict) else None
    return info.get("bnsuite") if isinstance(info, dict) else None


@dataclass(frozen=True)
class SpeedTable:
    """One table of a benchmark run's speed figures: the benchmarks whose extra_info "bnsuite" is `kind` (or one of
    them, a tuple naming a kind's earlier names too), one row from each (`row(info)`), under `heading` and the
    paragraph `text(data, infos)`."""

    kind: str | tuple[str, ...]
    heading: str
    text: Callable[[dict, list[dict]], str]
    row: Callable[[dict], dict]


def speed_rows(data: dict) -> list[str]:
    """The speed figures of a benchmark run (benchmarks/test_speed.py, benchmarks/test_tools.py), each measured side
    by side in that run: a table per kind of benchmark it holds, in SPEED_TABLES' order."""
    lines = []
    for table in SPEED_TABLES:
        kinds = table.kind if isinstance(table.kind, tuple) else (table.kind,)
        infos = [bench.get("extra_info", {}) for bench in data.get("benchmarks", []) if _kind(bench) in kinds]
        if infos:
            rows = pd.DataFrame([table.row(info) for info in infos]).fillna("")
            lines += [f"### {table.heading}", "", table.text(data, infos), "",
                      rows.to_markdown(index=False, disable_numparse=True), ""]
    return lines


def _path_row(info: dict) -> dict:
    epoch_s, speedup = info["epoch_s"], info["speedup"]
    return {
        "variant": info["variant"], "batch size": info["batch_size"],
        **{f"{label} (s/epoch)": f"{epoch_s[key]:.2f}" for key, label in PATH_LABELS if key in epoch_s},
        "speed-up vs original": f"{speedup['original']:.2f}x",
        "vs eager": f"{speedup['eager']:.2f}x",
        **({"vs the ATen step together": f"{speedup['aten']:.2f}x"} if "aten" in speedup else {}),
        "vs one run alone": f"{speedup['one_run']:.2f}x",
        "rounds": info["rounds"], "step": info.get("step", "fast"),
    }


def _paths_text(data: dict, infos: list[dict]) -> str:
    images = {info["images"] for info in infos}
    return (f"Each round trains one epoch over {' or '.join(f'{n:,}' for n in sorted(images))} training "
            "images through every path in turn; a speed-up is the median over rounds of the round's time "
            "ratio. The study's way trains the seeds together through its step (`step`: the fused C step, "
            "with the compiler that built it, or the ATen fast step where none could); its time is per run. "
            "The ATen step with the same seeds together is the fallback's speed, measured beside it.")


def _fraction_row(info: dict) -> dict:
    row = {
        "variant": info["variant"], "batch size": info["batch_size"],
        "runs together": info["runs_together"], "images": f"{info['images']:,}" if "images" in info else "",
        "epoch (s per run)": f"{info['epoch_s_per_run']:.2f}",
        "GFLOP/s": f"{info['achieved_gflops']:.1f}",
        "fraction of matmul peak": f"{info['fraction_of_matmul_peak']:.2f}",
    }
    if "fraction_of_roofline" in info:  # benchmarks saved before the roofline have the peak only
        row.update({
            "MB a step (least)": f"{info['bytes_per_step'] / 1e6:.1f}",
            "working set (MB)": f"{info['working_set_bytes'] / 1e6:.1f}",
            "GB/s over it": f"{info['bandwidth_gbps']:.1f}",
            "bound: compute / traffic (ms a step)":
                f"{1e3 * info['compute_bound_s']:.2f} / {1e3 * info['traffic_bound_s']:.2f}",
            "step (ms)": f"{1e3 * info['step_s']:.2f}",
            "fraction of roofline bound": f"{info['fraction_of_roofline']:.2f} ({info['limit']})",
            "matmuls alone (ms; fraction of peak)":
                f"{1e3 * info['matmul_s']:.2f}; {info['matmul_fraction_of_peak']:.2f}",
        })
    if info.get("update_s") is not None:  # benchmarks saved before the update was timed lack these
        row.update({"update alone (ms)": f"{1e3 * info['update_s']:.2f}",
                    "most reachable fraction": f"{info['fraction_of_roofline_ceiling']:.2f}"})
    row["step"] = info.get("step", "fast")
    return row


def _fractions_text(data: dict, infos: list[dict]) -> str:
    peak = memory = None
    for bench in data.get("benchmarks", []):
        if _kind(bench) == "matmul-peak":
            peak, memory = bench["extra_info"]["peak_gflops"], bench["extra_info"].get("memory_bandwidth_gbps")
    return ("Float32 matmul peak" + (f" {peak:.1f} GFLOP/s" if peak else "") + "; copy bandwidth over 256 MiB"
            + (f" {memory:.1f} GB/s" if memory else "") + ". A step's bound is the larger of its matmul FLOPs "
            "at the peak (compute) and the least bytes it must move (parameters, gradients and momentum "
            "read and written once each, images read once, activations and their gradients written and read "
            "once) at the copy bandwidth measured over a buffer as large as its working set (traffic); the "
            "fraction of the bound is that bound over the measured step. Matmuls alone: the step's GEMMs at "
            "its shapes, run as the step runs them, timed without the rest of the step; update alone: its "
            "SGD update, likewise. The most "
            "reachable fraction is the bound over those two together: a step that spent nothing on BN, ReLU "
            "and the loss would reach it, with the BLAS library's GEMMs at these shapes.")


def _own_layer_row(info: dict) -> dict:
    epoch_s = info["epoch_s"]
    return {"variant": info["variant"], "batch size": info["batch_size"],
            "runs together": info["runs_together"], "images": f"{info['images']:,}",
            "step": info["steps"]["compiled"],
            "compiled (s per run-epoch)": f"{epoch_s['compiled']:.3f}",
            "eager, one seed at a time (s)": f"{epoch_s['eager']:.3f}",
            "fused bn (s)": f"{epoch_s['fused bn']:.3f}",
            "vs eager": f"{info['speedup_vs_eager']:.2f}x",
            "times the fused bn": f"{info['times_the_fused_bn']:.2f}x",
            "fraction of roofline bound": f"{info['fraction_of_roofline']:.2f} ({info['limit']})"}


def _network(info: dict) -> dict:
    """The network a network-paths or network-fraction benchmark measured; a file from before these kinds measured
    the ConvNet under "convnet-paths" and "convnet-fraction"."""
    return {"network": info.get("network_title") or info.get("network") or "ConvNet"}


def _network_path_row(info: dict) -> dict:
    epoch_s, speedup = info["epoch_s"], info["speedup"]
    # A benchmark file from before the fused ConvNet step has no channels-last eager path nor step name; a network
    # that does not lay its maps out channels-last has no NCHW path.
    return {**_network(info), "variant": info["variant"], "batch size": info["batch_size"],
            "images": f"{info['images']:,}", "step": info.get("step", "eager"),
            "runs together": info.get("runs_together", 1),
            "original pipeline (s)": f"{epoch_s['original']:.2f}",
            "eager step, NCHW (s)": f"{epoch_s['nchw']:.2f}" if "nchw" in epoch_s else "",
            "eager step (s)": f"{epoch_s['eager']:.2f}" if "eager" in epoch_s else "",
            "the study's way, per run (s)": f"{epoch_s['study']:.2f}",
            "speed-up vs original": f"{speedup['original']:.2f}x",
            "vs NCHW": f"{speedup['nchw']:.2f}x" if "nchw" in speedup else "",
            "vs eager": f"{speedup['eager']:.2f}x" if "eager" in speedup else "",
            "rounds": info["rounds"]}


def _network_fraction_row(info: dict) -> dict:
    return {
        **_network(info), "variant": info["variant"], "batch size": info["batch_size"],
        "images": f"{info['images']:,}", "step": info.get("step", "eager"), "runs together": info["runs_together"],
        "epoch per run (s)": f"{info['epoch_s_per_run']:.2f}", "GFLOP/s": f"{info['achieved_gflops']:.1f}",
        "fraction of matmul peak": f"{info['fraction_of_matmul_peak']:.3f}",
        "MB a step (least)": f"{info['bytes_per_step'] / 1e6:.1f}",
        "bound: compute / traffic (ms a step)":
            f"{1e3 * info['compute_bound_s']:.2f} / {1e3 * info['traffic_bound_s']:.2f}",
        "step (ms)": f"{1e3 * info['step_s']:.2f}",
        "fraction of roofline bound": f"{info['fraction_of_roofline']:.3f} ({info['limit']})"}


def _tools_row(info: dict) -> dict:
    return {"records": f"{info['records']:,}",
            **{f"{step} (s)": f"{seconds:.2f}" for step, seconds in info["seconds"].items()}}


def _said(text: str) -> Callable[[dict, list[dict]], str]:
    return lambda data, infos: text


SPEED_TABLES = (
    SpeedTable("paths", "Speed: one epoch at batch 64 through each training path (benchmarks/test_speed.py)",
               _paths_text, _path_row),
    SpeedTable("fraction", "Speed: the study's way against the roofline (benchmarks/test_speed.py, bnsuite.speed)",
               _fractions_text, _fraction_row),
    SpeedTable("own-layer", "Speed: a layer of one's own on the compiled step", _said(
        "A layer no fused step covers (`bn-scratch`: BatchNorm1d written out in Python, as a user's layer is), "
        "the study's seeds together on the compiled step (bnsuite.compiled), against the eager step one seed "
        "at a time and the fused step's `bn` on the same network and images: the second epoch of two (the "
        "first pays the compilation), median of alternating rounds."), _own_layer_row),
    SpeedTable(("network-paths", "convnet-paths"), "Speed: the other networks' epochs through each path "
               "(benchmarks/test_speed.py)", _said(
        "Each network the study trained besides the MLP, at batch 64 on the images named, every path in turn each "
        "round, the speed-up the median of the rounds' ratios: the original pipeline (torchvision Dataset + "
        "DataLoader, eager autograd), the eager step on tensor batches, one run (for the ConvNet in NCHW and in "
        "channels-last, the layout it trains in), and the study's way (the step named, the study's seeds trained "
        "together; its time per run)."), _network_path_row),
    SpeedTable(("network-fraction", "convnet-fraction"), "Speed: the other networks against the roofline", _said(
        "A network's FLOPs are its training step's matrix products and convolutions as torch counts them "
        "(bnsuite.speed.training_flops_per_sample); its least traffic its parameters' state, its images and its "
        "activations and their gradients, each moved once."), _network_fraction_row),
    SpeedTable("tools", "Speed: loading, the report and the baseline comparison over many records", _said(
        "Valid records made from the smoke reference's (every study, both networks, 21 seeds): loading them, "
        "building the report (no figures) and comparing them with themselves as a baseline "
        "(benchmarks/test_tools.py)."), _tools_row),
)


PATH_LABELS = (("original", "original pipeline"), ("eager", "eager autograd"), ("aten", "ATen step, together"),
               ("one_run", "one run alone"), ("study", "the study's way"))


def environment_section(records: list[RunRecord]) -> list[str]:
    rows: dict[tuple, int] = {}
    for record in records:
        env = record.environment
        key = (env.torch_version, env.device, env.device_name, env.threads, env.git_commit, env.dataset_checksum,
               env.cpu_capability, env.blas, record.executor, env.hostname)
        rows[key] = rows.get(key, 0) + 1
    table = pd.DataFrame(
        [{"torch": k[0], "device": k[1], "device name": k[2], "threads": k[3], "commit": k[4] or "unknown",
          "dataset MD5 (combined)": k[5], "runs": count,
          "CPU kernels": k[6] or "not recorded", "BLAS": k[7] or "not recorded",
          "ran by": k[8], "on host": k[9] or "not recorded"} for k, count in rows.items()]
    )
    return ["## Environment the records came from", "", table.to_markdown(index=False), ""]


if __name__ == "__main__":
    sys.exit(main())
