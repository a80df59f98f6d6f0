"""Regression gates on what the study measures: new records against a baseline's records of the same runs.

The claims compare variants within one run of the study and pytest-benchmark
compares times; this module notices when the numbers themselves move. Each
run configuration (a spec up to its seed: `bn-bs64`, `plain-bs64-lr0.3`) is
compared with the baseline's runs of the same configuration under one of two
rules, chosen from what the records say produced them:

- exact: every run was made in the same environment (the record's
  environment fingerprint: CPU model and vector flags, ATen dispatch, BLAS,
  torch, threads, device, dataset), trained in the same group as its
  baseline run and by the same training step (`training_step`: the fused
  step and the compiler that built it, or the ATen one). The determinism contract (docs/determinism.md) then promises
  identical records, so every per-epoch figure and every final metric must be
  equal bit for bit (times excepted); the first difference names the run, the
  epoch and the metric.
- statistical: otherwise. Final held-out accuracy and final training loss
  are compared over seeds with an exact one-sided permutation test (the
  claims' test, bnsuite.claims.p_smaller) shifted by a margin: the new runs
  are worse only if they stay worse after being given the margin, at
  p <= ALPHA. Worse fails; better is reported, never failed. The margin
  grows with the baseline's seed spread (`ACCURACY_MARGIN`, `LOSS_MARGIN`,
  `SPREAD_FACTOR`, chosen from the measurements in docs/gates.md, "Why
  these margins").

A baseline made under another protocol (profile, dataset, training images,
epochs, learning rate) is refused with what differs (`BaselineError`);
configurations present on one side only are listed, not gated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bnsuite.core import claims
from bnsuite.core.claims import held_out_accuracy, p_smaller
from bnsuite.core.records import RUNS_SUBDIR, RecordError, RunRecord, load_records
from bnsuite.core.spec import DEFAULT_NETWORK, RunSpec, StudySpec

REFERENCE_DIR = Path("results") / "reference"  # the committed reference of each profile: results/reference/PROFILE
ALPHA = 0.05
# The margin a metric may move by before the test is asked whether the move is real: the larger of a floor and
# SPREAD_FACTOR times the baseline's seed-to-seed standard deviation. Floors: points of final held-out accuracy,
# and the relative rise of the final training loss. Measured, in docs/gates.md ("Regression gates": another CPU or
# thread count moves stable configurations' means by up to 0.2 points, and re-rolls the chaotic ones (training
# at the edge of divergence) like a new seed.
ACCURACY_MARGIN = 0.3
LOSS_MARGIN = 0.1
SPREAD_FACTOR = 2.0
EXACT, STATISTICAL = "exact", "statistical"
IDENTICAL, DIFFERS, WITHIN, WORSE, BETTER = "identical", "differs", "within the margin", "worse", "better"
FAILING = (DIFFERS, WORSE)
# The per-epoch and final figures the exact rule compares (times are never equal twice, so never compared).
EPOCH_METRICS = ("train_loss", "train_accuracy", "validation_loss", "validation_accuracy", "test_loss",
                 "test_accuracy")
FINAL_METRICS = ("test_loss", "test_accuracy", "final_train_loss_eval", "final_train_accuracy_eval", "steps",
                 "diverged_at_epoch")


class BaselineError(ValueError):
    """A baseline cannot gate this study: missing, unreadable, of another protocol, or the study's own output."""


def configuration(spec: RunSpec) -> RunSpec:
    """A run's configuration: its spec with the seed set aside, the unit the gate compares over seeds."""
    return dataclasses.replace(spec, seed=0)


def configuration_name(spec: RunSpec) -> str:
    """`bn-bs64-lr0.3 (10 epochs)`: the epochs tell apart a study's configurations that differ only in them."""
    return f"{spec.case_id.rsplit('-seed', 1)[0]} ({spec.epochs} epoch{'s' if spec.epochs > 1 else ''})"


