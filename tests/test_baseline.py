"""The regression gate on measured numbers: exact on the same machine, statistical elsewhere, with real training.

The study here is small (1 epoch on 4,000 images at batch 128, plain and bn, 8 seeds: about 2 s on 2 cores)
but real. "Another environment" is a real one too: the same machine with another thread count, which the
record's environment fingerprint tells apart and which makes MKL round differently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bnsuite.core import baseline as gate
from bnsuite.core import report
from bnsuite.core.records import RUNS_SUBDIR, load_records
from bnsuite.study import StudySession, study_from_options
from bnsuite.training import train as train_module
from bnsuite.training.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ",".join(map(str, range(8)))


def _study(**options):
    return study_from_options("smoke", studies="batch", variants="plain,bn", batch_sizes="128", seeds=SEEDS,
                              epochs=options.pop("epochs", 1), **options)


def _run(spec, results_dir, data_dir, *, threads=None):
    """Train every case of `spec` into `results_dir`, with `threads` torch threads if given; its records."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        session = StudySession(spec, results_dir=results_dir, data_dir=data_dir)
        return [record for group in spec.groups() for record in session.run_seeds(group)]
    finally:
        torch.set_num_threads(before)


def _other_threads() -> int:
    return 1 if torch.get_num_threads() > 1 else 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir):
    directory = tmp_path_factory.mktemp("baseline")
    _run(_study(), directory, mnist_dir)
    return gate.Baseline.load(directory)


def _scaled_init(monkeypatch, factor):
    """A code change the spec does not see: every Linear weight scaled after PyTorch's init."""
    def build(variant, init_scale=1.0, *args, **kwargs):
        model = build_model(variant, init_scale, *args, **kwargs)
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.mul_(factor)
        return model

    monkeypatch.setattr(train_module, "build_model", build)


def test_an_unchanged_rerun_on_the_same_machine_is_identical(reference, tmp_path, mnist_dir):
    comparisons = gate.compare(_run(_study(), tmp_path, mnist_dir), reference)
    assert [(c.name, c.rule, c.verdict) for c in comparisons] == [
        ("plain-bs128 (1 epoch)", gate.EXACT, gate.IDENTICAL), ("bn-bs128 (1 epoch)", gate.EXACT, gate.IDENTICAL)]


def test_an_unchanged_rerun_in_another_environment_passes_the_statistical_rule(reference, tmp_path, mnist_dir):
    records = _run(_study(), tmp_path, mnist_dir, threads=_other_threads())
    assert records[0].environment.fingerprint() != next(iter(reference.records.values())).environment.fingerprint()
    comparisons = gate.compare(records, reference)
    assert [c.rule for c in comparisons] == [gate.STATISTICAL] * 2
    assert not [c.describe() for c in comparisons if c.failed]


def test_a_scaled_init_is_caught_by_both_rules_and_the_reverse_is_reported_better(reference, tmp_path, mnist_dir,
                                                                                  monkeypatch):
    _scaled_init(monkeypatch, 0.5)
    same_machine = gate.compare(_run(_study(), tmp_path / "same", mnist_dir), reference)
    assert [(c.rule, c.verdict) for c in same_machine] == [(gate.EXACT, gate.DIFFERS)] * 2
    assert same_machine[0].detail.startswith("plain-bs128-seed0: epoch 1 train_loss: ")

    changed = _run(_study(), tmp_path / "other", mnist_dir, threads=_other_threads())
    plain, bn = gate.compare(changed, reference)
    # Plain loses about 40 points of accuracy; BN, insensitive to the initialization's scale, moves within
    # seed noise, so only the exact rule can see the change in BN's numbers.
    assert plain.verdict == gate.WORSE and plain.failed
    assert plain.metrics[0].verdict == gate.WORSE and plain.metrics[0].change < -20
    assert bn.verdict == gate.WITHIN

    # The other way round, the numbers are better: reported, never failed.
    reverse = gate.compare_configuration([r for r in reference.records.values() if r.spec.variant == "plain"],
                                         [r for r in changed if r.spec.variant == "plain"])
    assert reverse.verdict == gate.BETTER and not reverse.failed


