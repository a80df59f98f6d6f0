"""A user's own variants and studies, from a package of their own: by --bn-plugin and by entry point, in the
studies, the report (another process, without the plugin) and the registries. The example of docs/plugins.md is the
plugin these tests run, so the example cannot drift from what works."""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnsuite.core import baseline, registry, report
from bnsuite.core.claims import study_claims
from bnsuite.core.records import load_records
from bnsuite.core.registry import PluginError
from bnsuite.core.spec import CONTRADICTED, NOT_SHOWN, VERDICTS, KnownException, SpecError, Study
from bnsuite.core.verdicts import load_verdicts
from bnsuite.study import profile_spec, study_from_options

ROOT = Path(__file__).resolve().parents[1]
THEIRS = ("batch-rms", "batch-rms-after-relu")  # the README example's two variants


def readme_example(name: str) -> str:
    """The python block of docs/plugins.md that starts with `# NAME` (indented blocks of a list item too)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "plugins.md").read_text(), flags=re.S)
    return next(textwrap.dedent(block) for block in blocks if textwrap.dedent(block).startswith(f"# {name}"))


def _pytest(*args, cwd, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--benchmark-disable", *args],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _report(results: Path, cwd: Path, *args, env=None) -> str:
    """The report of `results`, built by `python -m bnsuite.report` in a process of its own, from `cwd`."""
    subprocess.run([sys.executable, "-m", "bnsuite.report", "--results", str(results), "--no-plots", *args],
                   cwd=cwd, check=True, capture_output=True, timeout=300, env=env)
    return (results / "REPORT.md").read_text()


def install_worked_example(site: Path, data_dir: Path) -> Path:
    """docs/plugins.md's worked example installed in `site` (a directory for PYTHONPATH) as its package would be: the
    module, the data its docs make from MNIST, and a dist-info that declares the entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "my_study.py").write_text(readme_example("my_study.py"))
    subprocess.run([sys.executable, "-c", readme_example("make_my_digits.py")], cwd=site, check=True, timeout=120,
                   env={**os.environ, "BNSUITE_DATA_DIR": str(data_dir)})
    dist = site / "my_study-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-study\nVersion: 0.1\n")
    (dist / "top_level.txt").write_text("my_study\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nmy_study = my_study\n")
    return site


