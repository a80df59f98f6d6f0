"""Records: what a run carries, how it is read back, and how a bad or old record is handled."""

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bnsuite.core.records import (
    RUNS_SUBDIR,
    SCHEMA_VERSION,
    RecordError,
    RunRecord,
    epochs_frame,
    load_records,
    migrate_schema_15,
    runs_frame,
    save_record,
)
from bnsuite.core.registry import study_spec
from bnsuite.core.spec import ClaimSettings, Study
from bnsuite.training import environment
from bnsuite.training.train import train

SCHEMA_1 = Path(__file__).parent / "data" / "schema1-full"
STUDY = study_spec(profile="smoke", studies=(Study("batch", variants=("bn",), batch_sizes=(64,), epochs=2),),
                  seeds=(0, 1), train_subset=1_000, validation_size=10_000, claims=ClaimSettings(target_loss=0.5))


@pytest.fixture(scope="module")
def record(mnist_dir):
    return train(STUDY.run_spec(STUDY.studies[0], "bn", 64, 0), data_dir=mnist_dir, study=STUDY)


def _raw(record) -> dict:
    return json.loads(record.to_json())


def test_record_survives_a_json_round_trip_unchanged(record):
    assert RunRecord.from_json(record.to_json()) == record


def test_record_carries_its_study_group_and_environment(record):
    assert record.study == STUDY and record.profile == "smoke"
    assert record.trained_with == ("bn-bs64-seed0",) and record.runs_trained_together == 1
    assert 0 < record.final_train_accuracy_eval <= 100 and record.final_train_loss_eval > 0
    env = record.environment
    assert env.cpu_model and env.cpu_capability and env.blas and env.threads >= 1
    assert env.cpu_flags == tuple(sorted(env.cpu_flags))
    assert all(flag.startswith(environment.VECTOR_FLAG_PREFIXES) for flag in env.cpu_flags)
    assert set(env.fingerprint()) >= {"cpu_model", "cpu_flags", "blas", "torch_version", "threads", "device"}


def test_saved_records_load_back_as_one_row_per_run_and_per_epoch(record, tmp_path):
    other = RunRecord.from_json(json.dumps(_with(_raw(record), ["spec", "seed"], 1, ["trained_with"],
                                                 ["bn-bs64-seed1"])))
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


def _with(raw: dict, *changes) -> dict:
    """`raw` with each (path, value) pair of `changes` set; a value of ... deletes the field."""
    raw = json.loads(json.dumps(raw))
    for path, value in zip(changes[::2], changes[1::2], strict=True):
        target = raw
        for key in path[:-1]:
            target = target[key]
        if value is ...:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return raw


