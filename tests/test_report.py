"""The report: every table, figure and discussion sentence from real records; protocols never pooled."""

import dataclasses
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from bnsuite.core import layout, report
from bnsuite.core.records import RUNS_SUBDIR, load_records, save_record
from bnsuite.core.registry import study_spec
from bnsuite.core.spec import ClaimSettings, KnownException, Study
from bnsuite.training.train import train, train_seeds

BATCH = Study("batch", variants=("plain", "bn"), batch_sizes=(128,), epochs=2)
STUDY = study_spec(profile="smoke", studies=(BATCH,), seeds=(0, 1), train_subset=1_024, validation_size=10_000,
                  claims=ClaimSettings(target_loss=0.5))
SCHEMA_1 = Path(__file__).parent / "data" / "schema1-full"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def records(mnist_dir):
    return [train(spec, data_dir=mnist_dir, study=STUDY) for spec in STUDY.run_specs()]


def _save(records, directory):
    for record in records:
        save_record(record, directory)
    return directory


@pytest.fixture
def results(tmp_path, records):
    return _save(records, tmp_path)


def _restudied(records, **changes):
    """The same runs as recorded by a study that asked for something else."""
    study = dataclasses.replace(STUDY, **changes)
    return [dataclasses.replace(record, study=study) for record in records]


def test_report_has_every_table_figure_and_the_environment(results):
    markdown = report.build_report(results, out=results / "REPORT.md", with_plots=True)
    for heading in ("Test accuracy without and with BN", "Discussion", "Training loss per epoch",
                    "Held-out loss per epoch: validation", "Held-out accuracy per epoch",
                    "Final epoch: training and held-out side by side", "Training time", "Claims",
                    "Running estimates against batch statistics", "Environment the records came from"):
        assert heading in markdown, heading
    for figure in ("training_loss.png", "held_out_accuracy.png", "accuracy_vs_batch_size.png",
                   "running_vs_batch_statistics.png"):
        assert f"]({figure})" in markdown
        assert (results / figure).read_bytes().startswith(PNG_MAGIC)


def test_headline_and_discussion_restate_the_measured_numbers(results, records):
    markdown = report.build_report(results, out=results / "REPORT.md", with_plots=False)
    plain = [r.test_accuracy for r in records if r.spec.variant == "plain"]
    bn = [r.test_accuracy for r in records if r.spec.variant == "bn"]
    difference = sum(bn) / 2 - sum(plain) / 2
    assert f"{difference:+.2f}" in markdown.split("## Discussion")[0]  # headline table
    assert f"{difference:+.2f} points at batch size 128" in markdown  # discussion
    # Two seeds cannot separate the variants at p <= 0.05, and the discussion must not pretend otherwise.
    assert "this was not shown at batch size 128" in markdown
    assert "**not shown**" in markdown


def test_claims_use_the_target_loss_the_study_recorded(tmp_path, records):
    markdown = report.build_report(_save(_restudied(records, claims=ClaimSettings(target_loss=0.37)), tmp_path),
                                   out=tmp_path / "REPORT.md", with_plots=False)
    assert "reaches a training loss of 0.37 in fewer epochs" in markdown
    assert "epochs to training loss <= 0.37" in markdown and "<= 0.5" not in markdown


def test_known_exceptions_come_from_the_records_with_their_verdict(tmp_path, records):
    known = KnownException("bn-lower-final-loss-bs128", "not shown", "two seeds are too few")
    study_claims = ClaimSettings(target_loss=0.5, known_exceptions=(known,))
    markdown = report.build_report(_save(_restudied(records, claims=study_claims), tmp_path),
                                   out=tmp_path / "REPORT.md", with_plots=False)
    assert "not shown: two seeds are too few" in markdown


def test_a_deliberately_narrowed_study_is_complete_and_a_missing_run_is_named(tmp_path, records):
    markdown = report.build_report(_save(records, tmp_path), out=tmp_path / "REPORT.md", with_plots=False)
    assert "incomplete" not in markdown  # the study asked for batch size 128 only
    next((tmp_path / RUNS_SUBDIR).glob("bn-bs128-seed1-*.json")).unlink()
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", with_plots=False)
    assert "The study is incomplete:** 3 of 4 runs are present; missing: bn-bs128-seed1" in markdown