@pytest.fixture
def user_project(tmp_path):
    """A user's project directory holding the README's plugin module, and nothing of bnsuite's."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_norms.py").write_text(readme_example("my_norms.py"))
    return project


@pytest.mark.processes
def test_a_users_variants_train_in_the_batch_study_and_report_in_a_process_without_their_plugin(
        user_project, tmp_path, mnist_dir, capsys):
    results = tmp_path / "results"
    variants = ",".join(("plain", "bn", *THEIRS))
    # The README's command, from the user's own project: the smoke profile's batch study at two of its batch sizes
    # and two seeds.
    _pytest("--pyargs", "bnsuite.benchmarks.test_study", "--bn-plugin", "my_norms", "--bn-profile", "smoke",
            "--bn-studies", "batch", "--bn-variants", variants, "--bn-batch-sizes", "64,128", "--bn-seeds", "0,1",
            "--bn-results-dir", str(results), "--bn-data-dir", str(mnist_dir), cwd=user_project)
    records = load_records(results)
    assert len(records) == 4 * 2 * 2  # 4 variants x 2 batch sizes x 2 seeds
    mine = [record for record in records if record.spec.variant in THEIRS]
    assert len(mine) == 8 and {record.training_step for record in mine} == {"eager"}  # not the fast step's networks
    digest = hashlib.sha256((user_project / "my_norms.py").read_bytes()).hexdigest()[:16]
    assert {record.variant.source for record in mine} == {f"my_norms sha256:{digest}"}
    assert {r.variant.probe for r in mine} == {"bn2", "fc2"} and all(r.activations is not None for r in mine)
    assert all(r.epochs[-1].batch_statistics_accuracy is not None for r in mine)  # both declare batch statistics
    # The report, in another directory, where my_norms cannot be imported: records are data.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    markdown = _report(results, elsewhere)
    for variant in THEIRS:
        assert f"| {variant} test acc %" in markdown  # its column in the headline table
        assert re.search(rf"\| {re.escape(variant)} +\| +64 \|", markdown)  # its rows in the final-epoch table
        # The claims the batch study asks of it (the claims gate judges the same list: bnsuite.claims.study_claims).
        for claim in ("lower-final-loss-bs128", "accuracy-at-least-plain-bs64", "accuracy-at-least-bn-bs64",
                      "steadier-activations-bs64", "loss-advantage-grows-with-batch-size"):
            assert f"| {variant}-{claim} " in markdown
    # The baseline gate compares its configurations, without the plugin too (the same records: identical).
    shutil.copytree(results / "runs", tmp_path / "baseline" / "runs")
    assert baseline.main(["compare", str(results), "--baseline", str(tmp_path / "baseline")]) == 0
    compared = capsys.readouterr().out
    for variant in THEIRS:
        assert f"{variant}-bs64 (2 epochs): identical (exact rule)" in compared


@pytest.mark.processes
def test_the_worked_example_trains_from_its_installed_package_locally_and_in_processes_and_reports_without_it(
        clean_registry, tmp_path, mnist_dir, capsys):
    site = install_worked_example(tmp_path / "site", mnist_dir)
    env = {**os.environ, "PYTHONPATH": str(site)}
    project = tmp_path / "project"  # a directory of the user's, outside this repository
    project.mkdir()
    results = tmp_path / "results"
    study = ("--bn-studies", "residual,batch", "--bn-network", "resmlp", "--bn-dataset", "my-digits", "--bn-profile",
             "smoke", "--bn-seeds", "4", "--bn-data-dir", str(mnist_dir))
    # The docs' command: the study and its claims; the claims gate passes or fails on what the runs show.
    run = _pytest("--pyargs", "bnsuite.benchmarks.test_study", "bnsuite.benchmarks.test_claims", *study,
                  "--bn-results-dir", str(results), "-rA", cwd=project, env=env, check=False)
    assert run.returncode in (0, 1) and "residual study" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    # Here no plugin registers my-digits or resmlp: the records describe them.
    records = load_records(results)
    # The residual study's ws and, shared with the batch study, plain and bn at 64; the batch study's at 32 and 128.
    assert sorted((r.spec.variant, r.spec.batch_size) for r in records) == sorted(
        [("ws", 64)] * 4 + [(variant, size) for variant in ("plain", "bn") for size in (32, 64, 128)] * 4)
    assert {r.spec.network for r in records} == {"resmlp"}
    assert {(r.dataset.name, r.dataset.source) for r in records} == {("my-digits", "my_study my-study 0.1")}
    assert {r.variant.source for r in records if r.spec.variant == "ws"} == {"my_study my-study 0.1"}
    assert {r.variant.source for r in records if r.spec.variant != "ws"} == {"bnsuite"}  # bnsuite's plain and bn
    assert {n.source for r in records for n in r.study.networks} == {"my_study my-study 0.1"}
    assert {(r.spec.train_size, r.spec.validation_size) for r in records} == {(4_000, 2_000)}
    assert all(math.isfinite(e.measure("block-weight-norm")) for r in records if r.spec.batch_size == 64
               for e in r.epochs)
    assert all(r.activations is not None for r in records if r.spec.variant != "ws")  # probed at blocks.1.0
    judged = {v.result.name: v.result.verdict for v in load_verdicts(results)}
    assert {"resmlp-residual-bn-lower-final-loss-bs64", "resmlp-residual-ws-at-least-plain-bs64"} <= set(judged)
    # The batch study's claims compare bnsuite's bn with its plain, on the residual MLP.
    assert {"resmlp-bn-lower-final-loss-bs128", "resmlp-bn-steadier-activations-bs64",
            "resmlp-bn-loss-advantage-grows-with-batch-size"} <= set(judged)
    # The baseline gate, in this process where no plugin registers the network: the same records, identical.
    shutil.copytree(results / "runs", tmp_path / "baseline" / "runs")
    assert baseline.main(["compare", str(results), "--baseline", str(tmp_path / "baseline")]) == 0
    assert "resmlp-bn-bs128 (2 epochs): identical (exact rule)" in capsys.readouterr().out
    for name, verdict in judged.items():
        assert f"  {name}: " in run.stdout and verdict in VERDICTS  # in the gate's summary too
    # The speed benchmark measures the network against its roofline, its FLOPs counted from its own forward.
    speed = _pytest("--pyargs", "bnsuite.benchmarks.test_speed", "-k", "test_network_epoch and bn-64", *study,
                    "--bn-results-dir", str(tmp_path / "speed"), cwd=project, env=env)
    assert re.search(r"speed: residual MLP, bn bs64, \S.*, 4 seeds together: .* of the roofline bound", speed.stdout)
    # In worker processes, which find the same entry point (two of the seeds): the same runs, to rounding.
    in_workers = tmp_path / "in-workers"
    _pytest("--pyargs", "bnsuite.benchmarks.test_study", *study, "--bn-studies", "residual", "--bn-seeds", "2",
            "--bn-executor", "processes", "--bn-results-dir", str(in_workers), cwd=project, env=env)

    local, workers = ({r.spec: r for r in load_records(directory)} for directory in (results, in_workers))
    assert len(workers) == 3 * 2 and workers.keys() <= local.keys()
    local = {spec: local[spec] for spec in workers}
    for spec, record in local.items():
        other = workers[spec]
        assert other.environment.dataset_checksum == record.environment.dataset_checksum
        # Equal up to rounding: the eager step's GEMMs split over the threads each process has (the record says),
        # which two epochs amplify: 7e-4 apart on an AMD EPYC Zen 4 (1e-5 on an Intel Xeon); two seeds are 5% apart.
        assert [e.train_loss for e in other.epochs] == pytest.approx([e.train_loss for e in record.epochs], rel=5e-3)
        assert other.test_accuracy == pytest.approx(record.test_accuracy, abs=0.5)
    # The report where the package is not installed (another process, another directory): runs and stored verdicts.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    without = _report(results, elsewhere)
    assert "The study 'residual' is not registered here" in without
    assert all(f"| {name} " in without for name in judged)
    assert "on the residual MLP" in without  # the batch study's section on the network, from its description
    # And where it is: the study's own section, with its measure.
    mine = _report(results, project, env=env)
    assert "## Residual MLP on my digits" in mine and "Block weight norm after the last epoch" in mine


STUDY_PLUGIN = textwrap.dedent(readme_example("placement_study.py"))  # the study example of docs/plugins.md


@pytest.mark.processes
def test_an_entry_point_plugins_variants_and_a_users_study_run_by_option_and_report_with_the_plugin(
        tmp_path, mnist_dir):
    # The README's variants, installed as a package (a dist-info on the path) that declares the entry point.
    site = tmp_path / "site"
    dist = site / "my_norms-0.3.dist-info"
    dist.mkdir(parents=True)
    (site / "my_norms.py").write_text(readme_example("my_norms.py"))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-norms\nVersion: 0.3\n")
    (dist / "top_level.txt").write_text("my_norms\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nmy_norms = my_norms\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    # A study of the user's own, a plain module of their project, by --bn-plugin.
    project = tmp_path / "project"
    project.mkdir()
    (project / "placement_study.py").write_text(STUDY_PLUGIN)
    results = tmp_path / "results"
    run = _pytest("--pyargs", "bnsuite.benchmarks.test_study", "bnsuite.benchmarks.test_claims", "--bn-plugin",
                  "placement_study", "--bn-profile", "smoke", "--bn-studies", "rms-placement", "--bn-seeds", "0,1",
                  "--bn-results-dir", str(results), "--bn-data-dir", str(mnist_dir), "-rA", cwd=project, env=env,
                  check=False)
    # Two seeds cannot support a claim (smallest p 1/6), so the claim is "not shown" and fails the gate.
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "FAILED" in run.stdout and "rms-after-relu-at-least-before-bs128: not shown" in run.stdout
    sources = {record.spec.variant: record.variant.source for record in load_records(results)}
    assert sources == {"bn": "bnsuite", **dict.fromkeys(THEIRS, "my_norms my-norms 0.3")}
    # The same study in worker processes, which import the same plugins: the same runs, to rounding (a worker's
    # GEMMs run on one thread, this process's on every thread: bit for bit on an Intel Xeon, 1e-3 apart in the
    # losses on an AMD EPYC Zen 4, where two seeds are 5% apart).
    in_workers = tmp_path / "in-workers"
    _pytest("--pyargs", "bnsuite.benchmarks.test_study", "--bn-plugin", "placement_study", "--bn-profile", "smoke",
            "--bn-studies", "rms-placement", "--bn-seeds", "0,1", "--bn-executor", "processes", "--bn-results-dir",
            str(in_workers), "--bn-data-dir", str(mnist_dir), cwd=project, env=env)
    here, there = ({r.spec: r for r in load_records(directory)} for directory in (results, in_workers))
    assert here.keys() == there.keys()
    for spec, record in here.items():
        other = there[spec]
        assert other.variant.source == record.variant.source
        assert [e.train_loss for e in other.epochs] == pytest.approx([e.train_loss for e in record.epochs], rel=5e-3)
        assert other.final_train_loss == pytest.approx(record.final_train_loss, rel=5e-3)
        assert other.test_accuracy == pytest.approx(record.test_accuracy, abs=0.5)
    # Here, where placement_study is not imported: its runs, and its claims as its run stored them (verdicts as data).
    without = report.build_report(results, out=tmp_path / "REPORT.md", with_plots=False)
    assert "The study 'rms-placement' is not registered here" in without
    assert "## Claims: rms-placement (as stored by its run)" in without
    assert "| rms-after-relu-at-least-before-bs128 " in without and "| batch-rms-after-relu " in without
    with_plugin = _report(results, project, "--plugin", "placement_study")  # no section: the default runs table
    assert "## Claims: RMS placement study" in with_plugin and "| rms-after-relu-at-least-before-bs128 " in with_plugin
    assert "## RMS placement study" in with_plugin and "| batch-rms-after-relu " in with_plugin
    # A record changed since the verdict was judged: the stored verdict is not shown, and the report says why.
    changed = next((results / "runs").glob("batch-rms-after-relu-*.json"))
    changed.write_text(changed.read_text().replace('"hostname": "', '"hostname": "x', 1))
    stale = report.build_report(results, out=tmp_path / "REPORT.md", with_plots=False)
    assert "| rms-after-relu-at-least-before-bs128 " not in stale
    assert "Stored verdicts not shown, as a record they judged has changed since: " \
           "rms-after-relu-at-least-before-bs128" in stale


def test_a_users_study_brings_its_known_exceptions_into_the_profile_it_has_a_matrix_for(clean_registry):
    exception = KnownException("bn-at-least-plain-in-one-epoch-bs128", NOT_SHOWN, "one epoch is too short")
    registry.register_study("tiny", title="tiny study", matrices={"smoke": Study("tiny", ("plain", "bn"), (128,), 1)},
                            known_exceptions={"smoke": (exception,)}, default=False)(lambda spec, study: [])
    assert "tiny" not in [study.name for study in profile_spec("smoke").studies]  # not a default study
    assert [study.name for study in study_from_options("smoke", studies="batch,tiny").studies] == ["batch", "tiny"]
    everything = [study.name for study in study_from_options("smoke", studies="all").studies]
    assert everything[-1] == "tiny" and {"batch", "placement", "noise", "renorm"} < set(everything)
    chosen = profile_spec("smoke", [registry.study_definition("batch"), registry.study_definition("tiny")])
    assert exception in chosen.claims.known_exceptions
    with pytest.raises(Exception, match="no study chosen has a matrix for the full profile"):
        study_from_options("full", studies="tiny")


def test_known_exceptions_keyed_by_dataset_apply_on_that_dataset_only(clean_registry, tmp_path):
    on_mnist = KnownException("bn-at-least-plain-in-one-epoch-bs128", NOT_SHOWN, "measured on MNIST")
    on_fashion = KnownException("bn-at-least-plain-in-one-epoch-bs128", CONTRADICTED, "measured on Fashion-MNIST")
    registry.register_study("tiny", title="tiny study", matrices={"smoke": Study("tiny", ("plain", "bn"), (128,), 1)},
                            known_exceptions={"smoke": (on_mnist,), "smoke:fashion-mnist": (on_fashion,)},
                            default=False)(lambda spec, study: [])
    chosen = [registry.study_definition("tiny")]
    assert profile_spec("smoke", chosen).claims.known_exceptions == (on_mnist,)
    assert profile_spec("smoke", chosen, "fashion-mnist").claims.known_exceptions == (on_fashion,)
    # their records keep a directory of their own, so neither's baseline gates the other's
    assert baseline.results_name(profile_spec("smoke", chosen, "fashion-mnist")) == "smoke-fashion-mnist"
    assert baseline.results_name(profile_spec("smoke", chosen)) == "smoke"
    with pytest.raises(PluginError, match="known exceptions under 'smoke:fashion' name no dataset; key them by a "
                                          "profile .* or a profile and dataset"):
        registry.register_study("tiny2", title="t", matrices=Study("tiny2", ("bn",), (64,), 1),
                                known_exceptions={"smoke:fashion": (on_fashion,)})(lambda s, t: [])


def test_a_name_registered_twice_and_a_plugin_that_cannot_be_imported_are_one_clear_error(clean_registry):
    with pytest.raises(PluginError, match="variant 'bn' is registered twice"):
        registry.register_variant("bn", batch_statistics=True)(lambda: None)
    with pytest.raises(PluginError, match="study 'batch' is registered twice"):
        registry.register_study("batch", title="again", matrices=Study("batch", ("bn",), (64,), 1))(lambda s, t: [])
    with pytest.raises(PluginError, match="study name 'all' is taken: --bn-studies all means every study"):
        registry.register_study("all", title="all", matrices=Study("all", ("bn",), (64,), 1))(lambda s, t: [])
    with pytest.raises(PluginError, match=r"cannot import the plugin module 'no_such_plugin' \(No module named"):
        registry.load_plugins(["no_such_plugin"])


def test_a_bad_plugin_on_the_command_line_is_one_message_and_no_traceback(pytester):
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--bn-plugin", "no_such_plugin")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bnsuite: cannot import the plugin module 'no_such_plugin' (No module named*"])
    assert "Traceback" not in result.stderr.str()


def test_generic_code_asks_the_descriptions_and_never_tests_a_study_or_variant_name():
    generic = ["spec", "registry", "claims", "report", "report_parts", "baseline", "plugin", "study", "train",
               "epochs", "probe", "executor", "records", "plots"]
    pattern = re.compile(r"""startswith\("bn|removesuffix\("-dropout|endswith\("-dropout|name == "(lr|batch|ghost|"""
                         r"""init|dropout)"|variant == "|\.name != "lr"|"-dropout\"""")
    found = {name: pattern.findall(Path(importlib.import_module(f"bnsuite.{name}").__file__).read_text())
             for name in generic}  # by flat name, in whichever folder the module lives
    assert not {name: hits for name, hits in found.items() if hits}


def test_every_variant_of_the_default_studies_is_described_in_the_records_study(mnist_dir):
    spec = study_from_options("smoke")
    assert {variant.name for variant in spec.variants} == {v for study in spec.studies for v in study.variants}
    assert all(claim.variant for claim in study_claims(spec) if claim.study == "batch")


def test_a_probe_point_that_names_no_submodule_is_refused_before_training(clean_registry, mnist_dir):
    from torch import nn

    from bnsuite.core.spec import RunSpec, SpecError
    from bnsuite.training.train import train

    registry.register_variant("misprobed", batch_statistics=False, probe="norm9")(
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    with pytest.raises(SpecError, match="variant misprobed's probe point 'norm9' is not a submodule"):
        train(RunSpec(variant="misprobed", epochs=1, train_subset=256), data_dir=mnist_dir)


def test_a_network_that_declares_no_probe_point_trains_unprobed_and_its_record_says_so(clean_registry, mnist_dir):
    from torch import nn

    from bnsuite.core.spec import RunSpec
    from bnsuite.training.train import train

    registry.register_variant("unprobed", batch_statistics=True)(
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)))
    record = train(RunSpec(variant="unprobed", epochs=1, train_subset=512, batch_size=64), data_dir=mnist_dir)
    assert record.variant.probe is None and record.activations is None
    assert record.epochs[0].batch_statistics_accuracy is not None  # it declared batch statistics
    assert record.training_step == "eager"


