"""Epoch runners: one training epoch per call, for the `fast` and `eager` pipelines, on tensor batches.

The dataset is one normalized tensor on the target device and a batch is a
slice of it through this epoch's permutation, so there is no per-sample
Python, PIL or DataLoader on the hot path, and nothing in the loop waits for
the device (losses and hit counts accumulate on it). The permutation is drawn
exactly as `DataLoader(shuffle=True, generator=g)` draws it, so the
`original` pipeline (bnsuite.original) sees the same batches and the two can
be compared number for number.

Every runner is called the same way (bnsuite.train.EPOCH_RUNNERS) and returns
the per-batch losses (S, steps), the correct predictions (S,) and the number
of steps it took, counted as it ran.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bnsuite import fastpath
from bnsuite.data import Splits
from bnsuite.models import make_optimizer
from bnsuite.spec import RunSpec

EpochResult = tuple[torch.Tensor, torch.Tensor, int]  # (batch losses (S, steps), correct (S,), steps taken)


class TensorEpochs:
    """One training epoch per call for S runs, batches sliced from device-resident tensors."""

    def __init__(self, specs: list[RunSpec], models: list[nn.Module], shuffles: list[torch.Generator],
                 splits: Splits, *, dropout_generators: list[torch.Generator], data_dir: Path | str | None = None):
        spec = specs[0]
        self.spec = spec
        self.models = models
        self.shuffles = shuffles
        images, self.labels = training_set(splits, spec)
        self.images = images.view(len(images), -1)
        if spec.pipeline == "fast" and fastpath.supports(models[0]):
            self.step = fastpath.FastStep(models, lr=[run.lr for run in specs], momentum=spec.momentum,
                                          dropout_generators=dropout_generators)
        elif len(models) == 1:
            self.step = EagerStep(models[0], spec)
        else:
            raise ValueError(f"only the fast step trains several runs at once, not {spec.pipeline} {spec.variant}")
        device = self.images.device
        # Reused every epoch: per-batch losses and the hit counts live on the device.
        self.batch_losses = torch.empty(len(models), spec.steps_per_epoch, device=device)
        self.correct = torch.zeros(len(models), dtype=torch.long, device=device)

    def __call__(self) -> EpochResult:
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
        steps = 0
        for start in range(0, size, batch_size):
            batch_labels = labels[:, start:start + batch_size]
            losses, logits = self.step(images[:, start:start + batch_size], batch_labels)
            self.batch_losses[:, steps] = losses
            self.correct += (logits.argmax(dim=2) == batch_labels).sum(dim=1)
            steps += 1
        return self.batch_losses[:, :steps], self.correct, steps


class EagerStep:
    """One training step through autograd and torch.optim: the reference the fast step is checked against."""

    def __init__(self, model: nn.Module, spec: RunSpec):
        self.model = model
        self.optimizer = make_optimizer(model, lr=spec.lr, momentum=spec.momentum, fused=True)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same shapes as FastStep with one model: images (1, B, ...), labels (1, B)."""
        logits = self.model(images[0])
        loss = F.cross_entropy(logits, labels[0])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().view(1), logits.detach().unsqueeze(0)


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
