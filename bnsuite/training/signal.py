"""Signal propagation at initialization (Brock, De & Smith 2021, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets"): how the scale of a network's hidden signal changes with depth before
any training.

For every hidden layer's output, as the next layer (a Linear or a Conv2d) takes it, on one batch of the run's
training images: the mean over channels of the squared channel mean and of the channel variance, each channel's
taken over the images (and a feature map's positions). Their signal-propagation plot draws both against depth.
Measured in training mode, as the first step sees the network, on a copy of the model under a forked random state:
the run itself is untouched.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bnsuite.core.records import SignalTrace
from bnsuite.core.spec import SIGNAL_IMAGES


def measure_signal(model: nn.Module, images: torch.Tensor) -> SignalTrace:
    """The signal of `model` (at its current weights) on `images`, as the first hidden output onward takes it."""
    images = images[:SIGNAL_IMAGES]
    probe = copy.deepcopy(model).train()
    layers = [(name, module) for name, module in probe.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    taken: list[tuple[str, torch.Tensor]] = []

    def keep(name):
        def hook(_module, inputs):
            taken.append((name, inputs[0].detach().double()))
        return hook

    handles = [module.register_forward_pre_hook(keep(name)) for name, module in layers[1:]]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            probe(images)
    finally:
        for handle in handles:
            handle.remove()
    squared_means, variances = [], []
    for _, signal in taken:
        over = [dim for dim in range(signal.dim()) if dim != 1]  # a channel's values: every image and position
        squared_means.append(float(signal.mean(dim=over).square().mean()))
        variances.append(float(signal.var(dim=over, unbiased=False).mean()))
    return SignalTrace(images=len(images), layers=tuple(name for name, _ in taken),
                       squared_mean=tuple(squared_means), variance=tuple(variances))
