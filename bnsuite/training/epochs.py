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

On a GPU the fast step of these small networks is bound by kernel launches,
not arithmetic, so it is captured once as a CUDA graph and replayed
(`GraphedStep`); the last, shorter batch of an epoch and the dropout variants
(whose masks draw from per-run generators) run uncaptured.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from bnsuite.core.registry import variant
from bnsuite.core.spec import RunSpec
from bnsuite.training import compiled, fastpath, fused
from bnsuite.training.data import Splits
from bnsuite.training.landscape import Landscaper
from bnsuite.training.models import EagerStep
from bnsuite.training.probe import Prober, check_probe_point

EpochResult = tuple[torch.Tensor, torch.Tensor, int]  # (batch losses (S, steps), correct (S,), steps taken)
# BNSUITE_CUDA_GRAPHS=0 turns the capture off, to measure what it gains (bnsuite.speed, the GPU check).
CUDA_GRAPHS = os.environ.get("BNSUITE_CUDA_GRAPHS", "1") != "0"
PROBES = True  # activation probes (bnsuite.probe); off only to show that they change nothing


class TensorEpochs:
    """One training epoch per call for S runs, batches sliced from device-resident tensors."""

    def __init__(self, specs: list[RunSpec], models: list[nn.Module], shuffles: list[torch.Generator],
                 splits: Splits, *, dropout_generators: list[torch.Generator], data_dir: Path | str | None = None,
                 measures: frozenset[str] = frozenset()):
        spec = specs[0]
        self.spec, self.specs = spec, specs
        self.models = models
        self.shuffles = shuffles
        images, self.labels = training_set(splits, spec)
        self.images = images.view(len(images), -1)
        kind = step_kind(models[0], spec, self.images.device)
        if kind == "fused":
            self.step = fused.fused_step(models, self.images, self.labels, lr=[run.lr for run in specs],
                                         momentum=spec.momentum, batch_size=spec.batch_size,
                                         dropout_generators=dropout_generators, weight_decay=spec.weight_decay)
        elif kind == "fast":
            self.step = fastpath.FastStep(models, lr=[run.lr for run in specs], momentum=spec.momentum,
                                          dropout_generators=dropout_generators)
            if self.images.is_cuda and CUDA_GRAPHS and not self.step.dropout:
                self.step = GraphedStep(self.step, len(models), spec.batch_size, self.images.shape[1],
                                        device=self.images.device)
        elif kind == "compiled":
            self.step = compiled.CompiledStep(models, lr=[run.lr for run in specs], momentum=spec.momentum)
        elif len(models) == 1:
            self.step = EagerStep(models[0], spec)
        else:
            raise ValueError(f"only the fast step trains several runs at once, not {spec.pipeline} {spec.variant}")
        self.epochs_started = 0
        device = self.images.device
        # Reused every epoch: per-batch losses and the hit counts live on the device.
        self.batch_losses = torch.empty(len(models), spec.steps_per_epoch, device=device)
        self.correct = torch.zeros(len(models), dtype=torch.long, device=device)
        self.steps_taken = 0
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # this epoch's images and labels, in order
        # None: the network declares no probe point, and is not probed
        point = variant(spec.variant, spec.network).probe
        if point is not None:
            check_probe_point(models[0], point, spec.variant)
        # Where the step draws dropout masks and noise from the runs' own generators rather than torch's (the fused
        # and ATen steps), a probe or evaluation that draws noise starts where they stand, as on the eager step.
        self.generators = dropout_generators if kind in ("fused", "fast") else None
        self.prober = (Prober(models, splits.test_images, point, generators=self.generators) if PROBES and point
                       else None)
        if self.prober is not None:
            self.prober(0)
        self.landscaper = (Landscaper(models, self.images, self.labels, [run.lr for run in specs],
                                      spec.steps_per_epoch * spec.epochs) if "landscape" in measures
                           else None)

    @property
    def step_name(self) -> str:
        """What steps the training, as records say it (RunRecord.training_step)."""
        return getattr(self.step, "step_name", None) or self.step.NAME

    @property
    def evaluate(self):
        """Every model's evaluation at once where the fused step trains them (FusedStep.evaluate), else None: each
        model is then evaluated as a module (bnsuite.evaluation.evaluate_all)."""
        return self.step.evaluate if isinstance(self.step, fused.FusedStep) else None

    @property
    def precise(self):
        """Every model's precise BN at once where the fused step trains them and can (FusedStep.precise), else
        None: the models are then measured as modules (bnsuite.precise)."""
        return self.step.precise if isinstance(self.step, fused.FusedStep) else None

    def __call__(self) -> EpochResult:
        size = self.spec.train_size
        self.epochs_started += 1
        if self.spec.lr_schedule != "constant":  # the eager and fused steps take a schedule (bnsuite.spec.lr_at)
            if isinstance(self.step, EagerStep):
                self.step.start_epoch(self.epochs_started)
            else:
                self.step.set_lrs([run.lr_at(self.epochs_started) for run in self.specs])
        if isinstance(self.step, fused.FusedStep):  # it gathers each batch itself, through the epoch's order
            self.correct.zero_()
            return self._train_fused(torch.stack([epoch_order(size, shuffle) for shuffle in self.shuffles]))
        orders = torch.cat([epoch_order(size, shuffle) for shuffle in self.shuffles])
        orders = orders.to(self.images.device, non_blocking=True)
        # One gather per epoch; every batch is then a view, with no copy per step. Into buffers kept from the
        # first epoch: a fresh one each epoch (the dataset once per run) costs its page faults every time.
        if self._gathered is None:
            self._gathered = (self.images.new_empty(len(orders), self.images.shape[1]),
                              self.labels.new_empty(len(orders)))
        images = torch.index_select(self.images, 0, orders, out=self._gathered[0]).view(len(self.models), size, -1)
        labels = torch.index_select(self.labels, 0, orders, out=self._gathered[1]).view(len(self.models), size)
        self.correct.zero_()
        for model in self.models:
            model.train()
        batch_size = self.spec.batch_size
        steps = 0
        for start in range(0, size, batch_size):
            batch_labels = labels[:, start:start + batch_size]
            if self.landscaper is not None and self.landscaper.due(self.steps_taken):
                self.landscaper(self.steps_taken, images[:, start:start + batch_size], batch_labels)
            losses, logits = self.step(images[:, start:start + batch_size], batch_labels)
            self.batch_losses[:, steps] = losses
            self.correct += (logits.argmax(dim=2) == batch_labels).sum(dim=1)
            steps += 1
            self.steps_taken += 1
            if self.prober is not None:
                self.prober.after_step(self.steps_taken)
        if self.prober is not None:
            self.prober(self.steps_taken)  # every epoch end
        return self.batch_losses[:, :steps], self.correct, steps

    def _train_fused(self, orders: torch.Tensor) -> EpochResult:
        """The epoch through the fused step, in the order `orders` (S, N): one C call per run of steps between
        checkpoints (the probe's after a step, the landscape's before one), each taken where the step-by-step loop
        takes it."""
        steps, batch_size = self.spec.steps_per_epoch, self.spec.batch_size
        hooks = [hook.every for hook in (self.prober, self.landscaper) if hook is not None]
        done = 0
        while done < steps:
            if self.landscaper is not None and self.landscaper.due(self.steps_taken):
                batch = orders[:, done * batch_size:(done + 1) * batch_size]
                self.landscaper(self.steps_taken, self.images[batch], self.labels[batch])
            run = min([steps - done] + [every - self.steps_taken % every for every in hooks])
            self.step.train(orders, done, run, self.batch_losses, self.correct)
            done += run
            self.steps_taken += run
            if self.prober is not None:
                self.prober.after_step(self.steps_taken)
        if self.prober is not None:
            self.prober(self.steps_taken)  # every epoch end
        return self.batch_losses[:, :steps], self.correct, steps