@dataclass(frozen=True)
class MetricComparison:
    """One metric of one configuration under the statistical rule."""

    metric: str
    baseline: tuple[float, ...]
    now: tuple[float, ...]
    change: float  # accuracy: points, now minus baseline; loss: relative, now / baseline - 1
    margin: float  # accuracy: points; loss: relative
    p_worse: float  # one-sided p that the new runs are worse by more than the margin
    p_better: float
    verdict: str  # WITHIN, WORSE or BETTER


@dataclass(frozen=True)
class Comparison:
    """A configuration's new runs against the baseline's: the rule applied, its verdict and why."""

    name: str
    rule: str
    verdict: str
    detail: str
    metrics: tuple[MetricComparison, ...] = ()  # both metrics under either rule; only the statistical judges them

    @property
    def failed(self) -> bool:
        return self.verdict in FAILING

    def describe(self) -> str:
        return f"{self.name}: {self.verdict} ({self.rule} rule): {self.detail}"


@dataclass(frozen=True)
class Baseline:
    """The records of a baseline directory, by spec, and the one study they were made under."""

    directory: Path
    study: StudySpec
    records: dict[RunSpec, RunRecord]

    @classmethod
    def load(cls, directory: Path | str, *, role: str = "baseline") -> Baseline:
        """The records of `directory`, the results of one study run; errors name it by its `role` (the baseline,
        or the results compared with one)."""
        directory = Path(directory)
        try:
            records = load_records(directory)
        except (FileNotFoundError, RecordError) as error:
            raise BaselineError(f"{role} {directory}: {error}") from None
        studies = {record.study for record in records}
        if None in studies:
            raise BaselineError(f"{role} {directory}: it holds runs made outside a study, which say nothing of "
                                "the protocol they belong to; use the results directory of a study run")
        if len(studies) > 1:
            profiles = sorted({study.profile for study in studies})
            raise BaselineError(f"{role} {directory}: its records come from {len(studies)} different studies "
                                f"(profiles {', '.join(profiles)}); use the results of one study run")
        return cls(directory, studies.pop(), {record.spec: record for record in records})

    def configurations(self) -> dict[RunSpec, list[RunRecord]]:
        return by_configuration(self.records.values())


def protocol_differences(baseline: StudySpec, study: StudySpec) -> list[str]:
    """What differs between the protocols of a baseline's study and this one, in words; empty if comparable.

    Differences in what is run (variants, batch sizes, seeds, which studies) are not protocol differences:
    they leave configurations on one side only, which the gate lists.
    """
    differences = []
    for field in ("profile", "dataset", "validation_size", "train_subset", "device"):
        mine, theirs = getattr(study, field), getattr(baseline, field)
        if mine != theirs:
            differences.append(f"{field.replace('_', ' ')}: baseline {theirs}, this study {mine}")
    for mine in study.studies:
        theirs = baseline.study(mine.name)
        if theirs is None:
            continue
        if mine.epochs != theirs.epochs:
            differences.append(f"{mine.name} study epochs: baseline {theirs.epochs}, this study {mine.epochs}")
        # A single learning rate is the protocol; a grid of them is what the study varies.
        if len(mine.lrs) == 1 and len(theirs.lrs) == 1 and mine.lrs != theirs.lrs:
            differences.append(f"{mine.name} study learning rate: baseline {', '.join(map(str, theirs.lrs))}, "
                               f"this study {', '.join(map(str, mine.lrs))}")
    if not any(baseline.study(mine.name) for mine in study.studies):
        differences.append(f"studies: baseline {', '.join(s.name for s in baseline.studies)}, this study "
                           f"{', '.join(s.name for s in study.studies)}: none in common")
    return differences


def check_protocol(baseline: Baseline, study: StudySpec) -> None:
    """Refuse a baseline of another protocol, saying what differs and how to get a comparable one."""
    differences = protocol_differences(baseline.study, study)
    if differences:
        raise BaselineError(
            f"baseline {baseline.directory} was made under another protocol ({'; '.join(differences)}). "
            f"Compare with a baseline of the same profile and options (the committed ones are in {REFERENCE_DIR}/)"
        )


def compare(now: list[RunRecord], baseline: Baseline) -> list[Comparison]:
    """Each configuration of `now` that the baseline also ran, compared under the rule its records allow."""
    theirs = baseline.configurations()
    return [compare_configuration(runs, theirs[config]) for config, runs in by_configuration(now).items()
            if config in theirs]


