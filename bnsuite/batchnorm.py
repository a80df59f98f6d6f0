"""Batch Normalization, its ghost-batch form and Group/Layer Normalization, written out with tensor operations.

For each feature j of a batch x of shape (N, C), in training:

    mean_j = (1/N) sum_i x_ij                      batch mean
    var_j  = (1/N) sum_i (x_ij - mean_j)^2         biased batch variance
    y_ij   = gamma_j * (x_ij - mean_j) / sqrt(var_j + eps) + beta_j

gamma and beta are learned, so the layer can undo the normalization where that
helps: normalizing never costs the network representational power. The running
estimates that replace batch statistics at inference are updated as

    running_mean = (1 - momentum) * running_mean + momentum * mean_j
    running_var  = (1 - momentum) * running_var  + momentum * var_j * N / (N - 1)

with the unbiased variance, exactly as `torch.nn.BatchNorm1d` does. Autograd
differentiates the expression above, so the gradients are BN's real ones.

`GhostBatchNorm1d` computes the same statistics over groups of g images
within the batch instead of over all of it: a batch of B with ghost size g
computes what data-parallel training on B/g devices computes without
synchronized BN (each device normalizes its own g images; the gradients are
averaged over devices, which for the batch's mean loss is what autograd
gives here). Its running estimates follow the first group only, as under
PyTorch's DistributedDataParallel, which broadcasts rank 0's buffers before
every forward.

`ScratchGroupNorm` computes each image's statistics over groups of its own
features (Wu & He 2018), so no image's output depends on another's: with one
group it is LayerNorm over the features (Ba et al. 2016). Neither keeps
running estimates; training and inference compute the same thing.
"""

from __future__ import annotations

import torch
from torch import nn


class ScratchBatchNorm1d(nn.Module):
    """A drop-in equivalent of `torch.nn.BatchNorm1d(num_features)` for (N, C) inputs."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        # eps and momentum are PyTorch's defaults, so this layer and nn.BatchNorm1d agree.
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}), got {tuple(x.shape)}")
        if self.training:
            batch_size = x.shape[0]
            if batch_size < 2:
                # Same rule as nn.BatchNorm1d: the variance of one value is undefined.
                raise ValueError("batch normalization needs more than 1 value per feature in training")
            mean = x.mean(dim=0)
            var = (x - mean).pow(2).mean(dim=0)
            with torch.no_grad():
                unbiased_var = var * (batch_size / (batch_size - 1))
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased_var, self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight * x_hat + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class GhostBatchNorm1d(ScratchBatchNorm1d):
    """Batch norm with statistics over groups of `ghost_size` images within the batch, for (N, C) inputs.

    The groups are consecutive images: [0, g), [g, 2g), ...; a batch that is
    not a multiple of g ends with one shorter group (or, when a single image
    would be left over, one group of g + 1). With g at least the batch size,
    this is `ScratchBatchNorm1d`.
    """

    def __init__(self, num_features: int, ghost_size: int, eps: float = 1e-5, momentum: float = 0.1):
        if isinstance(ghost_size, bool) or not isinstance(ghost_size, int) or ghost_size < 2:
            raise ValueError(f"ghost size must be a whole number of at least 2 images, got {ghost_size!r}")
        super().__init__(num_features, eps, momentum)  # the same parameters and running estimates
        self.ghost_size = ghost_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}), got {tuple(x.shape)}")
        if not self.training:
            x_hat = (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
            return self.weight * x_hat + self.bias
        output, first_mean, first_var, first_size = self._normalize(x)
        with torch.no_grad():
            self.running_mean.lerp_(first_mean, self.momentum)
            self.running_var.lerp_(first_var * (first_size / (first_size - 1)), self.momentum)
            self.num_batches_tracked += 1
        return output

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """What training computes for `x` (ghost-group statistics), leaving the running estimates untouched."""
        return self._normalize(x)[0]

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The normalized batch and the first group's mean, biased variance and size."""
        if x.shape[0] < 2:
            raise ValueError("batch normalization needs more than 1 value per feature in training")
        outputs, firsts = [], None
        for start, size, groups in ghost_parts(x.shape[0], self.ghost_size):
            part = x[start:start + size].view(groups, size // groups, self.num_features)
            mean = part.mean(dim=1, keepdim=True)
            var = (part - mean).pow(2).mean(dim=1, keepdim=True)
            outputs.append(((part - mean) / torch.sqrt(var + self.eps)).reshape(-1, self.num_features))
            if firsts is None:
                firsts = (mean[0, 0], var[0, 0], size // groups)
        x_hat = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return (self.weight * x_hat + self.bias, *firsts)

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_size={self.ghost_size}, eps={self.eps}, momentum={self.momentum}"


class ScratchGroupNorm(nn.Module):
    """`torch.nn.GroupNorm(num_groups, num_channels)` for (N, C) inputs; one group is `torch.nn.LayerNorm(C)`.

    For each image i and group G of C / num_groups consecutive features:

        mean_iG = mean of x_ij over j in G,  var_iG = biased variance over j in G
        y_ij    = gamma_j * (x_ij - mean_iG) / sqrt(var_iG + eps) + beta_j
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"{num_channels} features do not split into {num_groups} equal groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected input of shape (N, {self.num_channels}), got {tuple(x.shape)}")
        groups = x.view(x.shape[0], self.num_groups, -1)
        mean = groups.mean(dim=2, keepdim=True)
        var = (groups - mean).pow(2).mean(dim=2, keepdim=True)
        x_hat = ((groups - mean) / torch.sqrt(var + self.eps)).view_as(x)
        return self.weight * x_hat + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


def ghost_parts(batch: int, ghost: int) -> list[tuple[int, int, int]]:
    """How a batch of `batch` images is cut into ghost batches of `ghost`: (start, images, ghost batches) per part.

    Whole ghost batches first, then one uneven last one (the rest of the batch; g + 1 images where a single
    image would be left over, since one image has no variance). Shared by GhostBatchNorm1d and the fast step.
    """
    whole = batch - batch % ghost
    if batch - whole == 1:
        whole -= ghost
    parts = [(0, whole, whole // ghost)] if whole else []
    return parts + ([(whole, batch - whole, 1)] if whole < batch else [])
