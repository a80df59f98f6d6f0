"""The bnsuite pytest plugin: `--bn-*` options, the study they choose, and the fixtures the benchmarks use.

One `StudyPlugin` object per pytest run owns all of the plugin's state (the
study, where records go, the session that trains cases, the claims judged so
far); pytest's hooks and the fixtures delegate to it, and the claims report
through an injected callback (`record_claim`), so no test writes plugin state.

Every option is checked when pytest starts, so a typo fails in a second with
a message, not an hour into a run. Whether this is a benchmark run is decided
from what pytest collected (a test that uses the study session), and only
then are the results directory and the data checked: a unit-test run never
touches either.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from bnsuite.core import registry
from bnsuite.core.baseline import (
    REFERENCE_DIR,
    Baseline,
    BaselineError,
    Comparison,
    check_protocol,
    compare,
    configuration,
    results_name,
    unmatched,
)
from bnsuite.core.claims import holm, study_claims
from bnsuite.core.idx import IdxFormatError
from bnsuite.core.records import RecordError, load_records, save_record
from bnsuite.core.registry import PluginError, check_measures, load_plugins, plugin_option
from bnsuite.core.spec import DEFAULT_LR, DEFAULT_NETWORK, SpecError, StudySpec
from bnsuite.executor import EXECUTORS, ExecutorError, ProcessExecutor, RayExecutor
from bnsuite.study import PROFILE_SETTINGS, StudySession, default_seeds, study_from_options
from bnsuite.training import fused
from bnsuite.training.data import DatasetError, DataUnavailableError, default_data_dir, load_raw
from bnsuite.training.environment import describe_environment
from bnsuite.training.models import check_outputs
from bnsuite.training.train import max_runs_together, resolve_device


def _seeds(profile: str) -> str:
    seeds = default_seeds(profile)
    return f"0 to {seeds[-1]}" if seeds == tuple(range(len(seeds))) and len(seeds) > 3 else ",".join(map(str, seeds))


def _taking(network: str) -> str:
    return ", ".join(definition.name for definition in registry.studies() if definition.takes(network))


def _reached_by(option: str) -> str:
    return ", ".join(definition.title for definition in registry.studies() if option in definition.options)


OPTIONS = {
    "profile": "study profile: full (the study exactly, default), quick, or smoke (CI, about a minute)",
    "studies": f"comma-separated studies to run: {', '.join(d.name for d in registry.studies())} and those of "
               f"plugins, or 'all' (default: those that run by default, "
               f"{', '.join(d.name for d in registry.studies() if d.default)})",
    "dataset": "dataset: mnist, fashion-mnist, cifar10 or one a plugin registers (default: the profile's, mnist)",
    "variants": f"comma-separated model variants of the {_reached_by('variants')}, e.g. plain,bn,bn-scratch or a "
                "plugin's (default: plain,bn)",
    "batch-sizes": f"comma-separated batch sizes of the {_reached_by('batch-sizes')} (default: 32,64,128)",
    "seeds": "seeds of every study: a count (5: seeds 0 to 4), a range (0-7) or a list (0,1,2; 0-4,10) "
             "(default: the profile's: " + "; ".join(f"{profile} {_seeds(profile)}" for profile in PROFILE_SETTINGS)
             + "; full takes more where its family of claims needs them for a clear effect to survive Holm, 7 with "
               "--bn-studies all)",
    "epochs": "epochs per run, every study (default: the profile's; full: 10, and 2 for the lr and init studies)",
    "lr": "SGD learning rate of every study but the lr study's grid (default: 0.01, the study's)",
    "device": "auto, cpu or cuda (default: auto)",
    "target-loss": "training loss for the epochs-to-target claims (default: the profile's)",
    "optimizer": "the optimizer of every run: sgd (the study's, default) or adam (torch's betas, on the eager "
                 "step)",
    "momentum": "SGD's momentum for every run (default: 0.9, the study's)",
    "weight-decay": "L2 weight decay of every run, torch's (default: 0)",
    "lr-schedule": "learning rate over each run's epochs: constant (default) or cosine (annealed towards 0, per "
                   "epoch)",
    "network": "comma-separated networks: mlp (the study's MLP, default), cnn (a small ConvNet with BatchNorm2d), "
               "mlp,cnn, or a network a plugin registers (bnsuite.register_network); reaches the studies that take "
               f"the ConvNet ({_taking('cnn')}; those that take any network take a plugin's) and leaves out those "
               "that take none of them",
}
# Modules of benchmarks/ in the order they run: the matrix first, so the claims reuse its runs; speed last.
MODULE_ORDER = {"test_study.py": 0, "test_claims.py": 1, "test_speed.py": 2}
PLUGIN_NAME = "bnsuite-study"


def pytest_addoption(parser):
    group = parser.getgroup("bnsuite", "bnsuite study")
    for name, help_text in OPTIONS.items():
        group.addoption(f"--bn-{name}", default=None, help=help_text)
    group.addoption("--bn-plugin", default=None, metavar="MODULE[,MODULE]",
                    help="modules to import at start-up that register variants, studies, measures and datasets of "
                         "your own (bnsuite.register_variant, register_study, register_measure, register_dataset); "
                         "the bnsuite.plugins entry points of installed packages are imported anyway")
    group.addoption("--bn-results-dir", default=None,
                    help="where run records are saved (default: $BNSUITE_RESULTS_DIR, else results/PROFILE/; "
                         "results/PROFILE-cnn/ for the ConvNet alone; -DATASET appended on a dataset other than "
                         "MNIST, as results/full-cnn-fashion-mnist/)")
    group.addoption("--bn-baseline", default=None,
                    help=f"gate every case's numbers against this results directory's records of the same runs; "
                         f"'reference' is the committed {REFERENCE_DIR}/PROFILE (PROFILE-cnn for the ConvNet alone; "
                         "default: no baseline)")
    group.addoption("--bn-data-dir", default=None,
                    help="data directory (default: $BNSUITE_DATA_DIR, else ~/.cache/bnsuite)")
    group.addoption("--bn-resume", action="store_true", default=False,
                    help="reuse the records already in the results dir of cases whose every run has one with the "
                         "same spec, study, code commit (clean) and environment fingerprint, rather than train them "
                         "again (the determinism contract makes them what training would give); the header says how "
                         "many are reused")
    group.addoption("--bn-executor", default="local", choices=EXECUTORS,
                    help="where cases train: local (this process, default), processes (worker processes on this "
                         "machine, one per CPU and one thread each, every case submitted at start) or ray (every "
                         "case a Ray task, all submitted at start; needs the ray extra)")
    group.addoption("--bn-ray-address", default=None,
                    help="with --bn-executor ray: 'auto', HOST:PORT (the head's address) or ray://HOST:PORT (Ray "
                         "Client) joins a running cluster (default: start a Ray instance of its own on this machine)")


CLAIMS_MARKER = "claims: checks of the studies' claims on BN (bnsuite.benchmarks.test_claims)"


def pytest_configure(config):
    # registered here, not only in bnsuite's pyproject.toml: a project that runs `--pyargs bnsuite.benchmarks`
    # from its own directory gets no PytestUnknownMarkWarning
    config.addinivalue_line("markers", CLAIMS_MARKER)
    config.pluginmanager.register(StudyPlugin(config), PLUGIN_NAME)


class StudyPlugin:
    """The plugin's state for one pytest run, and the hooks and fixtures that use it."""

    def __init__(self, config: pytest.Config):
        # An installed package's plugin that does not import is kept here, not raised: it must not break a pytest
        # run that trains nothing of bnsuite's (another project's tests); a run that does is refused at collection.
        self.broken_plugins: list[PluginError] = []
        try:
            self.plugins = _load_plugins(config, self.broken_plugins.append)
            self.study_spec: StudySpec = study_from_options(
                config.getoption("--bn-profile") or "full",
                **{name.replace("-", "_"): config.getoption(f"--bn-{name}") for name in OPTIONS if name != "profile"},
            )
            study_claims(self.study_spec)  # two claims of one name are refused here, before anything trains
            check_measures(self.study_spec)  # and a measure no plugin registered
        except (SpecError, PluginError) as error:
            broken = "".join(f" (and {problem})" for problem in self.broken_plugins)
            raise pytest.UsageError(f"bnsuite: {error}{broken}") from None
        try:
            max_runs_together()  # a bad BNSUITE_MAX_RUNS_TOGETHER is refused before anything trains
        except ValueError as error:
            raise pytest.UsageError(f"bnsuite: {error}") from None
        results_dir = config.getoption("--bn-results-dir") or os.environ.get("BNSUITE_RESULTS_DIR")
        # A user's runs go to results/PROFILE; the committed reference, in results/reference/PROFILE, is
        # changed only by accepting new numbers (python -m bnsuite.baseline accept).
        name = results_name(self.study_spec)  # the profile; `full-cnn` for the ConvNet's runs alone
        self.results_dir = Path(results_dir) if results_dir else Path(config.rootpath) / "results" / name
        baseline = config.getoption("--bn-baseline")
        self.baseline_dir = None if baseline is None else (
            Path(config.rootpath) / REFERENCE_DIR / name if baseline == "reference" else Path(baseline))
        self.baseline: Baseline | None = None
        self.comparisons: list[Comparison] = []
        self.data_dir = config.getoption("--bn-data-dir")
        self.executor_name = config.getoption("--bn-executor")
        self.ray_address = config.getoption("--bn-ray-address")
        if self.ray_address and self.executor_name != "ray":
            raise pytest.UsageError("bnsuite: --bn-ray-address needs --bn-executor ray")
        self.executor: RayExecutor | ProcessExecutor | None = None
        self.dataset_checksum: str | None = None
        self._terminal = None
        self.benchmark_run = False
        self.claim_results: list = []
        self.judged_files: dict[str, list[str]] = {}  # claim name -> the record files it judged
        self.verdicts_error: str | None = None
        self._session: StudySession | None = None
        self.reused = 0  # cases --bn-resume found finished in the results dir
        self.replaced = 0  # records of this study's runs already there, which this run writes over
        self.started = time.perf_counter()  # the whole-study figure's wall time counts from here
        self._floor = None

    # --- collection: the matrix, the claims, and whether this run trains anything ---

    def pytest_generate_tests(self, metafunc):
        """`case`: each group of runs that trains together (`bn-bs64`, `plain-bs64-lr-sweep`); `claim`: each claim;
        `other_network`: each network the session trains besides the MLP (the speed benchmark's)."""
        if "case" in metafunc.fixturenames:
            groups = self.study_spec.groups()
            metafunc.parametrize("case", groups, ids=[self.study_spec.case_name(group) for group in groups])
        if "claim" in metafunc.fixturenames:
            claims = study_claims(self.study_spec)
            metafunc.parametrize("claim", claims, ids=[claim.name for claim in claims])
        if "other_network" in metafunc.fixturenames:  # the speed benchmark's: the session's networks but the MLP
            others = [name for name in dict.fromkeys(network for study in self.study_spec.studies
                                                     for network in study.networks) if name != DEFAULT_NETWORK]
            skip = pytest.mark.skip(reason="measured for each network the session trains besides the MLP: "
                                           "--bn-network cnn, or a plugin's network")
            metafunc.parametrize("other_network", others or [pytest.param(None, marks=skip)], ids=others or ["none"])

    @pytest.hookimpl(trylast=True)  # after -k and -m have deselected: what is left is what will run
    def pytest_collection_modifyitems(self, items):
        items.sort(key=lambda item: MODULE_ORDER.get(item.path.name, len(MODULE_ORDER)))
        self.benchmark_run = any("study_session" in getattr(item, "fixturenames", ()) for item in items)
        if self.benchmark_run and self.broken_plugins:
            raise pytest.UsageError(f"bnsuite: {self.broken_plugins[0]}")
        if self.benchmark_run:
            try:  # a model with the wrong output is refused before anything trains
                check_outputs(self.study_spec)
            except SpecError as error:
                raise pytest.UsageError(f"bnsuite: {error}") from None
            self._check_results_dir()
            self._load_baseline()
            self._check_data()
            self._find_finished(items[0].config)
            if self.executor_name != "local":
                self._start_executor(items)

    def pytest_report_header(self, config):
        """One line per installed plugin that did not import, in a run that uses no bnsuite study."""
        return [f"bnsuite: left out, as this run trains nothing of bnsuite's: {problem}"
                for problem in self.broken_plugins]

    def pytest_collection_finish(self, session):
        terminal = self._terminal = session.config.pluginmanager.get_plugin("terminalreporter")
        if self.benchmark_run and terminal is not None:
            for line in self.describe():
                terminal.write_line(line)

    def describe(self) -> list[str]:
        spec = self.study_spec
        protocol = f"seed protocol (all {spec.train_size:,} train)" if spec.held_out == "test" else (
            f"{spec.train_size} training images, {spec.validation_size} held out for validation")
        lines = [f"bnsuite study: profile {spec.profile}, {spec.dataset}, {protocol}, seeds "
                 f"{','.join(map(str, spec.seeds))}; {len(spec.run_specs())} runs in {len(spec.groups())} cases "
                 f"(a case trains its runs together); records -> {self.results_dir}"]
        if self.plugins:
            lines.append(f"  plugins: {', '.join(self.plugins)}")
        if resolve_device(spec.device).type == "cpu":
            lines.append(f"  {fused.status()}")
        if self.reused:
            cases = len(spec.groups())
            lines.append(f"  resumed: {self.reused} of {cases} cases reused from the records in {self.results_dir} "
                         f"(same runs, code and machine); {cases - self.reused} to train")
        elif self.replaced:
            lines.append(f"  {self.replaced} records of this study's runs are already in {self.results_dir}: this run "
                         "writes over them (--bn-resume reuses finished cases instead)")
        if self.executor is not None:
            lines.append(f"  executor: {self.executor.name}, {len(self.executor.pending)} cases submitted at "
                         "start; pytest-benchmark's timing is off (it would time the waiting, not the training): each "
                         "record keeps the training time its worker measured")
        for study in spec.studies:
            axes = [f"variants {','.join(study.variants)}", f"batch sizes {','.join(map(str, study.batch_sizes))}"]
            if len(study.lrs) > 1 or study.lrs[0] != DEFAULT_LR:
                axes.append(f"learning rates {','.join(f'{lr:g}' for lr in study.lrs)}")
            if len(study.init_scales) > 1:
                axes.append(f"init scales {','.join(f'{k:g}' for k in study.init_scales)}")
            epochs = ", ".join(f"{study.epochs_on(network)} epochs" + (f" on the {network}" if len(study.networks) > 1
                                                                         else "") for network in study.networks)
            if study.networks != (DEFAULT_NETWORK,):
                axes.insert(0, f"networks {','.join(study.networks)}")
            lines.append(f"  {study.name} study: {' x '.join(axes)}, {epochs}")
        if self.baseline is not None:
            only_now, only_baseline = unmatched(spec.run_specs(), self.baseline)
            lines.append(f"  against the baseline {self.baseline.directory}: "
                         f"{len({*map(configuration, spec.run_specs())}) - len(only_now)} configurations gated")
            lines += [f"  {label}, not gated: {', '.join(names)}" for label, names in
                      (("not in the baseline", only_now), ("in the baseline only", only_baseline)) if names]
        return lines

    def _check_results_dir(self) -> None:
        """Fail at start-up, not after the first hour of training, when records could not be saved."""
        probe = self.results_dir / "runs" / f".write-check-{os.getpid()}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise pytest.UsageError(
                f"bnsuite: cannot write records to {self.results_dir} ({error.strerror or error}); "
                "choose a writable directory with --bn-results-dir"
            ) from None

    def _load_baseline(self) -> None:
        """The baseline's records, refused at start-up if unreadable, of another protocol, or this run's output."""
        if self.baseline_dir is None:
            return
        if self.baseline_dir.resolve() == self.results_dir.resolve():
            raise pytest.UsageError(
                f"bnsuite: the baseline {self.baseline_dir} is also where this run saves its records; a baseline "
                "is never overwritten by the run it gates: choose another --bn-results-dir")
        try:
            self.baseline = Baseline.load(self.baseline_dir)
            check_protocol(self.baseline, self.study_spec)
        except BaselineError as error:
            raise pytest.UsageError(f"bnsuite: {error}") from None

    def check_baseline(self, records: list) -> list[Comparison]:
        """The case's configurations against the baseline (none without one); every comparison is summarized."""
        comparisons = compare(records, self.baseline) if self.baseline is not None else []
        self.comparisons += comparisons
        return comparisons

    def _check_data(self) -> None:
        """The dataset, verified (and obtained if need be) before any case trains."""
        try:
            self.dataset_checksum = load_raw(
                self.study_spec.dataset, data_dir=Path(self.data_dir) if self.data_dir else default_data_dir()).checksum
        except (DataUnavailableError, DatasetError, IdxFormatError, OSError) as error:
            raise pytest.UsageError(f"bnsuite: {error}") from None

    def _find_finished(self, config: pytest.Config) -> None:
        """The records already in the results dir: with --bn-resume the session reuses the cases they finish
        (StudySession.adopt); without it, the header says how many this run will replace."""
        try:
            existing = load_records(self.results_dir)
        except FileNotFoundError:
            return
        except RecordError as error:
            raise pytest.UsageError(f"bnsuite: {error}") from None
        environment = describe_environment(resolve_device(self.study_spec.device), self.dataset_checksum)
        if config.getoption("--bn-resume"):
            self.reused = self.session(config).adopt(existing, environment)
        else:
            mine = {spec for spec in self.study_spec.run_specs()}
            self.replaced = sum(record.spec in mine for record in existing)

    def _start_executor(self, items) -> None:
        """Every collected case not reused (--bn-resume) submitted now (as a Ray task, or to the worker processes),
        so they run in parallel while the tests wait."""
        reused = self._session.reused if self._session is not None else set()
        cases = list(dict.fromkeys(item.callspec.params["case"] for item in items
                                   if "case" in getattr(getattr(item, "callspec", None), "params", {})
                                   and item.callspec.params["case"] not in reused))
        if self.executor_name == "ray":
            self.executor = RayExecutor(self.study_spec, address=self.ray_address, data_dir=self.data_dir,
                                        dataset_checksum=self.dataset_checksum, plugins=self.plugins)
        else:
            self.executor = ProcessExecutor(self.study_spec, data_dir=self.data_dir,
                                            dataset_checksum=self.dataset_checksum, plugins=self.plugins)
        try:
            self.executor.start(cases)
        except ExecutorError as error:
            self.executor = None
            raise pytest.UsageError(f"bnsuite: {error}") from None
        if self._session is not None:  # made early to adopt finished cases (--bn-resume): it takes from the executor
            self._session.executor = self.executor
        benchmarks = getattr(items[0].config, "_benchmarksession", None) if items else None
        if benchmarks is not None:
            # As pytest-benchmark does under xdist: the wall time it would see here is waiting for a worker.
            benchmarks.disabled = True

    def pytest_keyboard_interrupt(self, excinfo):
        """Ctrl-C: cancel the cases still running (Ray tasks, or worker processes), save the records of the cases
        that finished, and say what is kept and how to go on."""
        if self.executor is not None:
            what = "Ray tasks" if isinstance(self.executor, RayExecutor) else "worker processes"
            finished = self.executor.stop(interrupted=True)
            for record in finished:
                save_record(record, self.results_dir)
            self.executor = None
            terminal = self._terminal
            if terminal is not None:
                terminal.write_line(f"bnsuite: interrupted; {what} cancelled, {len(finished)} finished records "
                                    f"saved to {self.results_dir}")
        if self._session is not None and self._terminal is not None:  # one line: what is kept, and how to go on
            self._terminal.write_line(
                f"bnsuite: interrupted; the records of {len(self._session.records)} runs are kept in "
                f"{self.results_dir}; the same command with --bn-resume trains only the cases not finished")

    def record_claim(self, result, records) -> None:
        self.claim_results.append(result)
        self.judged_files[result.name] = [record.filename for record in records]

    def pytest_sessionfinish(self, session):
        if self.executor is not None:
            self.executor.stop()
            self.executor = None
        if self.claim_results:  # the verdicts as data, so a report without the studies' code still shows them
            from bnsuite.core.verdicts import VerdictsError, save_verdicts

            try:
                save_verdicts(self.results_dir, [(result, self.judged_files[result.name])
                                                 for result in holm(self.claim_results)])
            except (OSError, VerdictsError) as error:  # the records are kept either way; one line says what failed
                why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                self.verdicts_error = (f"bnsuite: the claims' verdicts could not be stored in {self.results_dir} "
                                       f"({why}); the report judges registered studies' claims from the records "
                                       "anyway")

    def session(self, config: pytest.Config) -> StudySession:
        """The session that trains this run's cases, made on first use; its progress lines show live."""
        if self._session is None:
            capture = config.pluginmanager.getplugin("capturemanager")
            terminal = config.pluginmanager.getplugin("terminalreporter")

            def progress(line: str) -> None:
                # Shown live with plain `pytest benchmarks/`, not only with -s.
                with capture.global_and_fixture_disabled():
                    terminal.write_line(f"  {line}")

            def stop(message: str) -> None:  # a record that cannot be written ends the run: it would repeat
                pytest.exit(f"bnsuite: {message}", returncode=pytest.ExitCode.TESTS_FAILED)

            self._session = StudySession(self.study_spec, results_dir=self.results_dir, data_dir=self.data_dir,
                                         progress=progress, executor=self.executor, on_write_failure=stop)
        return self._session

    # --- reporting ---

    def study_floor(self):
        """The whole study against its floor (bnsuite.speed.StudyFloor), once the session has trained its cases;
        None if it trained none (cases reused by --bn-resume are not counted: they trained in another session).
        Taken once: the benchmark JSON and the terminal summary say the same."""
        session = self._session
        reused = {spec for case in session.reused for spec in case} if session is not None else set()
        # a reused case (--bn-resume) trained in another session: its time is not this session's wall time's
        trained = [record for spec, record in session.records.items() if spec not in reused] if session else []
        if self._floor is None and trained:
            from bnsuite.training.speed import StudyFloor, matmul_peak_flops

            wall = time.perf_counter() - self.started
            peak = session.peak_flops or matmul_peak_flops(resolve_device(self.study_spec.device))
            self._floor = StudyFloor.of(trained, peak_flops=peak, wall_time_s=wall)
        return self._floor

    @pytest.hookimpl(optionalhook=True)
    def pytest_benchmark_update_json(self, config, benchmarks, output_json):
        floor = self.study_floor()
        if floor is not None:
            output_json.setdefault("bnsuite", {})["study_floor"] = floor.info()

    def pytest_terminal_summary(self, terminalreporter):
        if self.claim_results:
            terminalreporter.section("bnsuite claims")
            family = holm(self.claim_results)
            for result in family:
                terminalreporter.write_line(f"{result.verdict.upper():>12}  {result.name}: {result.evidence}")
                if result.effect is not None:
                    terminalreporter.write_line(f"{'':>14}effect: {result.effect.describe()}; after Holm over "
                                                f"{len(family)} claims: {result.holm_verdict} (p {result.holm_p:.3g})")
        if self.verdicts_error:
            terminalreporter.write_line(self.verdicts_error)
        floor = self.study_floor() if self.benchmark_run else None
        if floor is not None:
            terminalreporter.section("bnsuite: the whole study against its floor")
            terminalreporter.write_line(floor.describe())
        if self.comparisons:
            terminalreporter.section(f"bnsuite against the baseline {self.baseline.directory}")
            for comparison in self.comparisons:
                terminalreporter.write_line(
                    f"{comparison.verdict.upper():>17}  {comparison.name} ({comparison.rule}): {comparison.detail}")


