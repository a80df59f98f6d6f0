import json

import pytest

from bnsuite.records import (
    RUNS_SUBDIR, SCHEMA_VERSION, RecordError, RunRecord, epochs_frame, load_records, runs_frame, save_record,
)
from bnsuite.spec import RunSpec
from bnsuite.train import train


@pytest.fixture(scope="module")
def record(mnist_dir):
    return train(RunSpec(variant="bn", epochs=2, train_subset=1_000), data_dir=mnist_dir, profile="test")


def test_record_survives_a_json_round_trip_unchanged(record):
    assert RunRecord.from_json(record.to_json()) == record


def test_saved_records_load_back_as_one_row_per_run_and_per_epoch(record, tmp_path):
    other = RunRecord.from_json(record.to_json().replace('"seed": 0', '"seed": 1'))
    save_record(record, tmp_path)
    save_record(other, tmp_path)
    loaded = load_records(tmp_path)
    assert loaded == [record, other]
    runs, epochs = runs_frame(loaded), epochs_frame(loaded)
    assert list(runs["case"]) == ["bn-bs64-seed0", "bn-bs64-seed1"]
    assert len(epochs) == 4 and set(epochs.columns) >= {"train_loss", "validation_accuracy", "epoch_time_s"}
    assert runs.loc[0, "env_dataset_checksum"] == record.environment.dataset_checksum


def test_saving_leaves_no_temporary_file_behind(record, tmp_path):
    path = save_record(record, tmp_path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert path.name == f"bn-bs64-seed0-{record.spec.fingerprint}.json"


def test_malformed_record_is_refused_with_its_path(tmp_path):
    runs = tmp_path / RUNS_SUBDIR
    runs.mkdir()
    (runs / "broken.json").write_text('{"schema_version": 1, "spec": ')
    with pytest.raises(RecordError, match="broken.json: not valid JSON"):
        load_records(tmp_path)


def test_record_written_before_runs_were_trained_together_loads_as_trained_alone(record):
    raw = json.loads(record.to_json())
    del raw["runs_trained_together"]
    assert RunRecord.from_json(json.dumps(raw)).runs_trained_together == 1


def test_record_missing_fields_is_refused(record):
    raw = json.loads(record.to_json())
    del raw["environment"]
    with pytest.raises(RecordError, match="malformed record"):
        RunRecord.from_json(json.dumps(raw))


def test_record_of_an_unknown_schema_version_is_refused(record):
    raw = json.loads(record.to_json())
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(RecordError, match="schema version 2 is not supported"):
        RunRecord.from_json(json.dumps(raw))


def test_results_directory_without_records_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Run the study first"):
        load_records(tmp_path)
    (tmp_path / RUNS_SUBDIR).mkdir()
    with pytest.raises(FileNotFoundError, match="no records"):
        load_records(tmp_path)


def test_commit_is_dirty_only_for_code_changes_not_for_results(tmp_path, monkeypatch):
    import subprocess

    from bnsuite import records

    repo = tmp_path / "repo"
    (repo / "bnsuite").mkdir(parents=True)
    (repo / "results").mkdir()
    (repo / "bnsuite" / "code.py").write_text("x = 1\n")
    (repo / "results" / "REPORT.md").write_text("old\n")
    for command in (["init", "-q"], ["add", "-A"],
                    ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(["git", *command], cwd=repo, check=True)
    monkeypatch.setattr(records, "__file__", str(repo / "bnsuite" / "records.py"))
    clean = records.git_commit()
    assert clean and not clean.endswith("+dirty")
    (repo / "results" / "REPORT.md").write_text("new\n")
    assert records.git_commit() == clean
    (repo / "bnsuite" / "code.py").write_text("x = 2\n")
    assert records.git_commit() == clean + "+dirty"
