"""Bad input, interruption, concurrency, divergence and untrusted files: nothing lies, nothing is lost."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bnsuite.core import registry, report
from bnsuite.core.claims import study_claims
from bnsuite.core.idx import IdxFormatError, encode_idx, md5_of
from bnsuite.core.records import RUNS_SUBDIR, load_records, save_record
from bnsuite.core.registry import PluginError
from bnsuite.core.spec import SUPPORTED, RunSpec, SpecError
from bnsuite.study import StudySession, study_from_options
from bnsuite.training import data
from bnsuite.training.train import train
from conftest import write_small_idx_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(epochs=1, train_subset=512, validation_size=10_000, batch_size=128)


def _register_small_dataset(monkeypatch, arrays):
    """Point the mnist entry at small files with their own MD5s, so checks behind the MD5 can be reached."""
    info = dataclasses.replace(data.DATASETS["mnist"], md5={n: md5_of(encode_idx(a)) for n, a in arrays.items()})
    monkeypatch.setitem(data.DATASETS, "mnist", info)
    data._cached_read.cache_clear()


def test_image_and_label_counts_that_disagree_are_refused(tmp_path, monkeypatch):
    raw_dir = tmp_path / "MNIST" / "raw"
    arrays = write_small_idx_dir(raw_dir)
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    (raw_dir / "train-labels-idx1-ubyte").write_bytes(encode_idx(arrays["train-labels-idx1-ubyte"]))
    _register_small_dataset(monkeypatch, arrays)
    with pytest.raises(IdxFormatError, match="train split has 20 images but 19 labels"):
        data.load_raw("mnist", data_dir=tmp_path, sources=("local",))


def test_wrong_magic_number_in_a_data_file_is_refused(tmp_path, monkeypatch):
    raw_dir = tmp_path / "MNIST" / "raw"
    arrays = write_small_idx_dir(raw_dir)
    broken = bytearray(encode_idx(arrays["t10k-labels-idx1-ubyte"]))
    broken[3] = 3  # claims 3 dimensions
    (raw_dir / "t10k-labels-idx1-ubyte").write_bytes(bytes(broken))
    _register_small_dataset(monkeypatch, arrays)
    monkeypatch.setitem(data.DATASETS["mnist"].md5, "t10k-labels-idx1-ubyte", md5_of(bytes(broken)))
    with pytest.raises(IdxFormatError, match="3 dimensions, expected 1"):
        data.load_raw("mnist", data_dir=tmp_path, sources=("local",))


@pytest.mark.parametrize("options, message", [
    (dict(profile="huge"), "unknown profile 'huge'"),
    (dict(dataset="svhn"), "unknown dataset 'svhn'"),
    (dict(variants="plain,resnet"), "unknown variant 'resnet'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(batch_sizes="0"), "batch size must be at least 1"),
    (dict(batch_sizes="-8"), "batch size must be at least 1"),
    (dict(batch_sizes="sixty"), "batch size must be a whole number"),
    (dict(batch_sizes="32,32"), "repeat a value"),
    (dict(batch_sizes="5000", profile="smoke"), "larger than the training set"),
    (dict(epochs="0"), "epochs must be at least 1"),
    (dict(epochs="-2"), "epochs must be at least 1"),
    (dict(seeds=""), "no seeds given"),
    (dict(seeds="0"), "a single number is a seed count, and 0 seeds train nothing; for seed 0 alone write 0-0"),
    (dict(seeds="5-3"), "runs backwards"),
    (dict(seeds="0-2,2"), "repeat a seed"),
    (dict(seeds="a-3"), "seed must be a whole number"),
    (dict(target_loss="nan"), "target loss must be a finite number > 0"),
    (dict(lr="0"), "learning rate must be a finite number > 0"),
    (dict(lr="-0.1"), "learning rate must be a finite number > 0"),
    (dict(lr="inf"), "learning rate must be a finite number > 0"),
    (dict(lr="fast"), "learning rate must be a number"),
])
def test_bad_study_options_fail_before_anything_trains(options, message):
    with pytest.raises(SpecError, match=message):
        study_from_options(**options)


STUDY_TEST = """
def test_a_case(study_session):
    pass