def test_records_of_different_protocols_are_reported_separately(results, mnist_dir):
    study = dataclasses.replace(STUDY, studies=(dataclasses.replace(BATCH, variants=("plain",), epochs=1),),
                                seeds=(0,))
    other = train(study.run_spec(study.studies[0], "plain", 128, 0), data_dir=mnist_dir, study=study)
    save_record(other, results)
    markdown = report.build_report(results, out=results / "REPORT.md", with_plots=False)
    assert "runs of 2 different protocols" in markdown
    assert markdown.count("### Protocol") == 2
    assert "2 epochs" in markdown and "1 epochs" in markdown


def test_studies_of_one_protocol_with_other_claim_settings_are_not_pooled(results, records, tmp_path):
    _save(_restudied(records[:2], claims=ClaimSettings(target_loss=0.2), seeds=(0, 1, 2)), tmp_path)
    _save(records[2:], tmp_path)
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", with_plots=False)
    assert markdown.count("### Protocol") == 2 and "claims at target loss 0.2" in markdown


def test_runs_made_outside_a_study_are_reported_without_claims(tmp_path, records):
    for record in records:
        save_record(dataclasses.replace(record, study=None), tmp_path / "none")
    markdown = report.build_report(tmp_path / "none", out=tmp_path / "REPORT.md", with_plots=False)
    assert "made outside a study, so they carry no claim settings" in markdown
    assert "profile none" in markdown


def _sections(markdown: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in markdown.split("\n## ")[1:]}


def test_report_from_schema_1_records_keeps_every_table_that_version_wrote(tmp_path):
    markdown = report.build_report(SCHEMA_1, out=tmp_path / "REPORT.md", benchmarks=None, with_plots=True)
    ours, theirs = _sections(markdown), _sections((SCHEMA_1 / "REPORT.md").read_text())
    # The tables of measured numbers are the same; the claims changed since (the batch-size claims now state
    # what was measured), so the discussion and the claims table differ; the timing tables from
    # pytest-benchmark are not kept here; the environment table now also names CPU kernels and BLAS.
    kept = ["Protocol", "Test accuracy without and with BN", "Figures",
            "Training loss per epoch (mean of per-batch losses, mean over seeds)", "Held-out loss per epoch: test "
            "(per epoch)", "Held-out accuracy per epoch (%): test (per epoch)",
            "Final epoch: training and held-out side by side", "Training time (evaluation excluded)"]
    for heading in kept:
        assert ours[heading] == theirs[heading], heading
    def claim_row(section: str, claim: str) -> dict[str, str]:
        lines = section.splitlines()
        header = next(line for line in lines if line.startswith("| claim "))
        row = next(line for line in lines if line.startswith(f"| {claim} "))
        cells = [[cell.strip() for cell in line.split("|")] for line in (header, row)]
        return dict(zip(*cells, strict=True))

    for claim in ("bn-lower-final-loss-bs32", "bn-converges-faster-bs128", "bn-accuracy-at-least-plain-bs64"):
        new, old = claim_row(ours["Claims"], claim), claim_row(theirs["Claims"], claim)
        assert {column: new[column] for column in old} == old  # every column that version wrote, unchanged
        assert new["verdict"] == "**supported**" and new["effect [interval]"]
        assert new["after Holm over the run's claims"]
    assert "| 2.13.0+cu130 | cpu      | x86_64        |         2 | daae40a12e2d7b6307a0a04fb60f4763acd1a7dd" \
        in markdown


PACKAGE = Path(__file__).resolve().parents[1] / "bnsuite"
EDGE = ("bnsuite.study", "bnsuite.plugin", "bnsuite.executor", "bnsuite.docs")  # docs/code.md, "At the edge"


def _modules(folder: str) -> list[str]:
    return sorted(f"bnsuite.{folder}.{path.stem}" for path in (PACKAGE / folder).glob("*.py")
                  if path.stem != "__init__")