class GraphedStep:
    """A CUDA step captured as one CUDA graph for full batches and replayed: one launch instead of hundreds.

    The batch is copied into static buffers the graph reads; the outputs are
    the graph's own static tensors, read before the next step overwrites them
    (the epoch loop copies them at once, in stream order). The first
    `WARMUP` full steps run uncaptured on a side stream, as torch asks before
    a capture; they are real training steps, so every step trains exactly
    once. A batch of another size (an epoch's last) runs uncaptured.
    """

    WARMUP = 3
    NAME = "fast, CUDA graph"

    def __init__(self, step, models: int, batch_size: int, features: int, *, device: torch.device):
        self.step = step
        self.images = torch.empty(models, batch_size, features, device=device)
        self.labels = torch.empty(models, batch_size, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.full_steps = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] != self.images.shape[1]:
            return self.step(images, labels)
        self.images.copy_(images.reshape(self.images.shape))
        self.labels.copy_(labels)
        self.full_steps += 1
        if self.graph is None and self.full_steps <= self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.step(self.images, self.labels)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(self.images, self.labels)
        self.graph.replay()
        return self.outputs


def step_kind(model: nn.Module, spec: RunSpec, device: torch.device) -> str:
    """Which step trains `spec`'s runs of `model` on `device`, the one place that decides: "fused" (bnsuite.fused,
    on a CPU where it builds), "fast" (the ATen step, bnsuite.fastpath), "compiled" (bnsuite.compiled, for any
    other variant in a long run) or "eager". bnsuite.train trains a group's runs together on all but "eager"."""
    if spec.pipeline != "fast":
        return "eager"
    if device.type == "cpu" and fused.supports(model, spec.batch_size) and fused.takes_recipe(model, spec):
        return "fused"
    if not spec.constant_sgd:  # the ATen and compiled steps take SGD at a constant rate without decay only
        return "eager"
    if fastpath.supports(model):
        return "fast"
    if compiled.wanted(model, spec.steps_per_epoch * spec.epochs, device):
        return "compiled"
    return "eager"


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
