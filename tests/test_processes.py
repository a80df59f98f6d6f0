"""Cases in worker processes on this machine (--bn-executor processes): the records a local one-thread run gives,
a failing case failing alone with the worker's words, and an interrupted pool keeping what finished."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnsuite.core import baseline as gate
from bnsuite.core.records import load_records
from bnsuite.executor import ExecutorError, ProcessExecutor, case_cost
from bnsuite.study import study_from_options
from bnsuite.training.data import load_raw
from conftest import one_thread_local_records, records_through, smoke_batch_study

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.processes  # every test here starts worker processes (pytest tests/ -m processes)


def _executor(study, mnist_dir, **options) -> ProcessExecutor:
    return ProcessExecutor(study, data_dir=mnist_dir, dataset_checksum=load_raw("mnist", data_dir=mnist_dir).checksum,
                           workers=2, **options)


def test_cases_in_worker_processes_give_the_records_a_local_one_thread_run_gives(tmp_path, mnist_dir):
    study = smoke_batch_study()
    records = records_through(_executor(study, mnist_dir), study, tmp_path / "pool")
    assert all(r.executor.startswith("processes (2 workers, 1 thread each), pid ") for r in records)
    assert {r.environment.threads for r in records} == {1} and {r.environment.denormals for r in records} == {
        "flushed"}
    one_thread_local_records(study, tmp_path / "local", mnist_dir)
    comparisons = gate.compare(records, gate.Baseline.load(tmp_path / "local"))
    assert [(c.rule, c.verdict) for c in comparisons] == [(gate.EXACT, gate.IDENTICAL)] * 2
    assert len(load_records(tmp_path / "pool")) == 4  # the driver wrote every record


def test_the_longest_cases_are_submitted_first():
    study = study_from_options("smoke", studies="batch,lr", batch_sizes="128", seeds="0-0")
    order = sorted(study.groups(), key=case_cost, reverse=True)
    assert len(order[0]) > len(order[-1]) and case_cost(order[0]) >= case_cost(order[-1])


def test_a_case_that_fails_in_its_worker_fails_with_the_workers_message(mnist_dir):
    study = smoke_batch_study()
    executor = _executor(study, mnist_dir, plugins=("bnsuite_no_such_plugin",))  # not importable anywhere
    executor.start(study.groups())
    try:
        for group in study.groups():
            with pytest.raises(ExecutorError, match=r"failed in its worker process: PluginError: .*"
                                                    r"bnsuite_no_such_plugin"):
                executor.result(group)
    finally:
        executor.stop()


def test_an_interrupted_pool_keeps_the_finished_cases_and_kills_the_running_ones(mnist_dir):
    study = smoke_batch_study()
    quick, = [g for g in study.groups() if g[0].variant == "plain"]
    slow = tuple(dataclasses.replace(spec, batch_size=2, epochs=20) for spec in quick)  # 40,000 steps a run
    executor = _executor(study, mnist_dir)
    executor.start([slow, quick])
    deadline = time.monotonic() + 120
    while not executor.pending[quick].done() and time.monotonic() < deadline:
        time.sleep(0.5)
    processes = list(executor.pool._processes.values())
    started = time.monotonic()
    finished = executor.stop(interrupted=True)
    assert [r.spec for r in finished] == list(quick)
    assert time.monotonic() - started < 30  # the slow case's worker was killed, not waited for
    # Polled, not joined once: the pool's own thread joins its killed workers too, and a join that loses that race
    # to the reaping reads the process as alive until the other thread has recorded its exit code.
    deadline = time.monotonic() + 10
    while any(process.is_alive() for process in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process.is_alive() for process in processes)


def test_the_processes_executor_runs_a_pytest_study_and_prints_its_floor(tmp_path, mnist_dir):
    results = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_study.py", "-p", "no:cacheprovider", "--bn-profile",
         "smoke", "--bn-studies", "batch", "--bn-batch-sizes", "128", "--bn-seeds", "0-0", "--bn-epochs", "1",
         "--bn-executor", "processes", "--bn-results-dir", str(results), "--bn-data-dir", str(mnist_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "executor: processes (" in run.stdout and "the whole study against its floor" in run.stdout
    assert {r.spec.case_id for r in load_records(results)} == {"plain-bs128-seed0", "bn-bs128-seed0"}
