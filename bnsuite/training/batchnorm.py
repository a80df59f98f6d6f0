"""Batch Normalization, its ghost-batch form and Group/Layer Normalization, written out with tensor operations.

For each feature j of a batch x of shape (N, C), in training:

    mean_j = (1/N) sum_i x_ij                      batch mean
    var_j  = (1/N) sum_i (x_ij - mean_j)^2         biased batch variance
    y_ij   = gamma_j * (x_ij - mean_j) / sqrt(var_j + eps) + beta_j

and the running estimates that replace the batch statistics at inference follow them with the unbiased variance,
running = (1 - momentum) * running + momentum * batch value, exactly as `torch.nn.BatchNorm1d` does; autograd
differentiates the expression, so the gradients are BN's own.

`GhostBatchNorm1d` takes the statistics over groups of g images within the batch (what B/g devices compute without
synchronized BN; its running estimates follow the first group, as under DistributedDataParallel). `BatchRenorm1d`
(Ioffe 2017) corrects each ghost batch's statistics toward the running estimates, with sigma_B = sqrt(var_B + eps)
and sigma = sqrt(running_var + eps):

    r = clip(sigma_B / sigma, 1/r_max, r_max)      d = clip((mean_B - running_mean) / sigma, -d_max, d_max)
    y = gamma * ((x - mean_B) / sigma_B * r + d) + beta

r and d held constant in backprop. `NoisyBatchNorm1d` adds noise after BN in training (Santurkar et al. 2018);
`ScratchGroupNorm` normalizes each image over groups of its own features (Wu & He 2018; one group: LayerNorm). Why
each exists and what the studies ask of it: docs/studies.md.
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


class GhostBatchNorm2d(GhostBatchNorm1d):
    """Ghost-batch BN for (N, C, H, W) inputs (the ConvNet's): each channel's statistics over the g images of a
    ghost batch and every position of their feature maps, as `torch.nn.BatchNorm2d` takes them over the whole
    batch; the running estimates follow the first ghost batch, with the unbiased variance over its g*H*W values.
    With g at least the batch size it is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        if not self.training:
            x_hat = (x - _per_channel(self.running_mean)) / torch.sqrt(_per_channel(self.running_var) + self.eps)
            return _per_channel(self.weight) * x_hat + _per_channel(self.bias)
        output, first_mean, first_var, first_count = self._normalize(x)
        with torch.no_grad():
            self.running_mean.lerp_(first_mean, self.momentum)
            self.running_var.lerp_(first_var * (first_count / (first_count - 1)), self.momentum)
            self.num_batches_tracked += 1
        return output

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The normalized batch and the first ghost batch's per-channel mean, biased variance and value count."""
        if x.shape[0] < 2:
            raise ValueError("batch normalization needs more than 1 value per feature in training")
        channels, positions = self.num_features, x.shape[2] * x.shape[3]
        outputs, firsts = [], None
        for start, size, groups in ghost_parts(x.shape[0], self.ghost_size):
            part = x[start:start + size].reshape(groups, size // groups, channels, positions)
            mean = part.mean(dim=(1, 3), keepdim=True)
            var = (part - mean).pow(2).mean(dim=(1, 3), keepdim=True)
            outputs.append(((part - mean) / torch.sqrt(var + self.eps)).reshape(size, *x.shape[1:]))
            if firsts is None:
                firsts = (mean[0, 0, :, 0], var[0, 0, :, 0], size // groups * positions)
        x_hat = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return (_per_channel(self.weight) * x_hat + _per_channel(self.bias), *firsts)


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped (1, C, 1, 1), to scale or shift (N, C, H, W) feature maps channel by channel."""
    return values.view(1, -1, 1, 1)


# Batch Renormalization's clips and their warm-up (Ioffe 2017, section 4: r_max 1 -> 3 and d_max 0 -> 5, after a
# stretch of plain BN while the running estimates settle). Ioffe's schedule is for 160k-step ImageNet runs; the study's
# runs take 64 (smoke) to 18,750 (full, batch 32) steps, and running estimates with momentum 0.1 follow the batch
# statistics within about 20 steps, so: plain BN (r_max 1, d_max 0) for the first RENORM_WARMUP steps, then both
# bounds linear in the step count to their final values RENORM_RAMP steps later.
RENORM_R_MAX, RENORM_D_MAX = 3.0, 5.0
RENORM_WARMUP, RENORM_RAMP = 50, 450


def renorm_bounds(step: int) -> tuple[float, float]:
    """(r_max, d_max) for a training step after `step` earlier ones: BN's (1, 0) in the warm-up, then linear."""
    progress = min(max(step - RENORM_WARMUP, 0) / RENORM_RAMP, 1.0)
    return 1.0 + (RENORM_R_MAX - 1.0) * progress, RENORM_D_MAX * progress


def _renorm_bounds_of(step: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 / r_max, r_max, d_max) of renorm_bounds for a step count held in a tensor, computed as tensors in float64
    (the same arithmetic as on Python floats, so the same bounds bit for bit) and cast to `dtype`, as clamp casts a
    Python bound: nothing is read out of the tensor, so the layer can be vmapped and compiled (bnsuite.compiled)."""
    progress = ((step.to(torch.float64) - RENORM_WARMUP).clamp(min=0) / RENORM_RAMP).clamp(max=1.0)
    r_max = 1.0 + (RENORM_R_MAX - 1.0) * progress
    return (1.0 / r_max).to(dtype), r_max.to(dtype), (RENORM_D_MAX * progress).to(dtype)


class BatchRenorm1d(GhostBatchNorm1d):
    """Batch Renormalization (Ioffe 2017) over ghost batches of `ghost_size` images, for (N, C) inputs.

    Each ghost batch is normalized by its own statistics, corrected toward the running estimates by r and d
    (module docstring), clipped to the bounds of `renorm_bounds` at this layer's step count
    (`num_batches_tracked`, so a state dict carries its place in the schedule). The running estimates follow the
    first ghost batch, as GhostBatchNorm1d's do; inference uses them, as BN's does. With the bounds at (1, 0), r
    is 1 and d is 0 and the layer computes GhostBatchNorm1d exactly.
    """

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        if x.shape[0] < 2:
            raise ValueError("batch normalization needs more than 1 value per feature in training")
        r_min, r_max, d_max = _renorm_bounds_of(self.num_batches_tracked, x.dtype)
        with torch.no_grad():
            sigma = torch.sqrt(self.running_var + self.eps)
        outputs, firsts = [], None
        for start, size, groups in ghost_parts(x.shape[0], self.ghost_size):
            part = x[start:start + size].view(groups, size // groups, self.num_features)
            mean = part.mean(dim=1, keepdim=True)
            var = (part - mean).pow(2).mean(dim=1, keepdim=True)
            sigma_batch = torch.sqrt(var + self.eps)
            with torch.no_grad():  # held constant in backprop (Ioffe 2017, Algorithm 1)
                r = (sigma_batch / sigma).clamp(r_min, r_max)
                d = ((mean - self.running_mean) / sigma).clamp(-d_max, d_max)
            outputs.append(((part - mean) / sigma_batch * r + d).reshape(-1, self.num_features))
            if firsts is None:
                firsts = (mean[0, 0], var[0, 0], size // groups)
        x_hat = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return (self.weight * x_hat + self.bias, *firsts)


# Noisy BN's noise (Santurkar et al. 2018, section 2.1: "non-zero mean and non-unit variance", its distribution
# changing at every step). Per unit and per step, a shift m ~ U(-NOISE_SHIFT, NOISE_SHIFT) and a scale
# s ~ U(NOISE_SCALE): about half a BN output's spread, so the unit's distribution visibly jumps from step to step
# (the paper's Fig. 2), without swamping the signal; per image on top, N(0, NOISE_SAMPLE_STD^2). Chosen here; the
# paper's own values are for VGG on CIFAR-10 and are not restated.
NOISE_SHIFT = 0.5
NOISE_SCALE = (0.5, 1.5)
NOISE_SAMPLE_STD = 0.2


class NoisyBatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` followed, in training only, by y = s * bn(x) + m + e: per unit s and m drawn fresh at every
    forward pass, per image and unit e (the NOISE_* constants). The noise draws from torch's global generator, which
    the study seeds per run; inference (eval mode) adds none, so the held-out figures are BN's with noisy training.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.training:
            return y
        features = (1, self.num_features)
        low, high = NOISE_SCALE
        # torch.rand scaled, rather than uniform_ on a fresh tensor, which vmap cannot batch (bnsuite.compiled): the
        # same draws, and the same values, since both widths are 1.0 (an exact product) and the sum rounds once.
        scale = torch.rand(features, device=y.device, dtype=y.dtype) * (high - low) + low
        shift = torch.rand(features, device=y.device, dtype=y.dtype) * (2 * NOISE_SHIFT) - NOISE_SHIFT
        return y * scale + shift + NOISE_SAMPLE_STD * torch.randn_like(y)


class ScratchGroupNorm(nn.Module):
    """`torch.nn.GroupNorm(num_groups, num_channels)` for (N, C) and (N, C, H, W) inputs; one group is
    `torch.nn.LayerNorm(C)` for (N, C) (LayerNorm over channels and positions for feature maps).

    For each image i and group G of C / num_groups consecutive features (channels, with all their positions):

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
        if x.dim() not in (2, 4) or x.shape[1] != self.num_channels:
            raise ValueError(f"expected input of shape (N, {self.num_channels}) or (N, {self.num_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        groups = x.reshape(x.shape[0], self.num_groups, -1)
        mean = groups.mean(dim=2, keepdim=True)
        var = (groups - mean).pow(2).mean(dim=2, keepdim=True)
        x_hat = ((groups - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        if x.dim() == 4:
            return _per_channel(self.weight) * x_hat + _per_channel(self.bias)
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
