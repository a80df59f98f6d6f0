"""train(spec) -> RunRecord and train_seeds(specs): the study's training protocol, on whole-dataset tensors.

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

A study trains every (variant, batch size) with several seeds; `train_seeds`
trains those runs as one batched computation, each run bit for bit as it
trains alone, so the per-op overhead that dominates small batches on a CPU
is paid once for all the seeds.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

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
    return train_seeds([spec], data_dir=data_dir, profile=profile, on_epoch=on_epoch)[0]


def trains_seeds_together(spec: RunSpec) -> bool:
    """Whether runs like `spec` with other seeds train as one batched computation (the fast step's variants)."""
    return spec.pipeline == "fast" and spec.variant in fastpath.VARIANTS


def train_seeds(
    specs: Sequence[RunSpec],
    *,
    data_dir: Path | str | None = None,
    profile: str | None = None,
    on_epoch: EpochCallback | None = None,
) -> list[RunRecord]:
    """Train runs that differ only in their seed; one record each, in the order given.

    Where the fast step covers the variant, the runs train as one batched
    computation (bnsuite.fastpath), each on its own init and its own shuffle,
    bit for bit as when trained alone; otherwise one after another. A run that
    diverges stops being recorded at that epoch while the others go on.
    """
    specs = list(specs)
    _check_same_but_seed(specs)
    if len(specs) > 1 and not trains_seeds_together(specs[0]):
        return [train(spec, data_dir=data_dir, profile=profile, on_epoch=on_epoch) for spec in specs]
    spec = specs[0]
    device = resolve_device(spec.device)
    splits = load_splits(spec.dataset, validation_size=spec.validation_size, data_dir=data_dir)
    environment = describe_environment(device, splits.checksum)
    started_at = now_utc()
    splits = splits.to(device)

    models, shuffles = [], []
    for run in specs:
        torch.manual_seed(run.seed)  # the model's default init draws from the global generator
        models.append(build_model(run.variant).to(device))
        shuffles.append(torch.Generator().manual_seed(run.seed))
    if spec.pipeline == "original":
        from bnsuite.original import OriginalEpochs

        run_epoch = OriginalEpochs(spec, models[0], shuffles[0], data_dir=data_dir)
    else:
        run_epoch = TensorEpochs(specs, models, shuffles, splits)

    epochs: list[list[EpochRecord]] = [[] for _ in specs]
    diverged_at_epoch: list[int | None] = [None for _ in specs]
    for epoch in range(1, spec.epochs + 1):
        _synchronize(device)
        started = time.perf_counter()
        batch_losses, correct = run_epoch()
        _synchronize(device)
        epoch_time = (time.perf_counter() - started) / len(specs)  # each run's share of the computation

        for index, (run, model) in enumerate(zip(specs, models)):
            if diverged_at_epoch[index] is not None:
                continue
            if has_diverged(batch_losses[index]):
                diverged_at_epoch[index] = epoch
                continue
            validation = evaluate(model, splits.validation_images, splits.validation_labels)
            test = evaluate(model, splits.test_images, splits.test_labels)
            record = EpochRecord(
                epoch=epoch,
                train_loss=batch_losses[index].mean().item(),
                train_accuracy=100.0 * correct[index].item() / run.train_size,
                validation_loss=validation[0],
                validation_accuracy=validation[1],
                test_loss=test[0],
                test_accuracy=test[1],
                epoch_time_s=epoch_time,
            )
            epochs[index].append(record)
            if on_epoch is not None:
                on_epoch(run, record)
        if all(diverged is not None for diverged in diverged_at_epoch):
            break

    records = []
    for run, model, run_epochs, diverged in zip(specs, models, epochs, diverged_at_epoch):
        test_loss, test_accuracy = evaluate(model, splits.test_images, splits.test_labels)
        records.append(RunRecord(
            spec=run,
            epochs=tuple(run_epochs),
            test_loss=finite_or_none(test_loss),
            test_accuracy=test_accuracy,
            train_time_s=sum(epoch.epoch_time_s for epoch in run_epochs),
            steps=run.steps_per_epoch * (diverged or len(run_epochs)),
            diverged_at_epoch=diverged,
            environment=environment,
            started_at=started_at,
            profile=profile,
            runs_trained_together=len(specs),
        ))
    return records


def _check_same_but_seed(specs: list[RunSpec]) -> None:
    if not specs:
        raise ValueError("train_seeds needs at least one RunSpec")
    seedless = {dataclasses.replace(spec, seed=0) for spec in specs}
    if len(seedless) != 1:
        raise ValueError("train_seeds trains runs that differ only in their seed; these differ in more")
    if len({spec.seed for spec in specs}) != len(specs):
        raise ValueError("train_seeds was given the same seed twice; give each seed once")


class TensorEpochs:
    """One training epoch per call for S runs, batches sliced from device-resident tensors."""

    def __init__(self, specs: list[RunSpec], models: list[nn.Module], shuffles: list[torch.Generator],
                 splits: Splits):
        spec = specs[0]
        self.spec = spec
        self.models = models
        self.shuffles = shuffles
        images, self.labels = training_set(splits, spec)
        self.images = images.view(len(images), -1)
        if spec.pipeline == "fast" and fastpath.supports(models[0]):
            self.step = fastpath.FastStep(models, lr=spec.lr, momentum=spec.momentum)
        elif len(models) == 1:
            self.step = EagerStep(models[0], spec)
        else:
            raise ValueError(f"only the fast step trains several seeds at once, not {spec.pipeline} {spec.variant}")
        device = self.images.device
        # Reused every epoch: per-batch losses and the hit counts live on the device.
        self.batch_losses = torch.empty(len(models), spec.steps_per_epoch, device=device)
        self.correct = torch.zeros(len(models), dtype=torch.long, device=device)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-batch losses (S, steps), correct predictions (S,)) of one epoch."""
        size = self.spec.train_size
        orders = torch.cat([epoch_order(size, shuffle) for shuffle in self.shuffles])
        orders = orders.to(self.images.device, non_blocking=True)
        # One gather per epoch; every batch is then a view, with no copy per step.
        images = self.images.index_select(0, orders).view(len(self.models), size, -1)
        labels = self.labels.index_select(0, orders).view(len(self.models), size)
        self.correct.zero_()
        for model in self.models:
            model.train()
        batch_size = self.spec.batch_size
        for step, start in enumerate(range(0, size, batch_size)):
            batch_labels = labels[:, start:start + batch_size]
            losses, logits = self.step(images[:, start:start + batch_size], batch_labels)
            self.batch_losses[:, step] = losses
            self.correct += (logits.argmax(dim=2) == batch_labels).sum(dim=1)
        return self.batch_losses, self.correct


class EagerStep:
    """One training step through autograd and torch.optim: the reference the fast step is checked against."""

    def __init__(self, model: nn.Module, spec: RunSpec):
        self.model = model
        self.optimizer = make_optimizer(model, spec, fused=True)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same shapes as FastStep with one model: images (1, B, ...), labels (1, B)."""
        logits = self.model(images[0])
        loss = F.cross_entropy(logits, labels[0])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().view(1), logits.detach().unsqueeze(0)


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