def test_a_baseline_of_another_protocol_is_refused_with_what_differs(reference):
    with pytest.raises(gate.BaselineError, match=r"batch study epochs: baseline 1, this study 2"):
        gate.check_protocol(reference, _study(epochs=2))
    with pytest.raises(gate.BaselineError, match=r"profile: baseline smoke, this study quick; dataset: baseline "
                                                  r"mnist, this study fashion-mnist; train subset: baseline 4000"):
        gate.check_protocol(reference, study_from_options("quick", studies="batch", dataset="fashion-mnist"))


def test_configurations_on_one_side_only_are_listed_not_gated(reference):
    study = study_from_options("smoke", studies="batch", variants="bn,bn-scratch", batch_sizes="128", seeds=SEEDS,
                               epochs=1)
    gate.check_protocol(reference, study)  # the same protocol, another matrix
    assert gate.unmatched(study.run_specs(), reference) == (["bn-scratch-bs128 (1 epoch)"],
                                                            ["plain-bs128 (1 epoch)"])


def test_accept_replaces_the_baseline_whole_and_refuses_a_partial_study(reference, tmp_path):
    target = tmp_path / "reference" / "smoke"
    (target / RUNS_SUBDIR).mkdir(parents=True)
    (target / RUNS_SUBDIR / "stale-record.json").write_text("{}")
    storage = tmp_path / "benchmarks" / "Linux-CPython-3.11-64bit"
    storage.mkdir(parents=True)
    (storage / "0001_old.json").write_text("{}")
    (storage / "0002_new.json").write_text("{}")
    assert gate.main(["accept", str(reference.directory), "--to", str(target),
                      "--benchmarks", str(tmp_path / "benchmarks")]) == 0
    assert {r.spec for r in load_records(target)} == set(reference.records)
    # The newest benchmark JSON, in pytest-benchmark's layout (a folder per machine) that the report reads.
    assert [p.relative_to(target).as_posix() for p in (target / "pytest-benchmark").rglob("*.json")] == [
        "pytest-benchmark/Linux-CPython-3.11-64bit/0002_new.json"]
    assert not (target / RUNS_SUBDIR / "stale-record.json").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["smoke"]  # no staging directory left behind

    partial = tmp_path / "partial"
    shutil.copytree(reference.directory, partial)
    next((partial / RUNS_SUBDIR).glob("bn-*.json")).unlink()
    with pytest.raises(gate.BaselineError, match=r"is not a complete study \(1 runs missing: bn-bs128-seed"):
        gate.accept(partial, target)
    assert {r.spec for r in load_records(target)} == set(reference.records)  # the baseline is untouched


def test_compare_command_exits_1_on_a_worse_study_and_0_on_an_unchanged_one(reference, tmp_path, mnist_dir,
                                                                          monkeypatch, capsys):
    _run(_study(), tmp_path / "same", mnist_dir)
    assert gate.main(["compare", str(tmp_path / "same"), "--baseline", str(reference.directory)]) == 0
    assert "2 configurations compared" in capsys.readouterr().out
    _scaled_init(monkeypatch, 0.5)
    _run(_study(), tmp_path / "changed", mnist_dir)
    assert gate.main(["compare", str(tmp_path / "changed"), "--baseline", str(reference.directory)]) == 1
    assert "2 failed (bn-bs128 (1 epoch), plain-bs128 (1 epoch))" in capsys.readouterr().out