def test_the_torch_free_half_imports_no_torch_module_and_nothing_of_the_training_half():
    """Every module of bnsuite/core/ and the studies, the half the report and the baseline gate run on, imported in
    a fresh interpreter: neither torch nor a module of the training half (or the edge) comes with it."""
    free = ["bnsuite", *_modules("core"), "bnsuite.studies", *_modules("studies")]
    loaded = subprocess.run([sys.executable, "-c", f"import sys, {', '.join(free)}; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert {"bnsuite.core.records", "bnsuite.core.claims", "bnsuite.core.registry", "bnsuite.studies.batch"} <= set(
        loaded)
    assert not [name for name in loaded if name.startswith("bnsuite.training") or name in EDGE]
    assert not [name for name in loaded if name == "torch" or name.startswith("torch.")]


def test_the_two_halves_are_folders_the_edge_is_the_rest_and_code_md_lists_each_where_it_belongs():
    assert [name.rsplit(".", 1)[1] for name in _modules("core")] == sorted(layout.CORE)
    assert [name.rsplit(".", 1)[1] for name in _modules("training")] == sorted(layout.TRAINING)
    top = {path.stem for path in PACKAGE.glob("*.py")} | {path.name for path in PACKAGE.iterdir() if path.is_dir()
                                                           and (path / "__init__.py").exists()}
    edge = {name.split(".")[1] for name in EDGE}
    assert top == {"__init__", "core", "training", "studies", "benchmarks", *edge}  # benchmarks: a link, for --pyargs
    code = (PACKAGE.parent / "docs" / "code.md").read_text()
    free, rest = code.split("## The torch-free half")[1].split("## The training half")
    training, edge = rest.split("## At the edge")
    for folder, text in (("core", free), ("training", training)):
        for module in _modules(folder):
            assert f"`{module.replace('.', '/')}.py`" in text, module
    for module in EDGE:
        assert f"`{module.replace('.', '/')}.py`" in edge, module


def test_every_module_is_importable_by_its_flat_name_as_the_same_module():
    """`bnsuite.models` is `bnsuite.training.models`, imported on first use (docs/plugins.md's imports), and
    `python -m bnsuite.report` runs the report; records name builders by the flat name, as the committed
    references do."""
    import importlib

    for flat, location in layout.LOCATIONS.items():
        assert importlib.import_module(flat) is importlib.import_module(location), flat
        assert importlib.import_module(flat).__spec__.name == location  # the module keeps its own spec
    run = subprocess.run([sys.executable, "-m", "bnsuite.report", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "usage: python -m bnsuite.report" in run.stdout, run.stderr
    from bnsuite.core.registry import qualified
    from bnsuite.training.models import bn

    assert qualified(bn) == "bnsuite.models:bn"
    reference = PACKAGE.parent / "results" / "reference" / "smoke" / "runs"
    record = json.loads(next(reference.glob("bn-bs64-seed0*.json")).read_text())
    assert record["variant"]["builder"] == qualified(bn)


def _benchmark_json(path, benchmarks):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"datetime": "2026-11-28T00:00:00", "benchmarks": benchmarks}))
    return path


def test_timings_come_from_the_benchmarks_bnsuite_kind_not_their_names(results, tmp_path):
    stats = {"median": 12.5, "rounds": 1}
    storage = tmp_path / "benchmarks"
    _benchmark_json(storage / "Linux" / "0001_old.json", [
        {"name": "test_training_runs[bn-bs128]", "stats": stats, "extra_info": {}}])  # no kind: not read
    markdown = report.build_report(results, out=results / "REPORT.md", benchmarks=storage, with_plots=False)
    assert "pytest-benchmark timings" not in markdown
    _benchmark_json(storage / "Linux" / "0002_new.json", [
        {"name": "anything", "stats": stats,
         "extra_info": {"bnsuite": "case", "case": "bn-bs128", "profile": "smoke", "runs": ["a", "b"]}},
        {"name": "other", "stats": stats,
         "extra_info": {"bnsuite": "fraction", "variant": "bn", "batch_size": 128, "runs_together": 2,
                        "images": 20_000, "epoch_s_per_run": 1.5, "achieved_gflops": 40.0,
                        "fraction_of_matmul_peak": 0.25}}])
    markdown = report.build_report(results, out=results / "REPORT.md", benchmarks=storage, with_plots=False)
    assert "| bn-bs128 | smoke     |      2 |                         12.5 |" in markdown
    assert "| bn        | 128          | 2               | 20,000   | 1.50" in markdown