BROKEN_PLUGIN = """import torch
from torch import nn

LAYER = nn.BatchNorm1D  # a typo: torch.nn has BatchNorm1d
"""


def test_a_plugin_that_raises_at_import_is_one_line_naming_its_file_and_line(clean_registry, tmp_path, monkeypatch):
    (tmp_path / "typo_norms.py").write_text(BROKEN_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as raised:
        registry.load_plugins(["typo_norms"], entry_points=False)
    message = str(raised.value)
    assert message.startswith("the plugin module 'typo_norms' raised AttributeError at import, at ")
    assert f"{tmp_path / 'typo_norms.py'} line 4: module 'torch.nn' has no attribute 'BatchNorm1D'" in message
    assert "\n" not in message and "typo_norms" not in registry._PLUGINS


def _broken_package(tmp_path: Path) -> dict:
    """An installed package (a dist-info on the path) whose bnsuite.plugins entry point raises at import."""
    site = tmp_path / "site"
    dist = site / "typo_norms-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "typo_norms.py").write_text(BROKEN_PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: typo-norms\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\ntypo_norms = typo_norms\n")
    return {**os.environ, "PYTHONPATH": str(site)}


@pytest.mark.processes
def test_an_installed_plugin_that_raises_never_breaks_a_pytest_run_without_bnsuite_and_refuses_one_with_it(
        tmp_path, mnist_dir):
    env = _broken_package(tmp_path)
    other = tmp_path / "other_project"
    other.mkdir()
    (other / "test_theirs.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    unrelated = _pytest(cwd=other, env=env, check=False)
    assert unrelated.returncode == 0, unrelated.stdout[-2000:] + unrelated.stderr[-2000:]
    assert "INTERNALERROR" not in unrelated.stdout + unrelated.stderr and "1 passed" in unrelated.stdout
    assert "bnsuite: left out, as this run trains nothing of bnsuite's: the plugin module 'typo_norms' raised " \
           "AttributeError at import" in unrelated.stdout
    results = tmp_path / "results"
    study = _pytest("--pyargs", "bnsuite.benchmarks.test_study", "--bn-profile", "smoke", "--bn-results-dir",
                    str(results), "--bn-data-dir", str(mnist_dir), cwd=other, env=env, check=False)
    assert study.returncode == pytest.ExitCode.USAGE_ERROR
    lines = [line for line in study.stderr.splitlines() if line.strip()]
    assert lines == [f"ERROR: bnsuite: the plugin module 'typo_norms' raised AttributeError at import, at "
                     f"{tmp_path / 'site' / 'typo_norms.py'} line 4: module 'torch.nn' has no attribute "
                     f"'BatchNorm1D'; it is declared in the bnsuite.plugins entry points of the installed package "
                     f"'typo-norms': fix it there, or uninstall that package"]
    assert not results.exists()  # refused before anything trained or was written


@pytest.mark.processes
def test_the_report_leaves_out_an_installed_plugin_that_raises_and_says_so(tmp_path):
    env = _broken_package(tmp_path)
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results" / "reference" / "smoke" / "runs", results / "runs")
    built = subprocess.run([sys.executable, "-m", "bnsuite.report", "--results", str(results), "--no-plots"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "bnsuite.report: left out a plugin, going on with the records: the plugin module 'typo_norms' " \
           "raised AttributeError at import" in built.stderr
    assert "Traceback" not in built.stderr and (results / "REPORT.md").exists()


FIVE_LOGITS = """from torch import nn

import bnsuite


@bnsuite.register_variant("five-logits", batch_statistics=False)
def five_logits():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))
"""


def test_a_model_with_the_wrong_output_is_refused_before_anything_trains(clean_registry, pytester, tmp_path):
    pytester.makepyfile(five_plugin=FIVE_LOGITS)
    results = tmp_path / "results"
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--pyargs", "bnsuite.benchmarks.test_study", "--bn-plugin", "five_plugin",
        "--bn-profile", "smoke", "--bn-studies", "batch", "--bn-variants", "plain,five-logits",
        "--bn-results-dir", str(results))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: bnsuite: the variant 'five-logits' on the mlp network gives (2, 5) for 2 "
                                 "images of mnist (given as (2, 784)); it must give (2, 10): one logit per class"])
    assert "Traceback" not in result.stderr.str() and not results.exists()