"""
PLAIN_TEST = """
def test_nothing_to_do_with_the_study():
    pass
"""


def _run_plugin(pytester, *args):
    # In process: a subprocess would spend most of its time importing torch again.
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)


@pytest.mark.parametrize("option, message", [
    (["--bn-batch-sizes", "0"], "bnsuite: batch size must be at least 1, got 0"),
    (["--bn-profile", "huge"], "bnsuite: unknown profile 'huge'; choose one of: full, quick, smoke"),
    (["--bn-results-dir", "/dev/null/results"], "bnsuite: cannot write records to /dev/null/results (Not a directory)"),
])
def test_bad_option_on_the_command_line_is_one_message_and_no_traceback(pytester, option, message):
    pytester.makepyfile(test_plugin_case=STUDY_TEST)
    result = _run_plugin(pytester, *option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # nothing ran
    assert message in result.stderr.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_a_bad_most_runs_together_in_the_environment_is_one_message_before_anything_trains(pytester, monkeypatch):
    monkeypatch.setenv("BNSUITE_MAX_RUNS_TOGETHER", "all")
    pytester.makepyfile(test_plugin_case=STUDY_TEST)
    result = _run_plugin(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "bnsuite: BNSUITE_MAX_RUNS_TOGETHER='all' is not a number of runs" in result.stderr.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_results_and_data_are_checked_only_when_the_run_collects_a_study_case(pytester, tmp_path):
    corrupt = tmp_path / "data"
    (corrupt / "MNIST" / "raw").mkdir(parents=True)
    (corrupt / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an image file")
    pytester.makepyfile(test_plugin_plain=PLAIN_TEST, test_plugin_case=STUDY_TEST)
    options = ["--bn-results-dir", "/dev/null/results", "--bn-data-dir", str(corrupt)]
    assert _run_plugin(pytester, "test_plugin_plain.py", *options).ret == pytest.ExitCode.OK
    assert _run_plugin(pytester, "-k", "nothing_to_do", *options).ret == pytest.ExitCode.OK  # deselected
    unwritable = _run_plugin(pytester, *options)
    assert unwritable.ret == pytest.ExitCode.USAGE_ERROR
    assert "cannot write records to /dev/null/results" in unwritable.stderr.str()
    bad_data = _run_plugin(pytester, "--bn-results-dir", str(tmp_path / "results"), "--bn-data-dir", str(corrupt))
    assert bad_data.ret == pytest.ExitCode.USAGE_ERROR
    bad_data.stderr.fnmatch_lines(["*train-images-idx3-ubyte: * does not match the expected 6bbc9ace*"])
    assert not list((tmp_path / "results").glob("runs/*.json"))


def test_a_benchmark_run_describes_its_study_and_lists_the_claims_judged(pytester, tmp_path, mnist_dir):
    pytester.makepyfile(test_plugin_claims="""
        from bnsuite.claims import ClaimResult

        def test_claim(study_session, record_claim):
            record_claim(ClaimResult("a-claim", "A statement.", "a rule", "the evidence", "supported", 0.05), [])
    """)
    result = _run_plugin(pytester, "--bn-profile", "smoke", "--bn-batch-sizes", "128", "--bn-studies", "batch,lr",
                         "--bn-results-dir", str(tmp_path), "--bn-data-dir", str(mnist_dir))
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines([
        "bnsuite study: profile smoke, mnist, 4000 training images, 10000 held out for validation, seeds 0,1,2; "
        "30 runs in 4 cases*",
        "  batch study: variants plain,bn x batch sizes 128, 2 epochs",
        "  lr study: variants plain,bn x batch sizes 64 x learning rates 0.001,0.01,0.1,1, 2 epochs",
        "*bnsuite claims*",
        "*SUPPORTED  a-claim: the evidence",
    ])
    stored = json.loads((tmp_path / "claims.json").read_text())["claims"]  # the verdict, as data
    assert [(entry["result"]["name"], entry["result"]["verdict"]) for entry in stored] == [("a-claim", "supported")]
    (tmp_path / "claims.json").write_text("{damaged")  # a damaged verdicts file: one line, the run still passes
    again = _run_plugin(pytester, "--bn-profile", "smoke", "--bn-batch-sizes", "128", "--bn-studies", "batch,lr",
                        "--bn-results-dir", str(tmp_path), "--bn-data-dir", str(mnist_dir))
    assert again.ret == pytest.ExitCode.OK
    again.stdout.fnmatch_lines([f"bnsuite: the claims' verdicts could not be stored in {tmp_path} (*claims.json: "
                                "cannot read the stored verdicts*delete it*"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_before_anything_trains():
    with pytest.raises(SpecError, match="torch sees no CUDA GPU here; use --bn-device cpu"):
        study_from_options(device="cuda")


def test_unwritable_results_directory_is_a_clear_error(tmp_path, mnist_dir):
    record = train(RunSpec(variant="plain", **TINY), data_dir=mnist_dir)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the results directory should be")
    with pytest.raises(OSError, match="cannot write the record .* choose a writable results directory"):
        save_record(record, blocker)


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist. Run the study first"),
    ("empty", "no records in"),
    ("malformed", "not valid JSON"),
    ("future", "schema version 99 is not supported"),
    ("binary", "a.json: not a text (UTF-8) record file"),
    ("directory", "a.json is a directory, not a record file; move it out of"),
])
def test_report_cli_gives_one_message_and_exit_2_for_unusable_results(tmp_path, capsys, layout, message):
    results = tmp_path / "results"
    if layout != "missing":
        (results / RUNS_SUBDIR).mkdir(parents=True)
    if layout == "malformed":
        (results / RUNS_SUBDIR / "a.json").write_text("{")
    if layout == "future":
        (results / RUNS_SUBDIR / "a.json").write_text(json.dumps({"schema_version": 99}))
    if layout == "binary":
        (results / RUNS_SUBDIR / "a.json").write_bytes(bytes(range(256)))
    if layout == "directory":
        (results / RUNS_SUBDIR / "a.json").mkdir()
    assert report.main(["--results", str(results), "--no-plots"]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and "--out" not in error  # the input is named, not the output
    assert not (results / "REPORT.md").exists()


WRITER = textwrap.dedent("""
    import sys
    from bnsuite.records import RunRecord, save_record
    template = open(sys.argv[1]).read()
    i = 0
    while True:  # rewrite the same record, a new version each time, until killed
        i += 1
        save_record(RunRecord.from_json(template.replace('"started_at": "', f'"started_at": "{i}-')), sys.argv[2])
        if i == 1:
            print("writing", flush=True)
