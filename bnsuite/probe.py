"""Activation probes: how the distribution of the last hidden layer's inputs moves as a run trains.

Ioffe & Szegedy (2015, Fig. 1) show, on an MNIST MLP, the 15th, 50th and 85th
percentiles of one unit's input to its nonlinearity over training: without BN
they drift, with BN they stay steady. A `Prober` measures the same on the
study's networks: the inputs to the last hidden ReLU (bnsuite.models.
last_hidden_input) for a fixed set of units, on a fixed probe batch of
held-out images (the first `PROBE_IMAGES` test images), before training,
every `PROBE_EVERY` steps and at every epoch end. Probing reads the
parameters and changes nothing: no buffer, no random draw (a test keeps it so).
"""

from __future__ import annotations

import torch
from torch import nn

from bnsuite.models import last_hidden_input
from bnsuite.records import ActivationTrace

PROBE_IMAGES = 256
PROBE_EVERY = 100  # optimizer steps between checkpoints
UNITS = (0, 1, 2)  # of fc2's 128 outputs; fixed, so every run is probed on the same units
PERCENTILES = (15.0, 50.0, 85.0)


class Prober:
    """Collects the percentiles of S models at checkpoints; results stay on the device until `traces`."""

    def __init__(self, models: list[nn.Module], images: torch.Tensor, *, every: int = PROBE_EVERY):
        self.models = models
        self.images = images[:PROBE_IMAGES]
        self.every = every
        self.quantiles = torch.tensor([p / 100 for p in PERCENTILES], device=images.device)
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []  # per checkpoint: (S, units, percentiles)

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        """Take a checkpoint after `step` optimizer steps (once per step count)."""
        if self.steps and self.steps[-1] == step:
            return
        columns = torch.stack([last_hidden_input(model, self.images)[:, list(UNITS)] for model in self.models])
        self.steps.append(step)
        self.values.append(torch.quantile(columns, self.quantiles, dim=1).permute(1, 2, 0))

    def after_step(self, step: int) -> None:
        if step % self.every == 0:
            self(step)

    def traces(self) -> list[ActivationTrace | None]:
        """One trace per model; None for a model whose probe went non-finite (a diverged run)."""
        values = torch.stack(self.values).cpu()  # (checkpoints, S, units, percentiles)
        traces: list[ActivationTrace | None] = []
        for index in range(len(self.models)):
            mine = values[:, index]
            traces.append(ActivationTrace(every=self.every, steps=tuple(self.steps), units=UNITS,
                                          percentiles=PERCENTILES,
                                          values=tuple(tuple(tuple(u) for u in at) for at in mine.tolist()))
                          if torch.isfinite(mine).all() else None)
        return traces
