"""The compiled step: any variant the fused and ATen steps do not cover (a user's own layer or network, BN written
out), its seeds together, under torch.compile.

On the eager step each run pays autograd's and torch.optim's bookkeeping for every op of every step, one model
after another. Here a group's models become views into stacked (S, ...) tensors (as bnsuite.fastpath.stack_into
makes them, so each model still works as a module: evaluation, probes and its state dict read the stacked
values), and one training step of every model is a single function of those tensors: `torch.func.vmap` over the
models of `grad_and_value` of the model's cross-entropy through `torch.func.functional_call` (batch norm's
running estimates update in place, as in the module), then SGD with momentum, written as torch.optim.SGD
computes it. torch.compile (inductor) compiles that function once per batch shape (the epoch's last, shorter
batch is a second shape), the first time a process meets it; inductor keeps its compiled code in its own cache
across processes.

It is used where a run is long enough for the compilation to pay for itself (`COMPILE_AFTER_STEPS` steps a run,
the full profile's studies but not smoke's or quick's, whose runs would spend longer compiling than training), on
a CPU, with a C++ compiler for inductor. A model the function cannot be compiled or vmapped for (the first step
raises) trains on the eager step instead, from the same initial state, and the record says so and why
(`RunRecord.training_step`).

Determinism: vmap turns each model's products into batched products over the group, whose kernels may sum in
another order for another group size, so a run's numbers depend on its group as well as its spec (both are in
the record: `trained_with`); the same spec, group and environment give the same record, bit for bit. A layer
that draws random numbers (dropout, noise) draws them for each model separately (`randomness="different"`),
from the compiled code's generator seeded from torch's, not the eager step's draws. docs/determinism.md says
where this step differs from the fused and ATen steps' contract.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bnsuite.core.spec import RunSpec
from bnsuite.training.fastpath import stack_into
from bnsuite.training.models import EagerStep

SWITCH_VARIABLE = "BNSUITE_COMPILE"  # "0": such variants train on the eager step; "1": compiled however short the run
# Steps a run must take before its group is compiled: a full-profile run takes 4,690 to 18,750 (10 epochs at batch
# 128 to 32), a quick one 1,252 and a smoke one 126. Compiling costs 5 to 20 s per variant and batch shape on 2 cores
# (measured on an Intel Xeon), about what the eager step spends on 2,000 to 10,000 steps of the study's MLP.
COMPILE_AFTER_STEPS = 4_000


@functools.cache
def unavailable() -> str | None:
    """Why torch.compile cannot compile on this machine (checked once per process, on a one-line function), or
    None where it can."""
    if os.environ.get(SWITCH_VARIABLE) == "0":
        return f"switched off by {SWITCH_VARIABLE}=0"
    try:
        compiled = torch.compile(lambda x: torch.relu(x) * 2)
        compiled(torch.ones(4))
    except Exception as error:  # inductor raises many kinds (no C++ compiler, a broken toolchain)
        return f"torch.compile does not work here ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None


def wanted(model: nn.Module, steps_per_run: int, device: torch.device) -> bool:
    """Whether a group of `model`'s runs of `steps_per_run` steps trains on the compiled step (bnsuite.train and
    bnsuite.epochs ask; the fused and ATen steps are asked first)."""
    if device.type != "cpu" or not any(True for _ in model.parameters()):
        return False
    switch = os.environ.get(SWITCH_VARIABLE)
    if switch != "1" and steps_per_run < COMPILE_AFTER_STEPS:
        return False
    return unavailable() is None


@functools.cache
def _cxx() -> str:
    """The C++ compiler inductor builds with, as its version line names it: part of the step's name, since another
    compiler may generate other arithmetic."""
    from torch._inductor import config

    candidates = config.cpp.cxx if isinstance(config.cpp.cxx, (tuple, list)) else (config.cpp.cxx,)
    compiler = next((candidate for candidate in candidates if candidate), "g++")
    try:
        version = subprocess.run([compiler or "g++", "--version"], capture_output=True, text=True, timeout=60)
        return (version.stdout.strip().splitlines() or [compiler or "g++"])[0]
    except (OSError, subprocess.SubprocessError):
        return compiler or "g++"


class CompiledStep:
    """One SGD-with-momentum step of S same-shaped models on S batches, compiled; called as FastStep is."""

    def __init__(self, models: Sequence[nn.Module], *, lr: Sequence[float], momentum: float):
        self.models = list(models)
        if len({type(model) for model in self.models}) != 1:
            raise ValueError("CompiledStep trains models of one class")
        names = [name for name, _ in self.models[0].named_parameters()]
        buffers = [name for name, _ in self.models[0].named_buffers()]
        self.parameters = {name: stack_into(self.models, name) for name in names}
        self.buffers = {name: stack_into(self.models, name) for name in buffers}
        self.velocity = {name: torch.zeros_like(value) for name, value in self.parameters.items()}
        self.lr = torch.tensor(list(lr), dtype=next(iter(self.parameters.values())).dtype)
        self.momentum = momentum
        self.template = copy.deepcopy(self.models[0]).to("meta")  # the architecture; its tensors are never read
        self.template.train()
        self._compiled = torch.compile(self._step, dynamic=False)
        self.fallback: list | None = None  # one eager step per model, once compiling failed
        self._snapshot: list[torch.Tensor] | None = None
        self.step_name = f"compiled (inductor, torch {torch.__version__.split('+')[0]}, {_cxx()})"

    def _loss(self, parameters, buffers, images, labels):
        logits = torch.func.functional_call(self.template, (parameters, buffers), (images,))
        return F.cross_entropy(logits, labels), logits

    def _step(self, parameters, buffers, velocity, lr, images, labels):
        gradient_and_loss = torch.func.grad_and_value(self._loss, has_aux=True)
        gradients, (losses, logits) = torch.func.vmap(gradient_and_loss, randomness="different")(
            parameters, buffers, images, labels)
        for name, value in parameters.items():
            # torch.optim.SGD: v = momentum * v + g (v = g at the first step, from v = 0), w = w - lr * v.
            velocity[name].mul_(self.momentum).add_(gradients[name])
            value.sub_(lr.view(-1, *[1] * (value.dim() - 1)) * velocity[name])
        return losses, logits

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (S, B, ...), labels (S, B): the losses (S,) and logits (S, B, classes) of the step."""
        if self.fallback is None:
            first = self._snapshot is None
            if first:  # what the models were, should the first call fail part way
                self._snapshot = [tensor.clone() for tensor in self._state()]
            try:
                with torch.no_grad():  # the update is in place on leaf views: gradients come from torch.func alone
                    return self._compiled(self.parameters, self.buffers, self.velocity, self.lr, images, labels)
            except Exception as error:  # noqa: BLE001 - anything the compiler or vmap raises: train eagerly instead
                if not first:
                    raise
                for tensor, before in zip(self._state(), self._snapshot, strict=True):
                    tensor.copy_(before)
                self._fall_back(error)
        losses, logits = zip(*(step(images[index:index + 1], labels[index:index + 1])
                               for index, step in enumerate(self.fallback)), strict=True)
        return torch.cat(losses), torch.cat(logits)

    def _state(self) -> list[torch.Tensor]:
        return [*self.parameters.values(), *self.buffers.values(), *self.velocity.values()]

    def _fall_back(self, error: Exception) -> None:
        """The eager step for every model from here on, from the state before the first call (a failure at a later
        call, after the compiled code has trained, is raised)."""

        self.fallback = [EagerStep(model, RunSpec(lr=float(lr), momentum=self.momentum))
                         for model, lr in zip(self.models, self.lr.tolist(), strict=True)]
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        self.step_name = f"eager (compiling failed: {type(error).__name__}: {reason})"