""")


@pytest.mark.processes
def test_a_record_write_killed_at_any_moment_leaves_the_old_or_the_complete_new_record(tmp_path, mnist_dir):
    record = train(RunSpec(variant="bn", **TINY), data_dir=mnist_dir)
    template = tmp_path / "template.json"
    template.write_text(record.to_json())
    delays = (0.0, 0.007, 0.031)
    results = [tmp_path / f"results-{index}" for index in range(len(delays))]
    for directory in results:
        save_record(record, directory)  # the old state
    # One writer per directory, started together: they pay their imports side by side.
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(template), str(directory)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True) for directory in results]
    for writer, directory, delay in zip(writers, results, delays, strict=True):
        assert writer.stdout.readline().strip() == "writing"  # killed mid-loop, not before the first write
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        records = load_records(directory)  # raises on any partial or malformed record
        assert len(records) == 1 and records[0].spec == record.spec
        assert re.match(r"\d+-", records[0].started_at)  # a complete record from the killed writer
        assert [p.name for p in (directory / RUNS_SUBDIR).glob("*.json")] == [record.filename]


def test_an_interrupted_study_keeps_its_finished_records_and_the_report_says_it_is_incomplete(
        tmp_path, mnist_dir, monkeypatch):
    import bnsuite.study as study_module

    study = study_from_options("smoke", studies="batch", batch_sizes="128", seeds="0,1", epochs="1")
    session = StudySession(study, results_dir=tmp_path, data_dir=mnist_dir)
    specs = study.run_specs()
    for spec in specs[:3]:
        session.run(spec)
    real_train_seeds = study_module.train_seeds

    def interrupted_in_first_epoch(specs, **kwargs):
        def stop(spec, epoch):
            raise KeyboardInterrupt  # what Ctrl-C does half-way through a run

        return real_train_seeds(specs, **{**kwargs, "on_epoch": stop})

    monkeypatch.setattr(study_module, "train_seeds", interrupted_in_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        session.run(specs[3])
    assert len(load_records(tmp_path)) == 3
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", with_plots=False)
    assert "The study is incomplete" in markdown and "bn-bs128-seed1" in markdown


def _pytest_study(results, *extra):
    return [sys.executable, "-m", "pytest", "benchmarks/test_study.py", "--bn-profile", "smoke", "--bn-epochs", "1",
            "--bn-studies", "batch", "--bn-batch-sizes", "128", "--bn-results-dir", str(results), "-q",
            "-p", "no:cacheprovider", *extra]


@pytest.mark.processes
def test_two_pytest_processes_writing_one_results_directory_keep_every_record(tmp_path, mnist_dir):
    results = tmp_path / "shared"
    # One thread each: two torch processes that each spread over every core slow each other down many times over.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_pytest_study(results, "--bn-seeds", "0,1"), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = subprocess.Popen(_pytest_study(results, "--bn-seeds", "2,3"), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [first.communicate(timeout=300)[0], second.communicate(timeout=300)[0]]
    assert first.returncode == 0 and second.returncode == 0, outputs
    records = load_records(results)
    assert sorted(r.spec.case_id for r in records) == sorted(
        f"{v}-bs128-seed{s}" for v in ("plain", "bn") for s in range(4))


@pytest.mark.processes
def test_xdist_workers_writing_one_results_directory_keep_every_record(tmp_path, mnist_dir):
    results = tmp_path / "xdist"
    run = subprocess.run(_pytest_study(results, "--bn-seeds", "0,1", "-n", "2"), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout  # plain-bs128 and bn-bs128, each training seeds 0 and 1 together
    assert len(load_records(results)) == 4


def test_a_diverging_run_is_recorded_the_study_goes_on_and_claims_and_report_say_so(tmp_path, mnist_dir):
    study = study_from_options("smoke", studies="batch", batch_sizes="128", seeds="0,1,2", epochs="2")
    lines = []
    session = StudySession(study, results_dir=tmp_path, data_dir=mnist_dir, progress=lines.append)
    plain_seed0 = study.run_spec(study.study("batch"), "plain", 128, 0)
    exploding = dataclasses.replace(plain_seed0, lr=5.0)
    assert session.run(exploding).diverged_at_epoch == 1
    assert any("plain-bs128-lr5-seed0: diverged in epoch 1; the study goes on" in line for line in lines)
    records = [session.record(spec) for spec in study.run_specs()]
    # The claim judged with the diverged run in plain seed 0's place.
    in_its_place = dataclasses.replace(session.record(exploding), spec=plain_seed0, trained_with=(plain_seed0.case_id,))
    records = [in_its_place if r.spec == plain_seed0 else r for r in records]
    claim = next(c for c in study_claims(study) if c.name == "bn-lower-final-loss-bs128")
    verdict = claim.evaluate(records)
    # The diverged run counts as plain's worst, so bn beats all 9 pairs: p = 1/20. Dropping it (p = 1/10)
    # or counting it best would leave the claim not shown.
    assert "1 diverged" in verdict.evidence and verdict.verdict == SUPPORTED
    markdown = report.build_report(tmp_path, out=tmp_path / "REPORT.md", with_plots=False)
    assert "Diverged runs:** plain-bs128-lr5-seed0" in markdown


def test_no_torch_load_without_weights_only_and_no_archive_extraction_in_bnsuite():
    sources = {path: path.read_text() for path in (ROOT / "bnsuite").glob("*.py")}
    for path, text in sources.items():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "extractall" not in text and ".extract(" not in text, f"{path.name} extracts an archive"


@pytest.mark.parametrize(("seeds", "expected"), [("8", tuple(range(8))), ("0-7", tuple(range(8))),
                                                 ("0,1,2", (0, 1, 2)), ("3-3", (3,)), ("0-2,10", (0, 1, 2, 10))])
def test_seeds_are_a_count_a_range_or_a_list(seeds, expected):
    assert study_from_options("smoke", studies="batch", seeds=seeds).seeds == expected


@pytest.mark.parametrize("seeds", ["-3", "0,-1"])
def test_a_negative_seed_is_one_message_that_names_it(seeds):
    with pytest.raises(SpecError, match=r"seeds are whole numbers of 0 or more, got '-(3|1)'; write a count"):
        study_from_options("smoke", studies="batch", seeds=seeds)


def test_a_plugin_given_as_a_file_path_is_one_message_that_names_the_module_to_give():
    with pytest.raises(PluginError, match=r"the plugin '/path/to/my_norms.py' is a file path; name the module "
                                          r"instead \('my_norms'\)"):
        registry.load_plugins(["/path/to/my_norms.py"], entry_points=False)


@pytest.mark.processes
def test_a_benchmark_run_writes_the_whole_study_against_its_floor_into_the_json_and_the_report(tmp_path, mnist_dir):
    results, saved = tmp_path / "results", tmp_path / "benchmarks.json"
    run = subprocess.run(_pytest_study(results, "--bn-seeds", "0-0", "--bn-data-dir", str(mnist_dir),
                                       "--benchmark-json", str(saved)),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    floor = json.loads(saved.read_text())["bnsuite"]["study_floor"]
    assert floor["runs"] == 2 and floor["run_epochs"] == 2
    # The floor is priced at the peak this run measured, and a machine busy with other work (CI runs another step
    # beside this one) measures it low: the floor is held to its own parts, never against a measured time.
    assert 0 < floor["train_time_s"] <= floor["wall_time_s"]
    assert floor["compute_s"] == pytest.approx(floor["gflop"] / floor["peak_gflops"])
    parts = (floor["compute_s"], floor["traffic_s"])  # the floor sums each run's larger part
    assert max(parts) * (1 - 1e-9) <= floor["floor_s"] <= sum(parts) * (1 + 1e-9)
    assert floor["train_ratio"] == pytest.approx(floor["train_time_s"] / floor["floor_s"])
    assert "the whole study against its floor" in run.stdout and "x the floor" in run.stdout
    markdown = report.build_report(results, out=results / "REPORT.md", benchmarks=saved, with_plots=False)
    assert "### The whole study against its floor" in markdown
    assert f"| {floor['train_ratio']:.2f}x " in markdown


def test_a_record_that_cannot_be_written_ends_the_run_once_keeping_what_was_written(pytester, mnist_dir,
                                                                                       monkeypatch, tmp_path):
    """The second record to be saved fails as a full disk would: the run stops there with one line, the first record
    is kept, and nothing trains again (a claim needing the unsaved group would otherwise retrain it)."""
    from bnsuite import study as study_module

    saved, trained = [], []
    real_save, real_train = study_module.save_record, study_module.train_seeds

    def full_disk(record, results_dir):
        if saved:
            raise OSError(f"cannot write the record to {results_dir}/runs (No space left on device); choose a "
                          "writable results directory with --bn-results-dir")
        saved.append(record.spec.case_id)
        return real_save(record, results_dir)

    monkeypatch.setattr(study_module, "save_record", full_disk)
    monkeypatch.setattr(study_module, "train_seeds", lambda specs, **kwargs: trained.append(specs) or real_train(
        specs, **kwargs))
    results = tmp_path / "results"
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--pyargs", "bnsuite.benchmarks.test_study", "bnsuite.benchmarks.test_claims",
        "--bn-profile", "smoke", "--bn-studies", "batch", "--bn-batch-sizes", "64", "--bn-seeds", "0-0",
        "--bn-results-dir", str(results), "--bn-data-dir", str(mnist_dir), "--benchmark-disable")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    output = result.stdout.str() + result.stderr.str()
    assert output.count("No space left on device") == 1
    assert (f"bnsuite: stopped: cannot write the record to {results}/runs (No space left on device); choose a "
            f"writable results directory with --bn-results-dir; the 1 records this run wrote before it are kept in "
            f"{results}") in output
    assert len(trained) == 2  # plain's case, then bn's, whose record failed; no claim trained either again
    assert [path.name.split("-")[0] for path in (results / "runs").glob("*.json")] == ["plain"]


# A pytest plugin for the resume test's runs (-p resume_probe): this code as one clean commit, and each case's
# training logged to TRAINED, the second one interrupted as Ctrl-C would when INTERRUPT is set.
RESUME_PROBE = """
import os