@pytest.mark.parametrize("change, message", [
    ((["test_accuracy"], "NaN"), "field test_accuracy: Input should be a valid number, got 'NaN'"),
    ((["epochs", 1, "test_accuracy"], 100.5), "field epochs.1.test_accuracy: Input should be less than or equal"),
    ((["epochs", 0, "train_loss"], -1.0), "field epochs.0.train_loss: Input should be greater than or equal to 0"),
    ((["steps"], "64"), "field steps: Input should be a valid integer"),
    ((["spec", "batch_size"], 0), "batch size must be at least 1"),
    ((["variant", "name"], "resnet"), "field variant describes 'resnet', not the run's variant 'bn'"),
    ((["variant", "images_per_statistic"], 3), "does not split into ghost batches of 3"),
    ((["variant", "batch_statistics"], False), "field variant differs from the study's description of bn"),
    ((["spec", "variant"], ...), "field spec.variant is missing"),
    ((["environment", "threads"], ...), "field environment.threads is missing"),
    ((["epochs", 1, "epoch_time_s"], ...), "field epochs.1.epoch_time_s is missing"),
    ((["study", "claims", "target_loss"], ...), "field study.claims.target_loss is missing"),
    ((["spec", "colour"], "red"), "field spec.colour: Unexpected keyword argument"),
    ((["environment", "dataset_checksum"], "abc"), "field environment.dataset_checksum: String should match"),
    ((["epochs", 1, "epoch"], 3), "field epochs must number 1 to 2 in order"),
    ((["trained_with"], ["bn-bs64-seed1"]), "field trained_with ['bn-bs64-seed1'] must be 1 distinct runs, "
                                            "this run (bn-bs64-seed0) among them"),
    ((["study", "studies", 0, "epochs"], 3), "field study does not include this run"),
    ((["study", "studies", 0, "name"], "no such/study"), "study name 'no such/study' must be letters"),
    ((["final_train_accuracy_eval"], ...), "field final_train_accuracy_eval is missing"),
    # Figures training writes from each other, edited apart (loaded records only).
    ((["test_accuracy"], 99.0), "field test_accuracy is 99.0, but its last epoch's test_accuracy is "),
    ((["train_time_s"], 12345.0), "field train_time_s is 12345.0, but its epochs' times sum to "),
    ((["steps"], 10**9), "field steps is 1000000000, more than the "),
])
def test_a_bad_field_is_refused_with_the_file_and_the_field(record, change, message):
    text = json.dumps(_with(_raw(record), *change))
    with pytest.raises(RecordError) as error:
        RunRecord.from_json(text, source="runs/a.json")
    assert str(error.value).startswith("runs/a.json: ") and message in str(error.value), str(error.value)


def test_malformed_record_is_refused_with_its_path(tmp_path):
    runs = tmp_path / RUNS_SUBDIR
    runs.mkdir()
    (runs / "broken.json").write_text('{"schema_version": 2, "spec": ')
    with pytest.raises(RecordError, match="broken.json: not valid JSON"):
        load_records(tmp_path)


def test_two_records_of_the_same_run_are_an_error_naming_both_files(record, tmp_path):
    path = save_record(record, tmp_path)
    shutil.copy(path, path.with_name("copy-of-the-same-run.json"))
    with pytest.raises(RecordError, match=r"bn-bs64-seed0-\w+\.json and .*copy-of-the-same-run.json are records "
                                          r"of the same run \(bn-bs64-seed0"):
        load_records(tmp_path)


def test_record_of_an_unknown_schema_version_is_refused(record):
    raw = _raw(record)
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(RecordError, match=f"schema version {SCHEMA_VERSION + 1} is not supported"):
        RunRecord.from_json(json.dumps(raw))


def test_schema_1_records_load_migrated_as_documented():
    records = load_records(SCHEMA_1)
    assert len(records) == 18
    record = next(r for r in records if r.spec.case_id == "bn-bs64-seed1")
    assert record.schema_version == SCHEMA_VERSION and record.executor == "local"
    assert record.environment.hostname is None
    assert record.variant.batch_statistics and record.variant.probe == "bn2" and record.variant.source == "bnsuite"
    assert [variant.name for variant in record.study.variants] == ["plain", "bn"]
    assert record.study.profile == "full" and record.study.claims.target_loss == 0.1
    batch = record.study.study("batch")
    assert (batch.variants, batch.batch_sizes, record.study.seeds) == (("plain", "bn"), (32, 64, 128), (0, 1, 2))
    assert record.study.claims.known_exception("bn-final-loss-rises-with-batch-size").verdict == "contradicted"
    assert record.runs_trained_together == 3 and record.trained_with is None  # schema 1 did not name the group
    assert record.environment.cpu_model is None and record.environment.blas is None
    assert record.spec.init_scale == 1.0 and record.final_train_accuracy_eval is None
    assert len({r.study for r in records}) == 1  # one study, as schema 1 ran it
    assert len(record.epochs) == 10 and record.test_accuracy == pytest.approx(98.22, abs=0.5)