def test_a_model_that_fails_on_two_images_is_one_line_naming_it(clean_registry):
    from bnsuite.training.models import check_outputs

    @registry.register_variant("wrong-width", batch_statistics=False)
    def wrong_width():
        import torch.nn as nn

        return nn.Linear(100, 10)  # the images have 784 values

    spec = study_from_options("smoke", studies="batch", variants="plain,wrong-width")
    with pytest.raises(SpecError, match=r"^the variant 'wrong-width' on the mlp network fails on 2 images of mnist "
                                        r"\(given as \(2, 784\)\): RuntimeError: mat1 and mat2 shapes cannot be "):
        check_outputs(spec)
    check_outputs(study_from_options("smoke", studies="all", network="mlp,cnn"))  # every built-in passes


def test_two_claims_of_one_name_are_refused_naming_both_studies(clean_registry):
    import dataclasses

    spec = profile_spec("smoke")
    borrowed = next(claim for claim in study_claims(spec) if claim.name == "bn-accuracy-at-least-plain-bs64")
    registry.register_study("copycat", title="a study that reuses a name",
                            matrices=Study("copycat", ("plain", "bn"), (64,), 1))(
        lambda spec, study: [dataclasses.replace(borrowed, study="copycat")])
    with pytest.raises(SpecError, match=r"two claims are named 'bn-accuracy-at-least-plain-bs64': one of the study "
                                        r"'batch' \(bnsuite\) and one of the study 'copycat' \(plugin "):
        study_claims(study_from_options("smoke", studies="batch,copycat"))


