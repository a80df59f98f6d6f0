"""train(spec) -> RunRecord: the study's training protocol, on whole-dataset tensors.

The arithmetic is the study's: default init, CrossEntropyLoss, SGD with
momentum, a fresh shuffle every epoch, the last partial batch kept, and the
per-epoch figure is the mean of the per-batch losses. What differs from the
original code is only how the work is fed: the dataset is one normalized tensor
on the target device and a batch is `index_select` through a permutation, so
there is no per-sample Python, PIL or DataLoader on the hot path, and nothing
in the loop waits for the device (losses and hit counts accumulate on it).

The permutation is drawn exactly as `DataLoader(shuffle=True, generator=g)`
draws it, so the `original` pipeline (bnsuite.original) sees the same batches
and the two can be compared number for number.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from bnsuite import fastpath
from bnsuite.data import Splits, load_splits
from bnsuite.models import build_model
from bnsuite.records import (
    EpochRecord, RunRecord, describe_environment, finite_or_none, now_utc,
)
from bnsuite.spec import RunSpec

EpochCallback = Callable[[RunSpec, EpochRecord], None]
EVALUATION_BATCH = 10_000  # evaluation has no gradients: big batches are exact and fast
# A cross-entropy of 1,000 nats means logit gaps of 1,000: the weights have blown up.
# Training from default init starts near ln(10) = 2.3; a run past this never recovers
# (at lr 5.0, plain reaches 1e15 and then sits at chance with a finite loss).
DIVERGED_LOSS = 1_000.0


def has_diverged(batch_losses: torch.Tensor) -> bool:
    """True when any batch loss is not finite or above DIVERGED_LOSS."""
    return not bool(torch.isfinite(batch_losses).all() and batch_losses.max() <= DIVERGED_LOSS)


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; an explicit cuda without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but torch sees no CUDA GPU here; use --bn-device cpu")
    return torch.device(device)


def train(
    spec: RunSpec,
    *,
    data_dir: Path | str | None = None,
    profile: str | None = None,
    on_epoch: EpochCallback | None = None,
) -> RunRecord:
    """Train one model as `spec` says and return what happened, epoch by epoch.

    A loss that blows up (not finite, or above DIVERGED_LOSS) ends the run at the
    end of that epoch: the record says so (`diverged_at_epoch`) instead of
    raising, so a study keeps going.
    """
    device = resolve_device(spec.device)
    splits = load_splits(spec.dataset, validation_size=spec.validation_size, data_dir=data_dir)
    environment = describe_environment(device, splits.checksum)
    started_at = now_utc()
    splits = splits.to(device)

    torch.manual_seed(spec.seed)  # the model's default init draws from the global generator
    model = build_model(spec.variant).to(device)
    shuffle = torch.Generator().manual_seed(spec.seed)
    if spec.pipeline == "original":
        from bnsuite.original import OriginalEpochs

        run_epoch = OriginalEpochs(spec, model, shuffle, data_dir=data_dir)
    else:
        run_epoch = TensorEpochs(spec, model, shuffle, splits)

    epochs: list[EpochRecord] = []
    diverged_at_epoch = None
    steps = 0
    for epoch in range(1, spec.epochs + 1):
        _synchronize(device)
        started = time.perf_counter()
        batch_losses, correct = run_epoch()
        _synchronize(device)
        epoch_time = time.perf_counter() - started
        steps += spec.steps_per_epoch

        train_loss = batch_losses.mean().item()
        if has_diverged(batch_losses):
            diverged_at_epoch = epoch
            break
        validation = evaluate(model, splits.validation_images, splits.validation_labels)
        test = evaluate(model, splits.test_images, splits.test_labels)
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=100.0 * correct.item() / spec.train_size,
            validation_loss=validation[0],
            validation_accuracy=validation[1],
            test_loss=test[0],
            test_accuracy=test[1],
            epoch_time_s=epoch_time,
        )
        epochs.append(record)
        if on_epoch is not None:
            on_epoch(spec, record)

    test_loss, test_accuracy = evaluate(model, splits.test_images, splits.test_labels)
    return RunRecord(
        spec=spec,
        epochs=tuple(epochs),
        test_loss=finite_or_none(test_loss),
        test_accuracy=test_accuracy,
        train_time_s=sum(epoch.epoch_time_s for epoch in epochs),
        steps=steps,
        diverged_at_epoch=diverged_at_epoch,
        environment=environment,
        started_at=started_at,
        profile=profile,
    )


class TensorEpochs:
    """One training epoch per call, batches sliced from device-resident tensors."""

    def __init__(self, spec: RunSpec, model: nn.Module, shuffle: torch.Generator, splits: Splits):
        self.spec = spec
        self.shuffle = shuffle
        self.images, self.labels = training_set(splits, spec)
        if spec.pipeline == "fast" and fastpath.supports(model):
            self.step = fastpath.FastStep(model, lr=spec.lr, momentum=spec.momentum)
        else:
            self.step = EagerStep(model, spec)
        self.model = model
        device = self.images.device
        # Reused every epoch: per-batch losses and the hit count live on the device.
        self.batch_losses = torch.empty(spec.steps_per_epoch, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = epoch_order(self.spec.train_size, self.shuffle).to(self.images.device, non_blocking=True)
        # One gather per epoch; every batch is then a contiguous view, with no copy per step.
        images = self.images.index_select(0, order)
        labels = self.labels.index_select(0, order)
        self.correct.zero_()
        self.model.train()
        batches = zip(images.split(self.spec.batch_size), labels.split(self.spec.batch_size))
        for step, (batch_images, batch_labels) in enumerate(batches):
            loss, logits = self.step(batch_images, batch_labels)
            self.batch_losses[step] = loss
            self.correct += (logits.argmax(dim=1) == batch_labels).sum()
        return self.batch_losses, self.correct


class EagerStep:
    """One training step through autograd and torch.optim: the reference the fast step is checked against."""

    def __init__(self, model: nn.Module, spec: RunSpec):
        self.model = model
        self.optimizer = make_optimizer(model, spec, fused=True)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()


def make_optimizer(model: nn.Module, spec: RunSpec, *, fused: bool) -> torch.optim.Optimizer:
    """The study's SGD; `fused` runs the same update as one kernel per step instead of a loop."""
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, fused=fused or None)


def training_set(splits: Splits, spec: RunSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The images a run trains on: the training split, or its first `train_subset` images."""
    count = spec.train_size
    return splits.train_images[:count], splits.train_labels[:count]


def epoch_order(size: int, generator: torch.Generator) -> torch.Tensor:
    """This epoch's permutation, drawn as DataLoader(shuffle=True, generator=g) draws it.

    Per epoch, DataLoader takes one int64 from the generator (its workers' base
    seed), then RandomSampler draws randperm(size) for the epoch and, once it is
    exhausted, one more randperm for an empty remainder that it discards. Taking
    the same three draws here keeps both pipelines in step, epoch after epoch.
    """
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(size, generator=generator)
    torch.randperm(size, generator=generator)
    return order


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float | None, float | None]:
    """(mean cross-entropy, accuracy in percent) in eval mode; (None, None) for an empty split."""
    if len(labels) == 0:
        return None, None
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, len(labels), EVALUATION_BATCH):
        logits = model(images[start:start + EVALUATION_BATCH])
        batch_labels = labels[start:start + EVALUATION_BATCH]
        loss_sum += F.cross_entropy(logits, batch_labels, reduction="sum")
        correct += (logits.argmax(dim=1) == batch_labels).sum()
    model.train(was_training)
    return loss_sum.item() / len(labels), 100.0 * correct.item() / len(labels)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