def unmatched(now_specs: list[RunSpec], baseline: Baseline) -> tuple[list[str], list[str]]:
    """Configurations this study runs that the baseline lacks, and the baseline's that this study does not run."""
    mine = {configuration(spec): configuration_name(spec) for spec in now_specs}
    theirs = {configuration(spec): configuration_name(spec) for spec in baseline.records}
    return ([name for config, name in mine.items() if config not in theirs],
            [name for config, name in theirs.items() if config not in mine])


def compare_configuration(now: list[RunRecord], baseline: list[RunRecord]) -> Comparison:
    name = configuration_name(now[0].spec)
    by_seed = {record.spec.seed: record for record in baseline}
    pairs = [(record, by_seed.get(record.spec.seed)) for record in now]
    metrics = measure(now, baseline)  # the report shows them under either rule
    if all(theirs is not None and _exactly_comparable(mine, theirs) for mine, theirs in pairs):
        for mine, theirs in pairs:
            difference = first_difference(mine, theirs)
            if difference:
                return Comparison(name, EXACT, DIFFERS, f"{mine.spec.case_id}: {difference}", metrics)
        return Comparison(name, EXACT, IDENTICAL,
                          f"{len(pairs)} run{'s' if len(pairs) > 1 else ''} equal bit for bit, every epoch", metrics)
    verdict = WORSE if any(m.verdict == WORSE for m in metrics) else (
        BETTER if any(m.verdict == BETTER for m in metrics) else WITHIN)
    detail = "; ".join(_describe_metric(m) for m in metrics)
    if len(now) < 2 or len(baseline) < 2:
        detail += " (one run on a side: no test can tell a change from seed noise)"
    return Comparison(name, STATISTICAL, verdict, detail, metrics)


def measure(now: list[RunRecord], baseline: list[RunRecord]) -> tuple[MetricComparison, MetricComparison]:
    """Final held-out accuracy and final training loss of one configuration, now against the baseline."""
    return _accuracy(now, baseline), _loss(now, baseline)


def _exactly_comparable(mine: RunRecord, theirs: RunRecord) -> bool:
    """Same environment, same group and the same training step (the fused step, built by the same compiler, or the
    ATen step): the determinism contract then promises identical records."""
    return (mine.environment.fingerprint() == theirs.environment.fingerprint()
            and mine.trained_with is not None and mine.trained_with == theirs.trained_with
            and mine.training_step == theirs.training_step)


def first_difference(mine: RunRecord, theirs: RunRecord) -> str | None:
    """The first figure of two records of one run that is not bit for bit equal, in words; None if none."""
    for index in range(max(len(mine.epochs), len(theirs.epochs))):
        if index >= len(mine.epochs) or index >= len(theirs.epochs):
            return (f"epoch {index + 1}: recorded in the "
                    f"{'baseline' if index >= len(mine.epochs) else 'new run'} only")
        for metric in EPOCH_METRICS:
            a, b = getattr(mine.epochs[index], metric), getattr(theirs.epochs[index], metric)
            if a != b:
                return f"epoch {index + 1} {metric}: {a!r}, baseline {b!r}"
    for metric in FINAL_METRICS:
        a, b = getattr(mine, metric), getattr(theirs, metric)
        if a != b:
            return f"final {metric}: {a!r}, baseline {b!r}"
    return None


def _accuracy(now: list[RunRecord], baseline: list[RunRecord]) -> MetricComparison:
    """Final held-out accuracy in points; a diverged run counts 0, as in the claims."""
    a = [held_out_accuracy(r) for r in now]
    b = [held_out_accuracy(r) for r in baseline]
    margin = max(ACCURACY_MARGIN, SPREAD_FACTOR * _spread(b))
    p_worse = p_smaller([x + margin for x in a], b)
    p_better = p_smaller(b, [x - margin for x in a])
    return _metric("held-out accuracy", a, b, statistics.fmean(a) - statistics.fmean(b), margin, p_worse,
                   p_better)