from bnsuite import environment, study

environment.git_commit = lambda: "0123abc"
_train = study.train_seeds


def _logged(specs, **kwargs):
    with open(os.environ["TRAINED"], "a") as log:
        log.write(",".join(spec.case_id for spec in specs) + "\\n")
    if os.environ.get("INTERRUPT") and len(open(os.environ["TRAINED"]).read().splitlines()) == 2:
        raise KeyboardInterrupt
    return _train(specs, **kwargs)


study.train_seeds = _logged
"""


@pytest.mark.processes
def test_an_interrupted_run_says_what_it_kept_and_resume_trains_only_what_is_missing(pytester, mnist_dir, tmp_path,
                                                                                      monkeypatch):
    pytester.makepyfile(resume_probe=RESUME_PROBE)
    results, log = tmp_path / "results", tmp_path / "trained.txt"
    args = ("-p", "resume_probe", "-p", "no:cacheprovider", "--pyargs", "bnsuite.benchmarks.test_study",
            "--bn-profile", "smoke", "--bn-studies", "batch", "--bn-batch-sizes", "64", "--bn-seeds", "0,1",
            "--bn-epochs", "1", "--bn-results-dir", str(results), "--bn-data-dir", str(mnist_dir),
            "--benchmark-disable")
    monkeypatch.setenv("TRAINED", str(log))
    monkeypatch.setenv("INTERRUPT", "1")
    interrupted = pytester.runpytest_subprocess(*args, timeout=300)
    assert interrupted.ret == pytest.ExitCode.INTERRUPTED
    interrupted.stdout.fnmatch_lines([f"bnsuite: interrupted; the records of 2 runs are kept in {results}; the same "
                                      "command with --bn-resume trains only the cases not finished"])
    kept = {path.name: path.read_bytes() for path in (results / "runs").glob("*.json")}
    assert sorted(name.split("-")[0] for name in kept) == ["plain", "plain"]

    log.unlink()
    monkeypatch.delenv("INTERRUPT")
    resumed = pytester.runpytest_subprocess(*args, "--bn-resume", timeout=300)
    assert resumed.ret == pytest.ExitCode.OK, resumed.stdout.str()[-2000:]
    resumed.stdout.fnmatch_lines([f"  resumed: 1 of 2 cases reused from the records in {results} (same runs, code and "
                                  "machine); 1 to train", "*plain-bs64*: reused, as its records in * are"])
    resumed.stdout.fnmatch_lines(["*the whole study against its floor*", "2 runs, 2 run-epochs, *"])  # bn's alone
    assert log.read_text().splitlines() == ["bn-bs64-seed0,bn-bs64-seed1"]  # plain's case was not trained again
    assert all((results / "runs" / name).read_bytes() == data for name, data in kept.items())  # nor rewritten

    again = pytester.runpytest_subprocess(*args, timeout=300)  # without --bn-resume every case trains; the header says
    again.stdout.fnmatch_lines([f"  4 records of this study's runs are already in {results}: this run writes over "
                                "them (--bn-resume reuses finished cases instead)"])
