"""Batch Normalization over a mini-batch, written out with tensor operations.

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