def test_schema_1_record_of_a_run_trained_alone_names_its_own_seed_as_its_group():
    raw = json.loads(next((SCHEMA_1 / RUNS_SUBDIR).glob("plain-bs32-seed2-*.json")).read_text())
    raw["runs_trained_together"] = 1
    migrated = RunRecord.from_json(json.dumps(raw))
    assert migrated.trained_with == ("plain-bs32-seed2",)
    del raw["runs_trained_together"]  # records older than training seeds together
    assert RunRecord.from_json(json.dumps(raw)).trained_with == ("plain-bs32-seed2",)


def test_schema_1_record_of_a_seed_outside_the_default_matrix_joins_it():
    raw = json.loads(next((SCHEMA_1 / RUNS_SUBDIR).glob("plain-bs32-seed2-*.json")).read_text())
    raw["spec"]["seed"] = 7
    assert RunRecord.from_json(json.dumps(raw)).study.seeds == (0, 1, 2, 7)


def test_schema_1_record_of_no_profile_has_no_study():
    raw = json.loads(next((SCHEMA_1 / RUNS_SUBDIR).glob("plain-bs32-seed2-*.json")).read_text())
    raw["profile"] = None
    assert RunRecord.from_json(json.dumps(raw)).study is None
    raw["profile"] = "huge"
    with pytest.raises(RecordError, match="schema-1 field profile is 'huge'"):
        RunRecord.from_json(json.dumps(raw))


def test_epochs_to_target_of_a_run_that_diverged_later_is_never(record):
    reached = record.epochs_to_target(10.0)
    assert reached == 1
    diverged = dataclasses.replace(record, epochs=record.epochs[:1], diverged_at_epoch=2)
    assert diverged.epochs_to_target(10.0) is None
    assert diverged.final_train_loss == float("inf")


def test_results_directory_without_records_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Run the study first"):
        load_records(tmp_path)
    (tmp_path / RUNS_SUBDIR).mkdir()
    with pytest.raises(FileNotFoundError, match="no records"):
        load_records(tmp_path)


def test_commit_is_dirty_only_for_code_changes_not_for_results(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "bnsuite").mkdir(parents=True)
    (repo / "results").mkdir()
    (repo / "bnsuite" / "code.py").write_text("x = 1\n")
    (repo / "results" / "REPORT.md").write_text("old\n")
    for command in (["init", "-q"], ["add", "-A"],
                    ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(["git", *command], cwd=repo, check=True)
    monkeypatch.setattr(environment, "__file__", str(repo / "bnsuite" / "environment.py"))
    clean = environment.git_commit()
    assert clean and not clean.endswith("+dirty")
    (repo / "results" / "REPORT.md").write_text("new\n")
    assert environment.git_commit() == clean
    (repo / "bnsuite" / "code.py").write_text("x = 2\n")
    assert environment.git_commit() == clean + "+dirty"


def test_cpu_model_and_vector_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 fma sse4_2 avx512f amx_tile "
                       "rdrand\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9B14\n")
    assert environment.cpu_model_and_flags(cpuinfo) == ("AMD EPYC 9B14",
                                                        ("amx_tile", "avx2", "avx512f", "fma", "sse4_2"))


def test_schema_2_records_load_as_local_runs_on_an_unrecorded_host():
    schema_2 = Path(__file__).parent / "data" / "schema2"  # a record of the smoke reference as schema 2 saved it
    raw = json.loads(next((schema_2 / RUNS_SUBDIR).glob("*.json")).read_text())
    assert raw["schema_version"] == 2 and "executor" not in raw and "activations" not in raw
    (record,) = load_records(schema_2)
    assert (record.schema_version, record.executor, record.environment.hostname, record.activations) == (
        SCHEMA_VERSION, "local", None, None)
    assert record.spec.case_id == "bn-bs64-seed0" and record.test_accuracy == raw["test_accuracy"]