def _load_plugins(config: pytest.Config, on_broken_entry_point) -> tuple[str, ...]:
    """Import the entry-point plugins and those of --bn-plugin; a module in the directory pytest runs from is
    found as `python -m pytest` would find it. An entry-point plugin that does not import goes to
    `on_broken_entry_point` unless --bn-plugin names it."""
    names = plugin_option(config.getoption("--bn-plugin"))
    here = str(config.invocation_params.dir)
    if names and here not in sys.path:
        sys.path.insert(0, here)
    return load_plugins(names, on_broken_entry_point=on_broken_entry_point)


def _plugin(config: pytest.Config) -> StudyPlugin:
    return config.pluginmanager.get_plugin(PLUGIN_NAME)


@pytest.fixture(scope="session")
def study(pytestconfig) -> StudySpec:
    """The study this run's options chose."""
    return _plugin(pytestconfig).study_spec


@pytest.fixture(scope="session")
def study_session(pytestconfig) -> StudySession:
    """Trains the study's cases, each at most once per run, and saves every record."""
    return _plugin(pytestconfig).session(pytestconfig)


@pytest.fixture(scope="session")
def check_baseline(pytestconfig):
    """Compares a case's records with the baseline's (--bn-baseline); returns the comparisons, none without one."""
    return _plugin(pytestconfig).check_baseline


@pytest.fixture(scope="session")
def record_claim(pytestconfig):
    """`record_claim(result, records)`: hands a claim's result and the records it judged to the plugin, which lists
    every verdict at the end of the run and stores them next to the records (bnsuite.verdicts)."""
    return _plugin(pytestconfig).record_claim
