"""pytest options of the bnsuite study, mapped onto a bnsuite.study.StudySpec.

`pytest benchmarks/` runs the study; these options choose which one. Every
value is checked when pytest starts, so a typo fails in a second with a
message, not an hour into a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bnsuite.spec import SpecError
from bnsuite.study import StudySession, study_from_options

OPTIONS = {
    "profile": "study profile: full (the study exactly, default), quick, or smoke (CI, about a minute)",
    "dataset": "dataset: mnist or fashion-mnist (default: the profile's, mnist)",
    "variants": "comma-separated model variants, e.g. plain,bn,bn-scratch (default: plain,bn)",
    "batch-sizes": "comma-separated batch sizes (default: 32,64,128)",
    "seeds": "comma-separated seeds (default: 0,1,2)",
    "epochs": "epochs per run (default: the profile's; full: 10)",
    "lr": "SGD learning rate (default: 0.01, the study's)",
    "device": "auto, cpu or cuda (default: auto)",
    "target-loss": "training loss for the epochs-to-target claims (default: the profile's)",
}


def pytest_addoption(parser):
    group = parser.getgroup("bnsuite", "bnsuite study")
    for name, help_text in OPTIONS.items():
        group.addoption(f"--bn-{name}", default=None, help=help_text)
    group.addoption("--bn-results-dir", default=None,
                    help="where run records are saved (default: $BNSUITE_RESULTS_DIR, else results/ for the full profile, results/PROFILE/ for others)")
    group.addoption("--bn-data-dir", default=None,
                    help="data directory (default: $BNSUITE_DATA_DIR, else ~/.cache/bnsuite)")


def pytest_configure(config):
    try:
        config.bnsuite_study = study_from_options(
            config.getoption("--bn-profile") or "full",
            **{name.replace("-", "_"): config.getoption(f"--bn-{name}") for name in OPTIONS if name != "profile"},
        )
    except SpecError as error:
        raise pytest.UsageError(f"bnsuite: {error}") from None
    results_dir = config.getoption("--bn-results-dir") or os.environ.get("BNSUITE_RESULTS_DIR")
    if results_dir:
        config.bnsuite_results_dir = Path(results_dir)
    else:  # the full study is the reference in results/; smaller profiles never mix into it
        profile = config.bnsuite_study.profile
        config.bnsuite_results_dir = Path(__file__).parent / "results" / ("" if profile == "full" else profile)
    config.bnsuite_data_dir = config.getoption("--bn-data-dir")
    if any("benchmarks" in str(arg) for arg in config.args):
        _check_writable(config.bnsuite_results_dir)


def _check_writable(results_dir: Path) -> None:
    """Fail at start-up, not after the first hour of training, when records could not be saved."""
    probe = results_dir / "runs" / f".write-check-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise pytest.UsageError(
            f"bnsuite: cannot write records to {results_dir} ({error.strerror or error}); "
            "choose a writable directory with --bn-results-dir"
        ) from None


def pytest_generate_tests(metafunc):
    """Parametrize `seed_group` over the study's matrix, one case per variant and batch size (`bn-bs64`).

    A case trains all the study's seeds of its variant and batch size as one
    batched computation (bnsuite.train.train_seeds): one record per seed.
    """
    if "seed_group" in metafunc.fixturenames:
        groups = metafunc.config.bnsuite_study.seed_groups()
        metafunc.parametrize("seed_group", groups, ids=[f"{g[0].variant}-bs{g[0].batch_size}" for g in groups])


MODULE_ORDER = {"test_study.py": 0, "test_claims.py": 1, "test_speed.py": 2}


def pytest_collection_modifyitems(items):
    """The matrix first, so the claims reuse its runs instead of training them again; speed last."""
    items.sort(key=lambda item: MODULE_ORDER.get(item.path.name, len(MODULE_ORDER)))


@pytest.fixture(scope="session")
def study(pytestconfig):
    return pytestconfig.bnsuite_study


@pytest.fixture(scope="session")
def study_session(pytestconfig, study):
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    terminal = pytestconfig.pluginmanager.getplugin("terminalreporter")

    def progress(line: str) -> None:
        # Shown live with plain `pytest benchmarks/`, not only with -s.
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"  {line}")

    session = StudySession(
        study, results_dir=pytestconfig.bnsuite_results_dir, data_dir=pytestconfig.bnsuite_data_dir, progress=progress
    )
    pytestconfig.bnsuite_session = session
    return session


def pytest_report_header(config):
    study = getattr(config, "bnsuite_study", None)
    if study is None or not any("benchmarks" in str(arg) for arg in config.args):
        return None
    runs = len(study.run_specs())
    cases = len(study.seed_groups())
    protocol = "seed protocol (all 60,000 train)" if study.validation_size == 0 else (
        f"{study.train_subset or 60_000 - study.validation_size} training images, "
        f"{study.validation_size} held out for validation")
    return [
        f"bnsuite study: profile {study.profile}, {study.dataset}, {study.epochs} epochs, {protocol}",
        f"  {runs} runs: variants {','.join(study.variants)} x batch sizes "
        f"{','.join(map(str, study.batch_sizes))} x seeds {','.join(map(str, study.seeds))}, "
        f"in {cases} cases (a case trains its seeds together); records -> {config.bnsuite_results_dir}",
    ]


def pytest_terminal_summary(terminalreporter, config):
    results = getattr(config, "bnsuite_claim_results", None)
    if not results:
        return
    terminalreporter.section("bnsuite claims")
    for result in results:
        terminalreporter.write_line(f"{result.verdict.upper():>12}  {result.name}: {result.evidence}")