def test_schema_3_records_load_with_the_training_step_and_batch_statistics_unrecorded():
    schema_3 = Path(__file__).parent / "data" / "schema3"  # a record of the smoke reference as schema 3 saved it
    raw = json.loads(next((schema_3 / RUNS_SUBDIR).glob("*.json")).read_text())
    assert raw["schema_version"] == 3 and "training_step" not in raw
    (record,) = load_records(schema_3)
    assert (record.schema_version, record.training_step) == (SCHEMA_VERSION, None)
    assert [epoch.batch_statistics_accuracy for epoch in record.epochs] == [None] * len(raw["epochs"])
    assert record.activations is not None and record.executor == "local"
    assert [epoch.train_loss for epoch in record.epochs] == [epoch["train_loss"] for epoch in raw["epochs"]]


def test_activation_drift_is_the_mean_move_between_regular_checkpoints_relative_to_the_spread(record):
    from bnsuite.core.records import ActivationTrace

    def trace(paths, steps=(0, 100, 150, 200)):
        # one unit: 15th/50th/85th percentiles per checkpoint
        return ActivationTrace(every=100, steps=steps, units=(0,), percentiles=(15.0, 50.0, 85.0),
                               values=tuple(((p - 1.0, p, p + 1.0),) for p in paths))

    assert trace([0.0, 0.0, 5.0, 0.0]).drift() == 0.0  # the epoch-end checkpoint at step 150 is not regular
    assert trace([0.0, 1.0, 9.0, 3.0]).drift() == pytest.approx((1.0 + 2.0) / 2 / 2.0)  # moves 1, 2; spread 2
    with pytest.raises(RecordError, match="activations.steps must increase"):
        RunRecord.from_json(json.dumps({**_raw(record), "activations": {
            "every": 100, "steps": [0, 0], "units": [0], "percentiles": [50.0], "values": [[[1.0]], [[1.0]]]}}))


def test_schema_4_records_load_with_the_descriptions_of_the_variants_schema_4_had():
    raw = _raw(load_records(Path(__file__).parent / "data" / "schema3")[0])
    raw = {key: value for key, value in raw.items() if key != "variant"}
    raw["study"] = {key: value for key, value in raw["study"].items() if key != "variants"}
    record = RunRecord.from_json(json.dumps({**raw, "schema_version": 4}))
    assert record.variant == record.study.variant(record.spec.variant)
    assert (record.variant.name, record.variant.batch_statistics, record.variant.probe) == ("bn", True, "bn2")
    assert [v.name for v in record.study.variants] == list(dict.fromkeys(
        name for study in record.study.studies for name in study.variants))
    with pytest.raises(RecordError, match="schema-4 variant 'my-norm' is not one schema 4 had"):
        RunRecord.from_json(json.dumps({**raw, "schema_version": 4, "spec": {**raw["spec"], "variant": "my-norm"}}))


def test_schema_5_records_load_as_made_with_subnormals_kept_so_never_exactly_comparable_with_flushed_ones():
    schema_5 = Path(__file__).parent / "data" / "schema5"  # a collapsed smoke run, as schema 5 saved it
    raw = json.loads(next((schema_5 / RUNS_SUBDIR).glob("*.json")).read_text())
    assert raw["schema_version"] == 5 and "denormals" not in raw["environment"]
    (record,) = load_records(schema_5)
    assert (record.schema_version, record.environment.denormals) == (SCHEMA_VERSION, "kept")
    flushed = dataclasses.replace(record.environment, denormals="flushed")
    assert flushed.fingerprint() != record.environment.fingerprint()


def test_schema_6_records_load_with_the_landscape_unmeasured():
    schema_6 = Path(__file__).parent / "data" / "schema6"  # a smoke run of noisy BN, as schema 6 saved it
    raw = json.loads(next((schema_6 / RUNS_SUBDIR).glob("*.json")).read_text())
    assert raw["schema_version"] == 6 and "landscape" not in raw
    (record,) = load_records(schema_6)
    assert (record.schema_version, record.landscape) == (SCHEMA_VERSION, None)
    assert [study.measures for study in record.study.studies] == [()] * len(raw["study"]["studies"])
    assert record.activations is not None and record.spec.variant == "bn-noisy"  # the rest as it was


