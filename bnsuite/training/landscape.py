"""Santurkar et al. (2018): internal covariate shift measured by gradients, and the smoothness of the loss landscape
along the gradient, at checkpoints along a run's training, changing nothing of the run.

Gradient-based covariate shift (Santurkar et al., Definition 2.1). For layer i at a checkpoint, on a fixed batch
(the first `ICS_IMAGES` training images), G is the gradient of the loss with respect to layer i's weight with every
layer at its current weights, and G' the same gradient after every parameter before layer i took a gradient step
of the run's learning rate on the same batch (plain SGD: the optimizer's momentum is the fast step's and is not
read). Recorded: ICS = ||G - G'|| (their definition), and its scale-free forms ||G - G'|| / ||G|| and the cosine
between G and G' (both of which they also report): BN's weight gradients are smaller than plain's, and the absolute
difference shrinks with the gradient's scale whatever the shift, so the claims judge a scale-free form
(bnsuite.studies.landscape). Measured for `ICS_LAYERS` (fc2, fc3).

Loss-landscape smoothness (Santurkar et al., Fig. 4). At a checkpoint, on the training batch of that step and
before the step is taken, g is the gradient at the current weights w; for each distance eta = f * lr,
f in `STEP_FACTORS`, the loss and the gradient at w - eta g. Recorded: the range of the loss over those points and
w (loss variation), the largest ||grad(w - eta g) - g|| (gradient predictiveness: smaller is more predictive) and
the largest ||grad(w - eta g) - g|| / ||eta g|| (effective beta-smoothness).

Every pass runs the model as a training step does (batch statistics, dropout off), through
bnsuite.probe.as_in_training, which puts every buffer and torch's random state back: the measurement reads the
parameters and changes nothing, so a run's record is bit-identical with and without it (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from bnsuite.core.records import LandscapeTrace
from bnsuite.training.probe import as_in_training

ICS_LAYERS = ("fc2", "fc3")
ICS_IMAGES = 256
STEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # distances along the gradient, in learning rates: around the step taken
CHECKPOINTS = 20  # per run, evenly spaced over its steps from step 0, so a short run is measured as often as a long one


def _loss_and_gradients(model: nn.Module, parameters: dict[str, torch.Tensor], images: torch.Tensor,
                        labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """The batch's mean cross-entropy at `parameters` and its gradient with respect to each, as a training step
    computes them, changing nothing of `model`."""
    leaves = {name: value.detach().clone().requires_grad_() for name, value in parameters.items()}
    with torch.enable_grad(), as_in_training(model):
        loss = F.cross_entropy(functional_call(model, leaves, (images,)), labels)
        gradients = torch.autograd.grad(loss, list(leaves.values()))
    return loss.item(), dict(zip(leaves, gradients, strict=True))


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def gradient_ics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, lr: float,
                 layers: tuple[str, ...] = ICS_LAYERS) -> dict[str, tuple[float, float, float]]:
    """{layer: (||G - G'||, cos(G, G'), ||G - G'|| / ||G||)} for each of `layers` (Santurkar et al., Definition 2.1;
    module docstring)."""
    current = dict(model.named_parameters())
    _, gradients = _loss_and_gradients(model, current, images, labels)
    names = list(current)
    shifts = {}
    for layer in layers:
        weight = f"{layer}.weight"
        before = names[:names.index(weight)]  # every parameter of the layers before this one, in forward order
        updated = {name: current[name] - lr * gradients[name] if name in before else current[name] for name in names}
        _, shifted = _loss_and_gradients(model, updated, images, labels)
        g, g_prime = gradients[weight].double().flatten(), shifted[weight].double().flatten()
        difference, norm = float((g - g_prime).norm()), float(g.norm())
        denominator = norm * float(g_prime.norm())
        shifts[layer] = (difference, float(g @ g_prime) / denominator if denominator else math.nan,
                         difference / norm if norm else math.nan)
    return shifts


def smoothness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, lr: float,
               factors: tuple[float, ...] = STEP_FACTORS) -> tuple[float, float, float]:
    """(loss variation, gradient predictiveness, effective beta-smoothness) along the gradient at the current
    weights, on this batch (module docstring)."""
    current = dict(model.named_parameters())
    loss, gradient = _loss_and_gradients(model, current, images, labels)
    gradient_norm = _norm(gradient.values())
    losses, changes, betas = [loss], [], []
    for factor in factors:
        eta = factor * lr
        moved = {name: value - eta * gradient[name] for name, value in current.items()}
        there, gradient_there = _loss_and_gradients(model, moved, images, labels)
        change = _norm(gradient_there[name] - gradient[name] for name in current)
        losses.append(there)
        changes.append(change)
        betas.append(change / (eta * gradient_norm) if gradient_norm > 0 else math.inf)
    return max(losses) - min(losses), max(changes), max(betas)


def checkpoint_every(total_steps: int) -> int:
    """Steps between a run's checkpoints: `CHECKPOINTS` of them over its `total_steps`, the first before training."""
    return max(1, total_steps // CHECKPOINTS)


class Landscaper:
    """Measures S models at their checkpoints (steps 0, every, 2 every, ...): gradient ICS on a fixed batch and
    smoothness on the step's own batch, each before that step is taken; results per model in `traces`."""

    def __init__(self, models: list[nn.Module], images: torch.Tensor, labels: torch.Tensor, lrs: list[float],
                 total_steps: int):
        self.models = models
        self.images, self.labels = images[:ICS_IMAGES], labels[:ICS_IMAGES]
        self.lrs = lrs
        self.every = checkpoint_every(total_steps)
        layers = [name for name, _ in models[0].named_modules()]
        self.layers = tuple(layer for layer in ICS_LAYERS if layer in layers)
        self.steps: list[int] = []
        # per model, per checkpoint: (ics, cosines, relative ics, smoothness)
        self.values: list[list[tuple]] = [[] for _ in models]

    def due(self, step: int) -> bool:
        return step % self.every == 0 and len(self.steps) < CHECKPOINTS and (not self.steps or self.steps[-1] != step)

    def __call__(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Measure every model before step `step + 1`, on this step's batch `images` (S, B, ...), `labels` (S, B)."""
        self.steps.append(step)
        for index, (model, lr) in enumerate(zip(self.models, self.lrs, strict=True)):
            shifts = gradient_ics(model, self.images, self.labels, lr, self.layers)
            self.values[index].append((*(tuple(shifts[layer][form] for layer in self.layers) for form in range(3)),
                                       smoothness(model, images[index], labels[index], lr)))

    def traces(self) -> list:
        """One LandscapeTrace per model; None for a model whose measurements went non-finite (a diverged run)."""
        traces = []
        for values in self.values:
            numbers = [x for checkpoint in values for series in checkpoint for x in series]
            if not values or not all(math.isfinite(x) for x in numbers):
                traces.append(None)
                continue
            ics, cosines, relative, smooth = zip(*values, strict=True)
            traces.append(LandscapeTrace(
                every=self.every, steps=tuple(self.steps), ics_layers=self.layers, step_factors=STEP_FACTORS,
                ics=ics, ics_cosine=cosines, ics_relative=relative,
                loss_variation=tuple(at[0] for at in smooth), gradient_predictiveness=tuple(at[1] for at in smooth),
                beta_smoothness=tuple(at[2] for at in smooth)))
        return traces
