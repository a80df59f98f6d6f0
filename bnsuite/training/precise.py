"""Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", section 3): population statistics recomputed
exactly with the weights frozen, against the exponential moving averages a BN layer keeps while it trains.

A BN layer's running estimates average batch statistics of weights that kept changing, the older ones weighted
less by the momentum; precise BN freezes the weights and computes each layer's population mean and variance over
many training batches of the training batch size, each layer's input as training computes it (the layers before
it normalizing by their batch's statistics). The held-out accuracy with those statistics in place of the running
estimates is what the study's claims compare (bnsuite.studies.precise). The model itself is untouched: the
statistics go into a copy. Where the fused step trained the models, it measures them all at once in C
(bnsuite.fused.FusedStep.precise), with the arithmetic that computed the running estimates.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bnsuite.core.spec import PRECISE_IMAGES
from bnsuite.training.evaluation import evaluate


def _normalizations(model: nn.Module) -> list[nn.Module]:
    """The layers that keep running estimates of their batch statistics."""
    return [module for module in model.modules()
            if getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None]


@torch.no_grad()
def with_precise_statistics(model: nn.Module, images: torch.Tensor, batch_size: int) -> nn.Module:
    """A copy of `model` whose every normalization layer holds the population mean and (biased) variance of its
    input over the first PRECISE_IMAGES of `images` in consecutive batches of `batch_size`, in training mode,
    dropout off (it is off at inference, where the statistics are used)."""
    probe = copy.deepcopy(model).train()
    for module in probe.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    layers = _normalizations(probe)
    sums: dict[int, list[torch.Tensor]] = {}

    def keep(index):
        def hook(_module, inputs):
            x = inputs[0].detach().double()
            over = [dim for dim in range(x.dim()) if dim != 1]
            count = x.numel() // x.shape[1]
            first, second = x.sum(dim=over), x.square().sum(dim=over)
            if index in sums:
                sums[index][0] += first
                sums[index][1] += second
                sums[index][2] += count
            else:
                sums[index] = [first, second, count]
        return hook

    handles = [layer.register_forward_pre_hook(keep(index)) for index, layer in enumerate(layers)]
    images = images[:PRECISE_IMAGES]
    starts = list(range(0, len(images), batch_size))
    if len(starts) > 1 and len(images) - starts[-1] == 1:
        starts.pop()  # a batch of one image has no batch statistics
    try:
        with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
            for start, end in zip(starts, starts[1:] + [len(images)], strict=True):
                probe(images[start:end])
    finally:
        for handle in handles:
            handle.remove()
    for index, layer in enumerate(layers):
        first, second, count = sums[index]
        mean = first / count
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_((second / count - mean.square()).clamp_min(0).to(layer.running_var.dtype))
    return probe.eval()


def precise_accuracies(models: list[nn.Module], training: tuple[torch.Tensor, torch.Tensor],
                       held_out: tuple[torch.Tensor, torch.Tensor], *, batch_size: int,
                       only: list[int], runner=None) -> list[float | None]:
    """Each model's held-out accuracy (%) with precise statistics (None for the models `only` leaves out, and
    where a model keeps no running estimates). Through `runner.precise` where the epoch runner has one (the fused
    step measures every model at once, with the arithmetic it trains with), else model by model as modules. The
    modules are current: every training step updates them in place (bnsuite.fastpath.stack_into)."""
    images, _ = training
    fast = getattr(runner, "precise", None)
    measured = fast(images[:PRECISE_IMAGES], *held_out) if fast is not None else None
    if measured is not None:
        return [accuracy if index in only else None for index, accuracy in enumerate(measured[0])]
    return [evaluate(with_precise_statistics(model, images, batch_size), *held_out)[1]
            if index in only and _normalizations(model) else None for index, model in enumerate(models)]