def test_the_claims_marker_is_known_outside_bnsuite_s_own_directory(pytester):
    """pytester's directory has no pyproject.toml of bnsuite's: the marker must come from the plugin."""
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--pyargs", "bnsuite.benchmarks.test_claims",
                                          "--bn-profile", "smoke", "--collect-only", "-q",
                                          "-W", "error::pytest.PytestUnknownMarkWarning")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]
    assert "PytestUnknownMarkWarning" not in result.stdout.str()


def test_a_plugin_pins_known_exceptions_for_its_variant_in_a_built_in_study(clean_registry):
    pinned = KnownException("rms-accuracy-at-least-bn-bs64", NOT_SHOWN, "RMS norm is about BN's accuracy here")
    registry.register_known_exceptions("batch", "smoke", pinned)
    assert pinned in profile_spec("smoke").claims.known_exceptions
    assert pinned not in profile_spec("full").claims.known_exceptions  # only under the profile it was pinned for
    again = KnownException("rms-accuracy-at-least-bn-bs64", CONTRADICTED, "another view")
    with pytest.raises(PluginError, match=r"the claim 'rms-accuracy-at-least-bn-bs64' already has a known exception "
                                          r"in study 'batch' under 'smoke' \(pinned by .*test_plugins"):
        registry.register_known_exceptions("batch", "smoke", again)
    builtin = KnownException("bn-converges-faster-bs32", NOT_SHOWN, "mine")
    with pytest.raises(PluginError, match=r"already has a known exception .*\(pinned by bnsuite\)"):
        registry.register_known_exceptions("batch", "smoke", builtin)
    with pytest.raises(PluginError, match="cannot pin known exceptions for study 'mine': it is not registered"):
        registry.register_known_exceptions("mine", "smoke", pinned)


