"""RunSpec: what one training run is, checked when it is made.

The defaults are the study's (SGD lr 0.01, momentum 0.9, 10 epochs, batch 64,
MNIST). A spec that cannot run (unknown variant, batch size 0, lr of nan...)
is refused at construction with a message saying what to change, so a long
study never fails half-way on a value it could have rejected at the start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from bnsuite.data import DATASETS
from bnsuite.models import VARIANTS

TRAINING_IMAGES = 60_000  # both MNIST and Fashion-MNIST
PIPELINES = ("fast", "eager", "original")


class SpecError(ValueError):
    """A run specification has a value that cannot run; the message says which and why."""


@dataclass(frozen=True)
class RunSpec:
    dataset: str = "mnist"
    variant: str = "bn"
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 10
    seed: int = 0
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    validation_size: int = 10_000  # 0: the seed protocol, all 60,000 images train
    train_subset: int | None = None  # first N training images, for quick runs
    # fast: tensor batches, hand-written backward (bnsuite.fastpath) where the variant has one;
    # eager: tensor batches, autograd + torch.optim; original: torchvision Dataset + DataLoader.
    pipeline: str = "fast"

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        _require(self.variant in VARIANTS, f"unknown variant {self.variant!r}; choose one of: {', '.join(VARIANTS)}")
        _require(self.pipeline in PIPELINES, f"unknown pipeline {self.pipeline!r}; choose one of: {', '.join(PIPELINES)}")
        _require(_is_device_name(self.device), f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        _require_int(self.batch_size, "batch size", minimum=1)
        _require_int(self.epochs, "epochs", minimum=1)
        _require_int(self.seed, "seed", minimum=0)
        _require_int(self.validation_size, "validation size", minimum=0)
        _require(
            self.validation_size < TRAINING_IMAGES,
            f"validation size {self.validation_size} leaves no training images; use less than {TRAINING_IMAGES}",
        )
        _require(
            isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
            f"learning rate must be a finite number > 0, got {self.lr!r}",
        )
        _require(
            isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1,
            f"momentum must be in [0, 1), got {self.momentum!r}",
        )
        if self.train_subset is not None:
            _require_int(self.train_subset, "train subset", minimum=1)
            _require(
                self.train_subset <= TRAINING_IMAGES - self.validation_size,
                f"train subset {self.train_subset} is larger than the {TRAINING_IMAGES - self.validation_size} "
                "training images left after the validation split",
            )
        _require(
            self.batch_size <= self.train_size,
            f"batch size {self.batch_size} is larger than the training set ({self.train_size} images); "
            "use a smaller batch size",
        )
        if self.variant != "plain":
            _require(
                self.batch_size > 1 and self.train_size % self.batch_size != 1,
                f"batch size {self.batch_size} leaves a batch of a single image ({self.train_size} training images), "
                "and batch normalization needs at least 2 per batch; choose another batch size or train subset",
            )

    @property
    def train_size(self) -> int:
        return self.train_subset or TRAINING_IMAGES - self.validation_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_size / self.batch_size)  # the last partial batch is kept

    @property
    def case_id(self) -> str:
        """Readable name of the case within a study, as in test ids: `bn-bs64-seed0`."""
        return f"{self.variant}-bs{self.batch_size}-seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        """A short hash of every field: runs with equal fingerprints are the same experiment."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def protocol(self) -> dict:
        """The fields that must agree for runs to be compared in one table (all but variant, batch size, seed)."""
        fields = dataclasses.asdict(self)
        for varying in ("variant", "batch_size", "seed", "device", "pipeline"):
            fields.pop(varying)
        return fields


def _is_device_name(device: object) -> bool:
    if not isinstance(device, str):
        return False
    if device in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


def _require_int(value: object, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise SpecError(f"{name} must be at least {minimum}, got {value}")
