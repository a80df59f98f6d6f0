"""Fixtures shared by the unit tests: real MNIST (obtained once per machine) and small IDX files."""

from __future__ import annotations

import numpy as np
import pytest

from bnsuite.data import IMAGE_FILES, LABEL_FILES, default_data_dir, load_raw
from bnsuite.idx import encode_idx


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

pytest_plugins = ("pytester",)  # the study plugin's behaviour is tested in pytest runs of its own
