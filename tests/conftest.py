"""Fixtures shared by the unit tests: real MNIST (obtained once per machine) and small IDX files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bnsuite.core.idx import encode_idx
from bnsuite.training.data import IMAGE_FILES, LABEL_FILES, default_data_dir, load_raw


@pytest.fixture(scope="session")
def mnist_dir():
    """The data directory holding verified MNIST (from the cache, or rebuilt offline once)."""
    directory = default_data_dir()
    load_raw("mnist", data_dir=directory)
    return directory


def write_small_idx_dir(directory, *, train=20, test=10, seed=0):
    """Four small, well-formed IDX files in MNIST's names; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", train), ("test", test)):
        arrays[IMAGE_FILES[split]] = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        arrays[LABEL_FILES[split]] = rng.integers(0, 10, size=count, dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (directory / name).write_bytes(encode_idx(array))
    return arrays

@pytest.fixture(scope="session", autouse=True)
def subprocesses_are_not_xdist_workers():
    """A Python or pytest process a test starts is a run of its own, also when the tests run in xdist workers
    (.ci/run): without the workers' variables, whose presence makes pytest-benchmark there switch itself off."""
    saved = {name: os.environ.pop(name) for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT",
                                                     "PYTEST_XDIST_TESTRUNUID") if name in os.environ}
    yield
    os.environ.update(saved)


@pytest.fixture
def clean_registry(monkeypatch):
    """The registries (and the tables of datasets and networks, which a plugin's join) as they are, restored after
    the test."""
    from bnsuite.core import datasets, networks, registry
    from bnsuite.training import data

    for name in ("_VARIANTS", "_BUILDERS", "_NORMALIZATIONS", "_NETWORK_BUILDERS", "_STUDIES", "_PLUGINS",
                 "_PINNED_BY", "_MEASURES", "_DATASET_LOADERS"):
        monkeypatch.setattr(registry, name, dict(getattr(registry, name)))
    saved = [(table, table.snapshot()) for table in (datasets.DATASETS, networks.NETWORKS)]
    data._registered.cache_clear()
    yield
    for table, snapshot in saved:
        table.restore(snapshot)
    data._registered.cache_clear()


@pytest.fixture
def aten_fast_step():
    """Trains with the ATen fast step (bnsuite.fastpath), the fallback where the fused one cannot be built."""
    from bnsuite.training import fused

    with fused.switched_off():
        yield


pytest_plugins = ("pytester",)  # the study plugin's behaviour is tested in pytest runs of its own


def smoke_batch_study(**options):
    """The executors' tests' study: the smoke batch study's plain and bn at batch 128, seeds 0 and 1, 1 epoch."""
    from bnsuite.study import study_from_options

    return study_from_options("smoke", studies="batch", variants="plain,bn", batch_sizes="128", seeds="0,1",
                              epochs=options.pop("epochs", 1), **options)


def one_thread_local_records(study, results_dir, data_dir):
    """Every case of `study` trained here with one torch thread, as a worker of one CPU trains: its records."""
    import torch

    from bnsuite.study import StudySession

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = StudySession(study, results_dir=results_dir, data_dir=data_dir)
        return [record for group in study.groups() for record in local.run_seeds(group)]
    finally:
        torch.set_num_threads(before)


def records_through(executor, study, results_dir):
    """Every case of `study` through a started-here `executor` (a Ray or process pool), the session saving them to
    `results_dir`, the executor stopped after: the records, in case order."""
    from bnsuite.study import StudySession

    executor.start(study.groups())
    try:
        session = StudySession(study, results_dir=results_dir, executor=executor)
        return [record for group in study.groups() for record in session.run_seeds(group)]
    finally:
        executor.stop()


@pytest.fixture
def _dynamo_imported():
    """torch._dynamo imported in this process (once, about 3 s). The study's floor counts FLOPs under torch's
    FlopCounterMode, whose first dispatch imports torch._dynamo; in pytester's in-process runs that import would
    happen inside the run, and pytester takes every module the run imported out of sys.modules afterwards while
    torch's operator registrations stay, so the next import of torch._dynamo in this process fails."""
    import torch._dynamo  # noqa: F401


@pytest.fixture
def pytester(_dynamo_imported, pytester):
    """pytester, after torch._dynamo is imported (before pytester takes its snapshot of sys.modules)."""
    return pytester