def test_a_record_file_of_binary_garbage_or_a_directory_is_a_record_error_naming_it(tmp_path):
    runs = tmp_path / RUNS_SUBDIR
    runs.mkdir()
    (runs / "garbage.json").write_bytes(bytes(range(128, 256)))
    with pytest.raises(RecordError, match=r"garbage.json: not a text \(UTF-8\) record file"):
        load_records(tmp_path)
    (runs / "garbage.json").unlink()
    (runs / "x.json").mkdir()
    with pytest.raises(RecordError, match=r"x.json is a directory, not a record file; move it out of"):
        load_records(tmp_path)


def test_schema_7_records_load_as_runs_of_the_studys_mlp_with_their_file_names_unchanged():
    schema_7 = Path(__file__).parent / "data" / "schema7"  # a smoke run of bn at batch 64, as schema 7 saved it
    path = next((schema_7 / RUNS_SUBDIR).glob("*.json"))
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 7 and "network" not in raw["spec"]
    (record,) = load_records(schema_7)
    assert record.schema_version == SCHEMA_VERSION
    assert (record.spec.network, record.variant.network) == ("mlp", "mlp")
    assert all(study.networks == ("mlp",) and study.network_epochs == () for study in record.study.studies)
    assert {variant.network for variant in record.study.variants} == {"mlp"}
    assert record.filename == path.name  # the MLP's case ids and fingerprints are what they were
    assert record.spec.case_id == "bn-bs64-seed0"


def test_an_edited_record_is_refused_by_the_report_and_by_accept_and_nothing_is_written(tmp_path, capsys):
    from bnsuite.core import baseline, report

    results = tmp_path / "results"
    shutil.copytree(Path(__file__).resolve().parents[1] / "results" / "reference" / "smoke" / "runs", results / "runs")
    edited = sorted((results / "runs").glob("bn-bs64-seed0-*.json"))[0]
    raw = json.loads(edited.read_text())
    raw["test_accuracy"] = 99.0  # its last epoch still says what it measured
    edited.write_text(json.dumps(raw))
    assert report.main(["--results", str(results), "--no-plots", "--benchmarks", str(tmp_path / "none")]) == 2
    assert baseline.main(["accept", str(results), "--to", str(tmp_path / "taken")]) == 2
    errors = capsys.readouterr().err
    assert f"{edited}: field test_accuracy is 99.0, but its last epoch's test_accuracy is " in errors
    assert errors.count("the record was changed after it was written") == 2
    assert not (results / "REPORT.md").exists() and not (tmp_path / "taken").exists()


def test_schema_15_records_say_where_their_slots_sit_and_their_dropout_as_built():
    """The MLP's placement and dropout variants were built whole up to schema 15: their records migrate saying what
    those builders built (BN after the ReLU; dropout 0.2), every other variant before the ReLU without dropout."""
    quick = Path(__file__).resolve().parents[1] / "results" / "reference" / "quick" / RUNS_SUBDIR
    for pattern, placement, dropout in (("bn-after-relu-bs64-seed0-*", "after", 0.0),
                                        ("bn-dropout-bs64-seed0-*", "before", 0.2),
                                        ("plain-dropout-bs64-seed0-*", "before", 0.2),
                                        ("bn-bs64-seed0-*", "before", 0.0)):
        path = next(quick.glob(pattern))
        assert json.loads(path.read_text())["schema_version"] < 16
        record = RunRecord.from_json(path.read_text())
        assert (record.variant.placement, record.variant.dropout) == (placement, dropout), pattern
        assert record.study.variant(record.spec.variant, "mlp") == record.variant
    network = {"name": "tiny", "title": "tiny", "slots": "features", "builder": "mine:tiny", "source": "mine 1.0"}
    migrated = migrate_schema_15({"schema_version": 15, "network": network, "study": {"networks": [network]}})
    assert migrated["network"] == migrated["study"]["networks"][0] == {**network, "placements": ["before"],
                                                                       "dropout": False}