def test_compare_command_names_the_results_and_the_baseline_each_by_its_role(reference, tmp_path, capsys):
    (tmp_path / "new" / "runs").mkdir(parents=True)
    assert gate.main(["compare", str(tmp_path / "new"), "--baseline", str(reference.directory)]) == 2
    assert capsys.readouterr().err.startswith(f"bnsuite.baseline: results {tmp_path / 'new'}: no records in")
    assert gate.main(["compare", str(reference.directory), "--baseline", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.startswith(f"bnsuite.baseline: baseline {tmp_path / 'new'}: no records in")


PLUGIN_CASE = """
def test_case(case, study_session, check_baseline):
    failed = [c.describe() for c in check_baseline(study_session.run_seeds(case)) if c.failed]
    assert not failed, "; ".join(failed)
"""


def test_the_plugin_gates_each_case_and_refuses_to_overwrite_its_baseline(pytester, reference, tmp_path, mnist_dir):
    pytester.makepyfile(test_plugin_baseline=PLUGIN_CASE)
    options = ["-p", "no:cacheprovider", "--bn-profile", "smoke", "--bn-studies", "batch",
               "--bn-variants", "plain", "--bn-batch-sizes", "128", "--bn-seeds", SEEDS, "--bn-epochs", "1",
               "--bn-data-dir", str(mnist_dir), "--bn-baseline", str(reference.directory)]
    result = pytester.runpytest_inprocess(*options, "--bn-results-dir", str(tmp_path / "now"))
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines([f"  against the baseline {reference.directory}: 1 configurations gated",
                                 "  in the baseline only, not gated: bn-bs128 (1 epoch)",
                                 "*IDENTICAL  plain-bs128 (1 epoch) (exact): 8 runs equal bit for bit, every epoch"])
    refused = pytester.runpytest_inprocess(*options, "--bn-results-dir", str(reference.directory))
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    assert "is never overwritten by the run it gates" in refused.stderr.str()
    assert {r.spec for r in load_records(reference.directory)} == set(reference.records)


def test_the_report_shows_each_configuration_against_the_baseline(reference, tmp_path, mnist_dir, monkeypatch):
    monkeypatch.chdir(ROOT)  # where "auto" looks for results/reference/
    _run(_study(), tmp_path, mnist_dir)
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", baseline=reference.directory)
    section = markdown.split("## Against the baseline")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in section.splitlines() if "(1 epoch)" in line]
    assert ["plain-bs128 (1 epoch)", "exact", "identical"] in rows and len(rows) == 2
    assert "0 of 2 configurations fail the gate." in section
    assert (tmp_path / "against_baseline.png").read_bytes().startswith(b"\x89PNG")
    # "auto" finds the committed smoke reference, of another protocol than this narrowed study: said, not compared.
    auto = report.build_report(tmp_path, out=tmp_path / "R.md", baseline="auto", with_plots=False)
    assert "Not compared: baseline results/reference/smoke was made under another protocol (batch study epochs: " \
           "baseline 2, this study 1)" in auto
    assert "Against the baseline" not in report.build_report(tmp_path, out=tmp_path / "R.md", baseline=None,
                                                             with_plots=False)


def test_an_accept_that_cannot_write_leaves_nothing_behind_and_the_old_baseline_whole(reference, tmp_path, monkeypatch,
                                                                                        capsys):
    target = tmp_path / "reference" / "smoke"
    assert gate.main(["accept", str(reference.directory), "--to", str(target)]) == 0
    before = {path.relative_to(target): path.read_bytes() for path in target.rglob("*") if path.is_file()}
    written = []
    real_write = Path.write_text

    def disk_fills(path, text, *args, **kwargs):  # the third record does not fit
        written.append(path)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_fills)
    assert gate.main(["accept", str(reference.directory), "--to", str(target)]) == 2
    error = capsys.readouterr().err
    assert error == (f"bnsuite.baseline: cannot assemble the new baseline in {target}.new (No space left on device); "
                     f"the baseline {target} is unchanged: free space or fix the permissions of {target.parent}, "
                     "then accept again\n")
    assert sorted(p.name for p in target.parent.iterdir()) == ["smoke"]  # no staging directory left behind
    assert {path.relative_to(target): path.read_bytes() for path in target.rglob("*") if path.is_file()} == before
