"""Activation probes: how the distribution of the last hidden layer's inputs moves as a run trains.

Ioffe & Szegedy (2015, Fig. 1) show, on an MNIST MLP, the 15th, 50th and 85th
percentiles of one unit's input to its nonlinearity over training: without BN
they drift, with BN they stay steady. A `Prober` measures the same on any
network whose variant names a probe point (bnsuite.spec.Variant.probe: the
submodule whose output feeds the last hidden nonlinearity, `bn2` where BN
sits before the ReLU, `fc2` where nothing or something after the ReLU does):
that output for a fixed set of units, on a fixed probe batch of held-out
images (the first `PROBE_IMAGES` test images), before training, every
`PROBE_EVERY` steps and at every epoch end.

Probing computes what a training step computes (batch statistics, dropout
off) and changes nothing: every buffer of every layer, a user's included, is
saved before the forward pass and put back after it, and so is torch's
random state (`as_in_training`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from bnsuite.core.records import ActivationTrace
from bnsuite.core.spec import SpecError

PROBE_IMAGES = 256
PROBE_EVERY = 100  # optimizer steps between checkpoints
UNITS = (0, 1, 2)  # of the probe point's outputs; fixed, so every run is probed on the same units
PERCENTILES = (15.0, 50.0, 85.0)


@contextlib.contextmanager
def as_in_training(model: nn.Module, generator: torch.Generator | None = None
                   ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A forward pass of `model` in training mode that leaves the model as it was.

    Normalization layers use each batch's own statistics, as in training; their buffers (running estimates,
    counters) are saved first and put back afterwards, so the model's come out unchanged; dropout layers are
    off; every module's mode is restored afterwards, and so is torch's random state, so a layer that draws
    noise draws nothing from the run's generators. `generator`: where a training step that draws its random
    numbers from a generator of the run's own (the fused step) stands; the forward pass draws as from there, as
    it would from torch's own after the same steps on the eager step.
    """
    # The model runs as it is, its buffers saved first and put back after: the same arithmetic as a forward pass
    # over copies (torch.func.functional_call), without that call's cost per batch, which at the study's batch
    # sizes was most of a batch-statistics evaluation. Put back in place and as the same tensors, so whatever
    # holds them (the fast step's stacked state) sees its own values again.
    saved = [(module, name, buffer, buffer.clone()) for module in model.modules()
             for name, buffer in module._buffers.items() if buffer is not None]
    modes = {module: module.training for module in model.modules()}
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            if generator is not None:
                if generator.device.type == "cuda":
                    torch.cuda.set_rng_state(generator.get_state(), generator.device)
                else:
                    torch.set_rng_state(generator.get_state())
            yield model
    finally:
        with torch.no_grad():
            for module, name, buffer, copy in saved:
                buffer.copy_(copy)
                module._buffers[name] = buffer
        for module, training in modes.items():
            module.train(training)


def check_probe_point(model: nn.Module, point: str, variant: str) -> None:
    """Refuse, before training, a probe point that names no submodule of the variant's network."""
    names = [name for name, _ in model.named_modules() if name]
    if point not in names:
        raise SpecError(f"variant {variant}'s probe point {point!r} is not a submodule of its network; choose one of "
                        f"{', '.join(names)} (register_variant(..., probe=NAME)), or None to train it unprobed")


@torch.no_grad()
def probed_input(model: nn.Module, images: torch.Tensor, point: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The output of `model`'s submodule `point` for `images` as a training step computes it, changing nothing
    (`as_in_training`, drawing as from `generator` where given); where the submodule runs more than once, its last
    output."""
    seen: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(point).register_forward_hook(
        lambda module, args, output: seen.update(output=output))
    try:
        with as_in_training(model, generator) as forward:
            forward(images)
    finally:
        handle.remove()
    return seen["output"].reshape(len(images), -1)


class Prober:
    """Collects the percentiles of S models at checkpoints; results stay on the device until `traces`."""

    def __init__(self, models: list[nn.Module], images: torch.Tensor, point: str, *, every: int = PROBE_EVERY,
                 generators: list[torch.Generator] | None = None):
        """`generators`: per model, the generator its training step draws from where that is not torch's own
        (bnsuite.epochs.TensorEpochs.generators): a layer that draws noise draws it in the probe as in training."""
        self.models = models
        self.generators = generators or [None] * len(models)
        self.images = images[:PROBE_IMAGES]
        self.point = point
        self.every = every
        self.quantiles = torch.tensor([p / 100 for p in PERCENTILES], device=images.device)
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []  # per checkpoint: (S, units, percentiles)

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        """Take a checkpoint after `step` optimizer steps (once per step count)."""
        if self.steps and self.steps[-1] == step:
            return
        columns = torch.stack([probed_input(model, self.images, self.point, generator)[:, list(UNITS)]
                               for model, generator in zip(self.models, self.generators, strict=True)])
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