def test_the_speed_table_shows_the_roofline_and_the_most_reachable_fraction():
    info = {"bnsuite": "fraction", "variant": "plain", "batch_size": 64, "runs_together": 3, "epoch_s_per_run": 0.5,
            "achieved_gflops": 100.0, "fraction_of_matmul_peak": 0.3, "bytes_per_step": 18e6,
            "working_set_bytes": 10e6, "bandwidth_gbps": 44.0, "compute_bound_s": 0.00055,
            "traffic_bound_s": 0.0004, "limit": "compute", "step_s": 0.0015, "fraction_of_roofline": 0.37,
            "matmul_s": 0.0009, "matmul_fraction_of_peak": 0.61, "update_s": 0.0002, "floor_s": 0.0011,
            "fraction_of_roofline_ceiling": 0.5}
    table = "\n".join(report.speed_rows({"benchmarks": [{"name": "x", "extra_info": info}]}))
    assert "update alone (ms)" in table and "most reachable fraction" in table
    assert "| 0.37 (compute) " in table and "| 0.90; 0.61 " in table and "| 0.20 " in table and "| 0.50 " in table
    # A benchmark saved before the update was timed shows the rest of its row.
    del info["update_s"]
    assert "| 0.37 (compute) " in "\n".join(report.speed_rows({"benchmarks": [{"name": "x", "extra_info": info}]}))