def _loss(now: list[RunRecord], baseline: list[RunRecord]) -> MetricComparison:
    """Final training loss, compared on a log scale (losses span decades); a diverged run's is infinite."""
    a = [r.final_train_loss for r in now]
    b = [r.final_train_loss for r in baseline]
    log_a, log_b = [_log(x) for x in a], [_log(x) for x in b]
    shift = max(math.log1p(LOSS_MARGIN), SPREAD_FACTOR * _spread(log_b))
    p_worse = p_smaller(log_b, [x - shift for x in log_a])
    p_better = p_smaller([x + shift for x in log_a], log_b)
    change = _geometric_mean(a) / _geometric_mean(b) - 1 if math.isfinite(_geometric_mean(b)) else math.nan
    return _metric("final training loss", a, b, change, math.expm1(shift), p_worse, p_better)


def _spread(values: list[float]) -> float:
    """The seed-to-seed standard deviation; 0 with one run, or when a run diverged (no finite spread)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) == len(values) and len(finite) > 1 else 0.0


def _metric(name: str, now: list[float], baseline: list[float], change: float, margin: float, p_worse: float,
            p_better: float) -> MetricComparison:
    verdict = WORSE if p_worse <= ALPHA else BETTER if p_better <= ALPHA else WITHIN
    return MetricComparison(name, tuple(baseline), tuple(now), change, margin, p_worse, p_better, verdict)


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def _geometric_mean(values: list[float]) -> float:
    return math.exp(statistics.fmean(_log(v) for v in values)) if all(v > 0 for v in values) else math.nan


def _describe_metric(metric: MetricComparison) -> str:
    if metric.metric == "held-out accuracy":
        change, margin = f"{metric.change:+.2f} points", f"{metric.margin:.2f} points"
    else:
        change = "n/a (a diverged run)" if not math.isfinite(metric.change) else f"{metric.change:+.1%}"
        margin = f"{metric.margin:.0%}"
    return (f"{metric.metric} {summary(metric.now)} vs baseline {summary(metric.baseline)}, {change} "
            f"(margin {margin}, p worse {metric.p_worse:.3f}): {metric.verdict}")


def summary(values: tuple[float, ...] | list[float]) -> str:
    """mean ± std (n), to 4 significant digits (bnsuite.claims.summary); diverged runs counted."""
    return claims.summary(values, 4, significant=True)


def by_configuration(records) -> dict[RunSpec, list[RunRecord]]:
    groups: dict[RunSpec, list[RunRecord]] = defaultdict(list)
    for record in records:
        groups[configuration(record.spec)].append(record)
    return {config: sorted(runs, key=lambda r: r.spec.seed) for config, runs in groups.items()}


def reference_dir(name: str, root: Path | str = ".") -> Path:
    """Where the committed reference of a study named `name` lives (results/reference/NAME; bnsuite.baseline
    `results_name`: the profile, `full-cnn` for the ConvNet alone, `full-cnn-fashion-mnist` on Fashion-MNIST)."""
    return Path(root) / REFERENCE_DIR / name


def results_name(study: StudySpec) -> str:
    """The name of a study's results and reference directories: its profile (results/full, results/reference/full),
    with the networks appended where its studies train no MLP (`full-cnn`) and the dataset where it is not MNIST
    (`full-cnn-fashion-mnist`), so the ConvNet's runs of a profile, and a profile's runs on another dataset, keep a
    directory, and a baseline, of their own."""
    networks = sorted({network for entry in study.studies for network in entry.networks})
    parts = [study.profile] if DEFAULT_NETWORK in networks else [study.profile, *networks]
    return "-".join(parts if study.dataset == StudySpec.dataset else [*parts, study.dataset])


# --- the command line: compare a results directory with a baseline, or accept it as the new baseline ---

def accept(results: Path, target: Path | None = None, *, benchmarks: Path | None = None) -> Path:
    """Make `results` (a complete study's results directory) the baseline in `target`, replacing it whole.

    The records are validated and must cover every run of their study: a partial study would leave runs
    ungated. The new baseline is assembled next to the old one and swapped in by renames, so an interruption
    leaves the old baseline or the new one, never a mix.
    """
    baseline = Baseline.load(results)
    missing = [spec.case_id for spec in baseline.study.run_specs() if spec not in baseline.records]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BaselineError(f"{results} is not a complete study ({len(missing)} runs missing: {shown}); "
                            "run the whole study, then accept it")
    target = Path(target) if target else reference_dir(results_name(baseline.study))
    if target.resolve() == Path(results).resolve():
        raise BaselineError(f"{results} is already the baseline {target}")
    newest = _newest_benchmark(benchmarks) if benchmarks is not None else None
    staging = target.with_name(target.name + ".new")
    old = target.with_name(target.name + ".old")
    step = f"assemble the new baseline in {staging}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / RUNS_SUBDIR).mkdir(parents=True)
        for record in baseline.records.values():
            (staging / RUNS_SUBDIR / record.filename).write_text(record.to_json())
        for extra in [Path(results) / "REPORT.md", *sorted(Path(results).glob("*.png"))]:
            if extra.is_file():
                shutil.copy2(extra, staging / extra.name)
        if newest is not None:
            # pytest-benchmark's storage layout (a folder per machine), so the report and --benchmark-compare read it.
            machine = staging / "pytest-benchmark" / (newest.parent.name if Path(benchmarks).is_dir() else "saved")
            machine.mkdir(parents=True)
            shutil.copy2(newest, machine / newest.name)
        step = f"move the old baseline {target} aside to {old}"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        step = f"move the new baseline into {target}"
        staging.rename(target)
    except OSError as error:
        # Nothing half-made is left behind, and the old baseline is where it was.
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)
        raise BaselineError(f"cannot {step} ({error.strerror or error}); the baseline {target} is unchanged: free "
                            f"space or fix the permissions of {target.parent}, then accept again") from None
    shutil.rmtree(old, ignore_errors=True)
    return target


def _newest_benchmark(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("**/*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise BaselineError(f"no pytest-benchmark JSON under {path}; run the study with --benchmark-autosave")
    return files[-1]


def command_line() -> argparse.ArgumentParser:
    """The command line of `python -m bnsuite.baseline` (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m bnsuite.baseline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    comparing = commands.add_parser("compare", help="compare a results directory with a baseline; exit 1 if worse")
    comparing.add_argument("results", type=Path, help="results directory of the new study run (holds runs/)")
    comparing.add_argument("--baseline", type=Path, default=None,
                           help=f"baseline results directory (default: {REFERENCE_DIR}/PROFILE)")
    accepting = commands.add_parser("accept", help="make a complete study's results the new baseline")
    accepting.add_argument("results", type=Path, help="results directory of the study run to accept")
    accepting.add_argument("--to", type=Path, default=None,
                           help=f"baseline directory to replace (default: {REFERENCE_DIR}/PROFILE)")
    accepting.add_argument("--benchmarks", type=Path, default=None,
                           help="pytest-benchmark JSON (a file, or a storage whose newest file is taken) to keep "
                                "with the baseline")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    try:
        if args.command == "accept":
            target = accept(args.results, args.to, benchmarks=args.benchmarks)
            print(f"accepted {args.results} as the baseline in {target}; commit it to make it the reference")
            return 0
        now = Baseline.load(args.results, role="results")
        baseline = Baseline.load(args.baseline or reference_dir(results_name(now.study)))
        check_protocol(baseline, now.study)
    except (BaselineError, RecordError, OSError) as error:
        print(f"bnsuite.baseline: {error}", file=sys.stderr)
        return 2
    comparisons = compare(list(now.records.values()), baseline)
    for comparison in comparisons:
        print(comparison.describe())
    only_now, only_baseline = unmatched(list(now.records), baseline)
    for label, names in (("not in the baseline", only_now), ("in the baseline only", only_baseline)):
        if names:
            print(f"{label}: {', '.join(names)}")
    failed = [c.name for c in comparisons if c.failed]
    print(f"{len(comparisons)} configurations compared with {baseline.directory}: "
          + (f"{len(failed)} failed ({', '.join(failed)})" if failed else "none failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