def test_a_plugins_measure_is_recorded_at_every_epoch_end_and_judged_by_a_claim_of_its_study(clean_registry,
                                                                                              mnist_dir):
    from bnsuite.core.claims import Claim, measured, needs, smaller
    from bnsuite.core.spec import SUPPORTED, ClaimSettings
    from bnsuite.training.evaluation import evaluate
    from bnsuite.training.train import train_seeds

    @registry.register_measure("held-out-error", title="held-out error (%), recomputed")
    def held_out_error(model, data):
        assert not model.training  # a copy in eval mode, at the epoch's end, with the run's held-out set
        return 100.0 - evaluate(model, data.held_out_images, data.held_out_labels)[1]

    def claims(spec, study):
        return [Claim("bn-lower-held-out-error", batch_size=64, statement="bn errs less", short="", study=study.name,
                      reason="my own reason", needs=needs(spec, study, ("plain", "bn"), 64), alpha=0.05,
                      judge=smaller(measured("held-out-error"), "held-out error %", variant="bn", reference="plain",
                                    batch_size=64, ratio=False))]

    registry.register_study("errors", title="errors", matrices=Study("errors", ("plain", "bn"), (64,), 2,
                                                                     measures=("held-out-error",)))(claims)
    spec = registry.study_spec(profile="test", seeds=(0, 1, 2), validation_size=10_000, train_subset=1_024,
                               claims=ClaimSettings(target_loss=0.5), studies=(
                                   Study("errors", ("plain", "bn"), (64,), 2, measures=("held-out-error",)),))
    registry.check_measures(spec)
    records = [record for group in spec.groups() for record in train_seeds(group, data_dir=mnist_dir, study=spec)]
    for record in records:
        assert [epoch.measure("held-out-error") for epoch in record.epochs] == pytest.approx(
            [100.0 - epoch.validation_accuracy for epoch in record.epochs])
    (verdict,) = [claim.evaluate(records) for claim in study_claims(spec)]
    assert verdict.verdict == SUPPORTED, verdict.describe()  # 32 steps: BN's error is far below plain's


def test_a_measure_that_is_not_a_finite_number_or_taken_is_one_clear_error(clean_registry, mnist_dir):
    from bnsuite.core.spec import RunSpec
    from bnsuite.training.train import train_seeds

    registry.register_measure("broken", title="a measure that fails")(lambda model, data: float("nan"))
    spec = RunSpec(variant="bn", epochs=1, train_subset=256, validation_size=10_000)
    with pytest.raises(SpecError, match="measure 'broken' .* gave nan for bn-bs64-seed0 at epoch 1; a measure "
                                        "returns a finite number"):
        train_seeds([spec], data_dir=mnist_dir, measures={"broken"})
    with pytest.raises(SpecError, match="measure 'unknown' is asked for but not registered"):
        train_seeds([spec], data_dir=mnist_dir, measures={"unknown"})
    with pytest.raises(PluginError, match="registered twice"):
        registry.register_measure("broken", title="again")(lambda model, data: 0.0)
    with pytest.raises(PluginError, match="one of bnsuite's own"):
        registry.register_measure("landscape", title="mine")(lambda model, data: 0.0)
