"""Evaluation: a model's loss and accuracy on held-out images, with its running estimates or with each batch's own
statistics, changing nothing of the model.

`evaluate` and `evaluate_with_batch_statistics` run any model as a module; `evaluate_all` evaluates every model
of a training at once, through its epoch runner where the runner has a faster way (the fused step evaluates its
models in C, each on one thread) and through these functions where not.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bnsuite.training.probe import as_in_training

EVALUATION_BATCH = 10_000  # evaluation has no gradients: big batches are exact and fast
# A ConvNet's feature maps for 10,000 images leave the caches: 500 at a time evaluates about 2.5x faster
# (measured on 2 cores, AMD EPYC Zen 3).
CONV_EVALUATION_BATCH = 500
Result = tuple[float | None, float | None]  # (mean cross-entropy, accuracy in percent); None for an empty split


def evaluate_all(runner, models: list[nn.Module], images: torch.Tensor, labels: torch.Tensor, *,
                 batch_statistics: int | None = None, only: list[int] | None = None) -> list[Result]:
    """Every model's (loss, accuracy) on `images`, in eval mode; with `batch_statistics` (a batch size), the
    accuracy with each consecutive batch normalized by its own statistics (loss None). Through `runner.evaluate`
    where the epoch runner has one (it evaluates every model at once, cheaply); else model by model, the models
    `only` names (default: all), the others (None, None); also where `runner.evaluate` returns None (it cannot
    evaluate these models so)."""
    if len(labels) == 0:
        return [(None, None) for _ in models]
    results = (runner.evaluate(images, labels, batch_statistics=batch_statistics is not None)
               if getattr(runner, "evaluate", None) is not None else None)
    if results is not None:
        return [(None, accuracy) for _, accuracy in results] if batch_statistics is not None else results
    chosen = set(range(len(models)) if only is None else only)
    if batch_statistics is not None:
        generators = getattr(runner, "generators", None) or [None] * len(models)
        return [(None, evaluate_with_batch_statistics(model, images, labels, batch_statistics, generators[index]))
                if index in chosen else (None, None) for index, model in enumerate(models)]
    return [evaluate(model, images, labels) if index in chosen else (None, None)
            for index, model in enumerate(models)]


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float | None, float | None]:
    """(mean cross-entropy, accuracy in percent) in eval mode; (None, None) for an empty split."""
    if len(labels) == 0:
        return None, None
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    size = CONV_EVALUATION_BATCH if any(isinstance(layer, nn.Conv2d) for layer in model.modules()) \
        else EVALUATION_BATCH
    for start in range(0, len(labels), size):
        logits = model(images[start:start + size])
        batch_labels = labels[start:start + size]
        loss_sum += F.cross_entropy(logits, batch_labels, reduction="sum")
        correct += (logits.argmax(dim=1) == batch_labels).sum()
    model.train(was_training)
    return loss_sum.item() / len(labels), 100.0 * correct.item() / len(labels)


@torch.no_grad()
def evaluate_with_batch_statistics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                                   batch_size: int, generator: torch.Generator | None = None) -> float | None:
    """Accuracy (%) with every normalization layer normalizing each batch of `batch_size` images by its own
    statistics.

    What the network computes in training mode, on held-out images: the counterpart of `evaluate`'s running
    estimates, for a variant with batch statistics. The model changes in nothing (bnsuite.probe.as_in_training:
    its buffers are copies for the call, dropout is off; a layer that draws noise draws as from `generator`
    where given). Batches are consecutive, the last one shorter (merged into the one before if it would hold a
    single image). None for an empty split.
    """
    if len(labels) == 0:
        return None
    starts = list(range(0, len(labels), batch_size))
    if len(starts) > 1 and len(labels) - starts[-1] == 1:
        starts.pop()  # a batch of one image has no batch statistics
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    with as_in_training(model, generator) as forward:
        for start, end in zip(starts, starts[1:] + [len(labels)], strict=True):
            correct += (forward(images[start:end]).argmax(dim=1) == labels[start:end]).sum()
    return 100.0 * correct.item() / len(labels)