def test_a_corrupt_benchmark_file_is_one_message_and_exit_2(results, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert report.main(["--results", str(results), "--benchmarks", str(broken), "--no-plots"]) == 2
    error = capsys.readouterr().err
    assert "broken.json: not a readable pytest-benchmark JSON file" in error and "Traceback" not in error


def test_report_cli_writes_the_report_and_the_console_script_points_at_it(results, capsys):
    out = results / "elsewhere" / "STUDY.md"
    assert report.main(["--results", str(results), "--out", str(out), "--no-plots"]) == 0
    assert out.read_text().startswith("# bnsuite report")
    assert "Test accuracy without and with BN" in capsys.readouterr().out
    scripts = {entry.name: entry for entry in entry_points(group="console_scripts")}
    assert scripts["bnsuite-report"].load() is report.main


def test_report_names_the_held_out_set_under_the_seed_protocol(tmp_path, records):
    for record in records:
        spec = dataclasses.replace(record.spec, validation_size=0)
        study = dataclasses.replace(record.study, validation_size=0)
        save_record(dataclasses.replace(record, spec=spec, study=study), tmp_path)
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", with_plots=False)
    assert "measured on the official 10,000 test images" in markdown


REASONS_STUDY = study_spec(profile="smoke", seeds=(0, 1), train_subset=512, validation_size=10_000,
                          claims=ClaimSettings(target_loss=0.5, trained_accuracy=50.0), studies=(
                              Study("lr", variants=("plain", "bn"), batch_sizes=(64,), epochs=1,
                                    lrs=(0.001, 0.01, 1.0)),
                              Study("init", variants=("plain", "bn"), batch_sizes=(64,), epochs=1,
                                    init_scales=(0.1, 10.0)),
                              Study("dropout", variants=("plain", "bn", "plain-dropout", "bn-dropout"),
                                    batch_sizes=(64,), epochs=1),
                              Study("ghost", variants=("bn-ghost2", "bn-ghost8", "bn", "ln"), batch_sizes=(128,),
                                    epochs=1),
                              Study("landscape", variants=("plain", "bn"), batch_sizes=(64,), epochs=1,
                                    measures=("landscape",)),
                              Study("placement", variants=("bn", "bn-after-relu"), batch_sizes=(64,), epochs=1),
                              Study("noise", variants=("plain", "bn", "bn-noisy"), batch_sizes=(64,), epochs=1),
                              Study("renorm", variants=("bn-ghost2", "bn-renorm2"), batch_sizes=(128,), epochs=1),
                              Study("ioffe2015", variants=("ioffe-plain", "ioffe-bn"), batch_sizes=(60,), epochs=1),
                          ))


def test_each_study_of_a_reason_for_bn_has_its_table_figure_claims_and_discussion_line(tmp_path, mnist_dir):
    for group in REASONS_STUDY.groups():
        for record in train_seeds(group, data_dir=mnist_dir, study=REASONS_STUDY):
            save_record(record, tmp_path)
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", with_plots=True)
    for heading, figure, claim in (
            ("## Learning rate: does BN allow higher learning rates?", "learning_rate.png",
             "bn-trains-where-plain-does-not-bs64"),
            ("## Initialization: is BN less sensitive to it?", "init_scale.png",
             "bn-less-sensitive-to-init-scale-bs64"),
            ("## Regularization: does BN reduce the need for dropout?", "dropout.png",
             "dropout-gains-bn-less-than-plain-bs64"),
            ("## Batch statistics at small batches: ghost-batch BN against LayerNorm", "ghost_batch.png",
             "bn-behind-layernorm-at-smallest-ghost-batch-bs128"),
            ("## Covariate shift by gradients, and the loss landscape (Santurkar et al. 2018)", "landscape.png",
             "bn-gradient-more-predictive-bs64"),
            ("## Placement: BN before or after the ReLU", "placement.png",
             "bn-after-relu-accuracy-at-least-before-bs64"),
            ("## Noisy BN: is it steadier distributions? (Santurkar et al. 2018)", "noisy_bn.png",
             "bn-noisy-larger-drift-than-bn-bs64"),
            ("## Batch Renormalization at small ghost batches (Ioffe 2017)", "batch_renorm.png",
             "bn-renorm-more-accurate-at-smallest-ghost-batch-bs128"),
            ("## Ioffe & Szegedy's MNIST experiment (2015, Figure 1)", "ioffe2015.png",
             "ioffe-bn-steadier-sigmoid-inputs-bs60")):
        assert heading in markdown and f"]({figure})" in markdown and f"| {claim} " in markdown
        assert (tmp_path / figure).read_bytes().startswith(PNG_MAGIC)
    for reason in ("**BN allows higher learning rates** (learning-rate study)",
                   "**BN reduces the sensitivity to initialization** (initialization study)",
                   "**BN acts as a regularizer, reducing the need for dropout** (dropout study)",
                   "**How BN's effect depends on the batch size** (ghost-batch study, Batch Renorm study)",
                   "**Where BN sits matters: before the nonlinearity, as Ioffe & Szegedy put it, or after it** "
                   "(placement study)", "(noisy-BN study)", "(landscape study)", "(Ioffe & Szegedy's MNIST study)",
                   "**BN's benefit is mainly the larger learning rate it allows (Bjorck et al. 2018)** "
                   "(learning-rate study)"):
        assert reason in markdown
    assert "**Where BN sits, on this network: batch 64: " in markdown
    ghost_section = markdown[markdown.index("## Batch statistics at small"):markdown.index("## Placement")]
    assert "Not covered by the fast step" not in ghost_section  # the fast step trains ghost-batch BN and LayerNorm
    eager = [dataclasses.replace(record, training_step="eager") for record in load_records(tmp_path)
             if record.spec.variant == "ln"]
    for record in eager:
        save_record(record, tmp_path)
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", with_plots=False)
    assert "trained by the eager step (autograd + torch.optim), as their records say: ln: eager." in markdown
    assert "Test accuracy without and with BN" not in markdown  # no batch-size study was asked for
    assert "incomplete" not in markdown


def test_a_layer_of_ones_own_is_reported_beside_the_eager_step_and_the_fused_bn():
    from bnsuite.core.report import speed_rows

    info = {"bnsuite": "own-layer", "variant": "bn-scratch", "batch_size": 64, "runs_together": 6, "images": 10_000,
            "steps": {"compiled": "compiled (inductor, torch 2.13.0, g++ 12)", "eager": "eager", "fused bn": "fused"},
            "epoch_s": {"compiled": 0.074, "eager": 0.269, "fused bn": 0.05}, "speedup_vs_eager": 0.269 / 0.074,
            "times_the_fused_bn": 0.074 / 0.05, "fraction_of_roofline": 0.3, "limit": "compute"}
    lines = "\n".join(speed_rows({"benchmarks": [{"extra_info": info}]}))
    assert "### Speed: a layer of one's own on the compiled step" in lines
    assert "| bn-scratch " in lines and "| 3.64x " in lines and "| 1.48x " in lines and "0.30 (compute)" in lines


def test_every_other_network_s_speed_is_one_table_with_its_name_and_old_convnet_benchmarks_read_into_it():
    from bnsuite.core.report import speed_rows

    roofline = {"bytes_per_step": 2e6, "compute_bound_s": 1e-3, "traffic_bound_s": 5e-4, "step_s": 4e-3,
                "fraction_of_roofline": 0.25, "limit": "compute"}
    fraction = {"variant": "bn", "batch_size": 64, "images": 10_000, "runs_together": 4, "epoch_s_per_run": 0.5,
                "achieved_gflops": 90.0, "fraction_of_matmul_peak": 0.25, **roofline}
    paths = {"variant": "bn", "batch_size": 64, "images": 10_000, "rounds": 3, "step": "eager",
             "epoch_s": {"original": 2.0, "eager": 1.0, "study": 0.5}, "speedup": {"original": 4.0, "eager": 2.0}}
    benchmarks = [{"extra_info": {"bnsuite": "network-fraction", "network": "resmlp", "network_title": "residual MLP",
                                  **fraction}},
                  {"extra_info": {"bnsuite": "convnet-fraction", **fraction, "step": "fused"}},  # before networks
                  {"extra_info": {"bnsuite": "network-paths", "network": "resmlp", "network_title": "residual MLP",
                                  **paths}}]
    lines = "\n".join(speed_rows({"benchmarks": benchmarks}))
    assert lines.count("### Speed: the other networks against the roofline") == 1
    assert "| residual MLP " in lines and "| ConvNet " in lines and "0.250 (compute)" in lines
    assert "### Speed: the other networks' epochs through each path" in lines
    assert "| 4.00x " in lines and "| 2.00x " in lines  # no NCHW path for a network of features


def test_the_tools_timings_over_many_records_are_reported():
    from bnsuite.core.report import speed_rows

    info = {"bnsuite": "tools", "records": 1029, "seconds": {"load": 1.3, "report": 2.45, "compare": 1.39}}
    lines = "\n".join(speed_rows({"benchmarks": [{"extra_info": info}]}))
    assert "| 1,029     | 1.30       | 2.45         | 1.39          |" in lines


def test_a_run_another_study_s_pytest_run_wrote_last_still_counts_for_this_study(tmp_path, records):
    """Two studies run by separate pytest runs into one results directory share a run: its one record names the
    study that wrote it last, and the other study is still complete."""
    other = dataclasses.replace(STUDY, studies=(dataclasses.replace(BATCH, name="landscape", variants=("bn",)),))
    _save(records, tmp_path)
    shared = next(record for record in records if record.spec.variant == "bn")
    save_record(dataclasses.replace(shared, study=other), tmp_path)  # the second pytest run writes over it
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", with_plots=False)
    assert "incomplete" not in markdown


def test_a_report_where_no_committed_reference_exists_says_it_was_not_compared(results, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as from an installed bnsuite: no results/reference/ here
    markdown = report.build_report(results, out=tmp_path / "REPORT.md", with_plots=False, baseline="auto")
    assert "Not compared: there is no committed reference `results/reference/smoke` here" in markdown
    assert "Not compared" not in report.build_report(results, out=tmp_path / "REPORT.md", with_plots=False,
                                                     baseline="none")
