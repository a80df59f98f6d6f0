"""The study's two networks, layer for layer, the registry of model variants, and their optimizer.

A variant name maps to a constructor; adding a variant is one entry in
`VARIANTS`. Layer names (fc1, bn1, ...) are the study's, so state dicts and
parameter counts line up with the original code. The study's optimizer is
built here, next to the models, so every training path takes it from one place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from bnsuite.batchnorm import GhostBatchNorm1d, ScratchBatchNorm1d

# Dropout after each hidden ReLU in the regularization study: 0.2, the mild rate usual for small MLPs on MNIST.
# Srivastava et al.'s 0.5 for hidden units goes with much longer training than the study's 10 epochs.
DROPOUT = 0.2


class SimpleNN(nn.Module):
    """784 -> 256 -> 128 -> 10 with ReLU: the study's plain network."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class SimpleNNWithDropout(nn.Module):
    """SimpleNN or SimpleNNWithBN with dropout after each hidden ReLU: the regularization study's variants."""

    def __init__(self, *, batch_norm: bool, p: float = DROPOUT):
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.bn1 = nn.BatchNorm1d(256) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(256, 128)
        self.bn2 = nn.BatchNorm1d(128) if batch_norm else nn.Identity()
        self.fc3 = nn.Linear(128, 10)
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = self.dropout(F.relu(self.bn1(self.fc1(x))))
        x = self.dropout(F.relu(self.bn2(self.fc2(x))))
        return self.fc3(x)


class SimpleNNWithBN(nn.Module):
    """The same network with BatchNorm1d after fc1 and fc2, before each ReLU.

    `norm` puts another normalization there (ghost-batch BN, LayerNorm); the layers keep the study's names
    bn1 and bn2, so every normalized variant's state dict lines up with the study's.
    """

    def __init__(self, norm: Callable[[int], nn.Module] = nn.BatchNorm1d):
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.bn1 = norm(256)
        self.fc2 = nn.Linear(256, 128)
        self.bn2 = norm(128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


def last_hidden_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input to the last hidden ReLU for `images`, as a training step computes it, without changing the model.

    BN variants: after bn2, normalized with this batch's own statistics (running statistics untouched). Plain:
    fc2's output. Dropout is off: the probe measures the distribution, not one draw of masks.
    """
    x = F.relu(_normalized(getattr(model, "bn1", None), model.fc1(images.view(len(images), -1))))
    return _normalized(getattr(model, "bn2", None), model.fc2(x))


def _normalized(layer: nn.Module | None, h: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, GhostBatchNorm1d):  # before its base class, ScratchBatchNorm1d
        return layer.normalize(h)  # ghost-group statistics, running estimates untouched
    if isinstance(layer, (nn.BatchNorm1d, ScratchBatchNorm1d)):
        return F.batch_norm(h, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
    if layer is None or isinstance(layer, nn.Identity):
        return h  # plain, and the plain dropout variant
    return layer(h)  # LayerNorm: no batch statistics, no buffers


def has_batch_statistics(model: nn.Module) -> bool:
    """Whether `model` normalizes with its batch's statistics in training (and running estimates at inference)."""
    return any(isinstance(layer, (nn.BatchNorm1d, ScratchBatchNorm1d)) for layer in model.modules())  # ghost too


# Ghost sizes a `bn-ghostG` variant can take: the study's (Wu & He's 2 to 32 images per device) and 64.
GHOST_SIZES = (2, 4, 8, 16, 32, 64)


def ghost_size(variant: str) -> int | None:
    """G of a `bn-ghostG` variant; None for any other variant."""
    prefix = "bn-ghost"
    return int(variant.removeprefix(prefix)) if variant.startswith(prefix) else None


VARIANTS: dict[str, Callable[[], nn.Module]] = {
    "plain": SimpleNN,
    "bn": SimpleNNWithBN,
    "bn-scratch": lambda: SimpleNNWithBN(norm=ScratchBatchNorm1d),
    "plain-dropout": lambda: SimpleNNWithDropout(batch_norm=False),
    "bn-dropout": lambda: SimpleNNWithDropout(batch_norm=True),
    # Statistics over ghost groups of G images within each training batch (bnsuite.batchnorm.GhostBatchNorm1d).
    **{f"bn-ghost{g}": (lambda g=g: SimpleNNWithBN(norm=lambda features: GhostBatchNorm1d(features, g)))
       for g in GHOST_SIZES},
    # LayerNorm over each image's features: no batch statistics (torch's kernel, checked against ScratchGroupNorm).
    "ln": lambda: SimpleNNWithBN(norm=nn.LayerNorm),
}


def build_model(variant: str, init_scale: float = 1.0) -> nn.Module:
    """A freshly initialized model of `variant`: PyTorch's default init, from the global RNG.

    `init_scale` multiplies every Linear weight after that init (biases and
    batch-norm parameters stay as they are), so the same seed gives the same
    weights up to the factor.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    model = VARIANTS[variant]()
    if init_scale != 1.0:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, nn.Linear):
                    layer.weight.mul_(init_scale)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, fused: bool) -> torch.optim.Optimizer:
    """The study's SGD with momentum; `fused` runs the same update as one kernel per step instead of a loop."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, fused=fused or None)
