"""The report: every table, figure and discussion sentence from real records; protocols never pooled."""

import dataclasses
from importlib.metadata import entry_points

import pytest

from bnsuite import report
from bnsuite.records import save_record
from bnsuite.spec import RunSpec
from bnsuite.train import train

SMALL = dict(epochs=2, train_subset=1_024, validation_size=10_000, batch_size=128)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def records(mnist_dir):
    return [train(RunSpec(variant=variant, seed=seed, **SMALL), data_dir=mnist_dir, profile="smoke")
            for variant in ("plain", "bn") for seed in (0, 1)]


@pytest.fixture
def results(tmp_path, records):
    for record in records:
        save_record(record, tmp_path)
    return tmp_path


def test_report_has_every_table_figure_and_the_environment(results):
    markdown = report.build_report(results, out=results / "REPORT.md", with_plots=True)
    for heading in ("Test accuracy without and with BN", "Discussion", "Training loss per epoch",
                    "Held-out loss per epoch: validation", "Held-out accuracy per epoch",
                    "Final epoch: training and held-out side by side", "Training time", "Claims",
                    "Environment the records came from"):
        assert heading in markdown, heading
    for figure in ("training_loss.png", "held_out_accuracy.png", "accuracy_vs_batch_size.png"):
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
    assert "it was not shown at batch size 128" in markdown
    assert "**not shown**" in markdown


def test_records_of_different_protocols_are_reported_separately(results, mnist_dir):
    other = train(RunSpec(variant="plain", seed=0, **{**SMALL, "epochs": 1}), data_dir=mnist_dir, profile="smoke")
    save_record(other, results)
    markdown = report.build_report(results, out=results / "REPORT.md", with_plots=False)
    assert "runs of 2 different protocols" in markdown
    assert markdown.count("### Protocol") == 2
    assert "2 epochs" in markdown and "1 epochs" in markdown


def test_report_cli_writes_the_report_and_the_console_script_points_at_it(results, capsys):
    out = results / "elsewhere" / "STUDY.md"
    assert report.main(["--results", str(results), "--out", str(out), "--no-plots"]) == 0
    assert out.read_text().startswith("# bnsuite report")
    assert "Test accuracy without and with BN" in capsys.readouterr().out
    scripts = {entry.name: entry.value for entry in entry_points(group="console_scripts")}
    assert scripts.get("bnsuite-report") == "bnsuite.report:main"


def test_report_names_the_held_out_set_under_the_seed_protocol(tmp_path, records):
    for record in records:
        save_record(dataclasses.replace(record, spec=dataclasses.replace(record.spec, validation_size=0)), tmp_path)
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", with_plots=False)
    assert "measured on the official 10,000 test images" in markdown
