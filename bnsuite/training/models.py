"""The study's two networks, layer for layer, a small ConvNet, the built-in model variants, and their optimizer.

Each built-in variant registers its builder with `register_variant`
(bnsuite.registry), the same decorator a user's plugin uses. Layer names
(fc1, bn1, ...) are the study's, so state dicts and parameter counts line up
with the original code. The ConvNet (`SmallCNN`, network `cnn`) is the study's
question asked where BN is mostly used: two conv blocks (conv 3x3, BN, ReLU,
2x2 max pooling) and a linear classifier, BatchNorm2d before each ReLU, with
the MLP's variant family (plain, bn, ghost-batch BN, LayerNorm and GroupNorm)
under the same names. The study's optimizer is built here, next to the
models, so every training path takes it from one place, and with it the
eager step (autograd and torch.optim), the reference every faster step is
held against and the fallback of the compiled one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from bnsuite.core.datasets import DATASETS
from bnsuite.core.networks import AFTER, BEFORE, CHANNELS, FEATURES, PLACEMENTS
from bnsuite.core.registry import builder, network_builder, register_normalization, register_variant
from bnsuite.core.spec import DEFAULT_NETWORK, RunSpec, SpecError, StudySpec
from bnsuite.training.batchnorm import (
    BatchRenorm1d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    NoisyBatchNorm1d,
    ScratchBatchNorm1d,
)

# Dropout after each hidden ReLU in the regularization study: 0.2, the mild rate usual for small MLPs on MNIST.
# Srivastava et al.'s 0.5 for hidden units goes with much longer training than the study's 10 epochs.
DROPOUT = 0.2


class SimpleNN(nn.Module):
    """784 -> 256 -> 128 -> 10 with ReLU: the study's plain network (`classes` logits for another dataset's)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class Hidden:
    """What a network's hidden layer does after its product: the normalization slot before the nonlinearity or
    after it (`placement`, bnsuite.networks.PLACEMENTS), then dropout where it has any. The networks whose builders
    take `placement` and `dropout` (the MLP, the ConvNet) mix this in; the fast steps read `placement` and
    `dropout` off the model (set per instance: a class attribute would hide nn.Module's registered dropout)."""

    def _set_hidden(self, placement: str, dropout: float) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        self.placement = placement
        self.dropout = nn.Dropout(dropout) if dropout else None

    def activate(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        x = norm(F.relu(x)) if self.placement == AFTER else F.relu(norm(x))
        return x if self.dropout is None else self.dropout(x)


def dropout_of(model: nn.Module) -> float:
    """The dropout probability after each hidden nonlinearity of `model` (0: none)."""
    return model.dropout.p if isinstance(model, Hidden) and model.dropout is not None else 0.0


class SimpleNNWithBN(Hidden, nn.Module):
    """The same network with BatchNorm1d after fc1 and fc2, before each ReLU.

    `norm` puts another normalization there (ghost-batch BN, LayerNorm); the layers keep the study's names
    bn1 and bn2, so every normalized variant's state dict lines up with the study's. `placement="after"` puts the
    slots after each ReLU instead (fc1 -> ReLU -> bn1 -> fc2 -> ReLU -> bn2 -> fc3: the same layers, only the order
    differs), `dropout=p` dropout after each hidden layer's ReLU and slot (the regularization study's variants);
    neither has parameters, so the initialization is the same.
    """

    def __init__(self, norm: Callable[[int], nn.Module] = nn.BatchNorm1d, classes: int = 10, *,
                 placement: str = BEFORE, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.bn1 = norm(256)
        self.fc2 = nn.Linear(256, 128)
        self.bn2 = norm(128)
        self.fc3 = nn.Linear(128, classes)
        self._set_hidden(placement, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = self.activate(self.fc1(x), self.bn1)
        x = self.activate(self.fc2(x), self.bn2)
        return self.fc3(x)



class StackMLP(nn.Module):
    """784 -> `hidden` fully connected layers of `width` units -> 10, a nonlinearity after each hidden layer (the
    sigmoid, or ReLU), with `batch_norm` BatchNorm1d before each nonlinearity, else nothing there (bn1.. are
    Identity). Layer names fc1.., bn1.. as in the study's MLP.

    The networks of the papers' own experiments are stacks of this kind (IoffeMLP, DeepMLP)."""

    def __init__(self, *, hidden: int, width: int, batch_norm: bool, sigmoid: bool, classes: int = 10):
        super().__init__()
        self.hidden, self.sigmoid = hidden, sigmoid
        widths = (784,) + (width,) * hidden
        for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), start=1):
            setattr(self, f"fc{layer}", nn.Linear(fan_in, fan_out))
            setattr(self, f"bn{layer}", nn.BatchNorm1d(fan_out) if batch_norm else nn.Identity())
        setattr(self, f"fc{hidden + 1}", nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        nonlinearity = torch.sigmoid if self.sigmoid else F.relu
        for layer in range(1, self.hidden + 1):
            x = nonlinearity(getattr(self, f"bn{layer}")(getattr(self, f"fc{layer}")(x)))
        return getattr(self, f"fc{self.hidden + 1}")(x)


# Ioffe & Szegedy (2015, section 4.1): "a simple network, with 3 fully-connected hidden layers with 100 activations
# each ... each hidden layer computes y = g(Wu + b) with sigmoid nonlinearity ... a 10-way softmax".
IOFFE_WIDTH, IOFFE_HIDDEN = 100, 3


class IoffeMLP(StackMLP):
    """Ioffe & Szegedy's MNIST network: 784 -> 100 -> 100 -> 100 -> 10, a sigmoid after each hidden layer, with
    `batch_norm` BatchNorm1d before each sigmoid (their BN network)."""

    def __init__(self, *, batch_norm: bool, classes: int = 10):
        super().__init__(hidden=IOFFE_HIDDEN, width=IOFFE_WIDTH, batch_norm=batch_norm, sigmoid=True, classes=classes)


# The signal-propagation study's deep network (bnsuite.studies.signal; Brock et al. 2021 ask for a depth of 20 or
# more): 20 hidden ReLU layers of 100 units, PyTorch's default init.
DEEP_WIDTH, DEEP_HIDDEN = 100, 20


class DeepMLP(StackMLP):
    """784 -> 20 hidden layers of 100 ReLU units -> 10, with `batch_norm` BatchNorm1d before each ReLU."""

    def __init__(self, *, batch_norm: bool, classes: int = 10):
        super().__init__(hidden=DEEP_HIDDEN, width=DEEP_WIDTH, batch_norm=batch_norm, sigmoid=False, classes=classes)


GROUPS = 4  # gn's groups of channels (Wu & He use 32 groups of wide layers; 4 of 2 and of 4 channels here)
# Ghost sizes a `bn-ghostG` variant can take: the study's (Wu & He's 2 to 32 images per device) and 64.
GHOST_SIZES = (2, 4, 8, 16, 32, 64)


# The study's MLP as a network: SimpleNNWithBN with the variant's normalization in its two slots (nothing there for
# `plain`: the same layers, parameters and arithmetic as SimpleNN). Described in bnsuite.networks.
@network_builder("mlp")
def mlp(norm: Callable[[int], nn.Module], *, image_shape: tuple[int, int, int] = (1, 28, 28), classes: int = 10,
        placement: str = BEFORE, dropout: float = 0.0) -> nn.Module:
    return SimpleNNWithBN(norm=norm, classes=classes, placement=placement, dropout=dropout)


# The built-in variants register as a user's plugin does (bnsuite.registry). Order and colour place them in the
# report's tables and figures. Those that are a normalization register once, for every network with slots for them
# (`make(size, slots)`: a module for one slot of `size` features or channels); the others build an MLP of their own.
@register_normalization("plain", batch_statistics=False, order=0, color="tab:orange", nothing=True)
def plain(size: int, slots: str) -> nn.Module:
    return nn.Identity()


@register_normalization("bn", batch_statistics=True, order=1, color="tab:blue")
def bn(size: int, slots: str) -> nn.Module:
    """torch's BatchNorm1d over features, BatchNorm2d over a feature map's channels (each over the batch and every
    position)."""
    return nn.BatchNorm1d(size) if slots == FEATURES else nn.BatchNorm2d(size)


# The dropout study's pair: `plain` and `bn` with dropout after each hidden nonlinearity, in every network that
# takes dropout (the MLP, the ConvNet, a plugin's network registered with dropout=True).
register_normalization("plain-dropout", batch_statistics=False, derives_from="plain", order=2, color="tab:orange",
                       nothing=True, dropout=DROPOUT)(plain)
register_normalization("bn-dropout", batch_statistics=True, derives_from="bn", order=3, color="tab:blue",
                       dropout=DROPOUT)(bn)


@register_normalization("bn-scratch", batch_statistics=True, slots=(FEATURES,), derives_from="bn", order=4,
                        color="tab:green")
def bn_scratch(size: int, slots: str) -> nn.Module:
    """BN written out (bnsuite.batchnorm.ScratchBatchNorm1d), trained by the eager step."""
    return ScratchBatchNorm1d(size)


def _ghost_builder(ghost: int) -> Callable[..., nn.Module]:
    def build(size: int, slots: str) -> nn.Module:
        """Statistics over ghost groups of G images (and every position of a feature map) within each training
        batch (GhostBatchNorm1d, GhostBatchNorm2d)."""
        return GhostBatchNorm1d(size, ghost) if slots == FEATURES else GhostBatchNorm2d(size, ghost)

    build.__qualname__ = f"ghost_bn_{ghost}"
    return build


for _ghost in GHOST_SIZES:
    register_normalization(f"bn-ghost{_ghost}", batch_statistics=True, images_per_statistic=_ghost,
                           derives_from="bn", order=5)(_ghost_builder(_ghost))


def _renorm_builder(ghost: int) -> Callable[..., nn.Module]:
    def build(size: int, slots: str) -> nn.Module:
        """Batch Renormalization over ghost groups of G images within each training batch (BatchRenorm1d)."""
        return BatchRenorm1d(size, ghost)

    build.__qualname__ = f"batch_renorm_{ghost}"
    return build


for _ghost in GHOST_SIZES:
    register_normalization(f"bn-renorm{_ghost}", batch_statistics=True, slots=(FEATURES,),
                           images_per_statistic=_ghost, derives_from=f"bn-ghost{_ghost}", order=7,
                           color="tab:red")(_renorm_builder(_ghost))


# The placement study's BN after each hidden ReLU, in every network whose slots can sit there; the last ReLU's
# input is then what the network gives without a slot (the MLP's fc2 output), where it is probed.
register_normalization("bn-after-relu", batch_statistics=True, derives_from="bn", order=8, color="tab:cyan",
                       placement=AFTER)(bn)


@register_normalization("bn-noisy", batch_statistics=True, slots=(FEATURES,), derives_from="bn", order=9,
                        color="tab:olive")
def bn_noisy(size: int, slots: str) -> nn.Module:
    """BN with unstable noise after it in training (NoisyBatchNorm1d; Santurkar et al. 2018)."""
    return NoisyBatchNorm1d(size)



# The precise-BN study's slow running estimates (bnsuite.studies.precise): each step keeps 0.99 of them, Wu &
# Johnson's EMA momentum 0.99 (torch's momentum 0.01, where the default keeps 0.9: torch's 0.1).
SLOW_EMA = 0.99


@register_normalization("bn-ema0.99", batch_statistics=True, slots=(FEATURES,), derives_from="bn", order=14,
                        color="tab:pink")
def bn_slow_ema(size: int, slots: str) -> nn.Module:
    """BatchNorm1d whose running estimates move at torch's momentum 0.01 instead of 0.1."""
    return nn.BatchNorm1d(size, momentum=round(1 - SLOW_EMA, 10))


# The Ioffe study's pair (bnsuite.studies.ioffe): their probe point is what feeds the last hidden sigmoid.
@register_variant("ioffe-plain", batch_statistics=False, probe=f"fc{IOFFE_HIDDEN}", order=10, color="tab:orange")
def ioffe_plain(classes: int = 10) -> nn.Module:
    """Ioffe & Szegedy's MNIST network without BN (IoffeMLP)."""
    return IoffeMLP(batch_norm=False, classes=classes)


@register_variant("ioffe-bn", batch_statistics=True, derives_from="ioffe-plain", probe=f"bn{IOFFE_HIDDEN}", order=11,
                  color="tab:blue")
def ioffe_bn(classes: int = 10) -> nn.Module:
    """Ioffe & Szegedy's MNIST network with BatchNorm1d before each sigmoid (IoffeMLP)."""
    return IoffeMLP(batch_norm=True, classes=classes)

# The signal-propagation study's pair (bnsuite.studies.signal); probed where the ReLU of the last hidden layer takes
# its input.
@register_variant("deep-plain", batch_statistics=False, probe=f"fc{DEEP_HIDDEN}", order=12, color="tab:orange")
def deep_plain(classes: int = 10) -> nn.Module:
    """The deep network without BN (DeepMLP): 20 hidden ReLU layers at PyTorch's default init."""
    return DeepMLP(batch_norm=False, classes=classes)


@register_variant("deep-bn", batch_statistics=True, derives_from="deep-plain", probe=f"bn{DEEP_HIDDEN}", order=13,
                  color="tab:blue")
def deep_bn(classes: int = 10) -> nn.Module:
    """The deep network with BatchNorm1d before each ReLU (DeepMLP)."""
    return DeepMLP(batch_norm=True, classes=classes)


@register_normalization("ln", batch_statistics=False, order=6, color="tab:purple")
def ln(size: int, slots: str) -> nn.Module:
    """LayerNorm over each image's features in BN's place, over a feature map's channels and positions (GroupNorm
    with one group): no batch statistics (torch's kernels, checked against ScratchGroupNorm)."""
    return nn.LayerNorm(size) if slots == FEATURES else nn.GroupNorm(1, size)


@register_normalization("gn", batch_statistics=False, slots=(CHANNELS,), order=7, color="tab:brown")
def gn(size: int, slots: str) -> nn.Module:
    """GroupNorm (Wu & He 2018) with GROUPS groups of channels: no batch statistics."""
    return nn.GroupNorm(GROUPS, size)


# --- the ConvNet (network "cnn") ---

# The ConvNet's layout: channels-last measured faster than NCHW for its convolutions here (the speed benchmark takes
# both side by side); off only to measure that.
CHANNELS_LAST = True
CNN_CHANNELS = (8, 16)  # conv1 and conv2: small enough that a 2-core CPU trains an MNIST epoch in about 15 s


class SmallCNN(Hidden, nn.Module):
    """conv1 (3x3, 8) -> norm -> ReLU -> max pool 2 -> conv2 (3x3, 16) -> norm -> ReLU -> max pool 2 -> fc (10).

    `norm(channels)` is what sits between each convolution and its ReLU, under the study's names bn1 and bn2
    (nn.Identity for the plain network, nn.BatchNorm2d for bn), or between each ReLU and its pooling with
    `placement="after"` (bn-after-relu). Padding 1 keeps each map's size before
    pooling, so a 28x28 image ends as 16 maps of 7x7 (784 features) and a 32x32 one as 16 of 8x8. The
    parameters are kept channels-last, the layout measured fastest for these convolutions on CPU (bnsuite.speed),
    and each batch is put in it; that changes the order of the arithmetic, never what is computed.
    """

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28),
                 norm: Callable[[int], nn.Module] = nn.BatchNorm2d, classes: int = 10, *, placement: str = BEFORE):
        super().__init__()
        channels, height, width = image_shape
        first, second = CNN_CHANNELS
        self.image_shape = tuple(image_shape)
        self.memory_format = torch.channels_last if CHANNELS_LAST else torch.contiguous_format
        self.conv1 = nn.Conv2d(channels, first, 3, padding=1)
        self.bn1 = norm(first)
        self.conv2 = nn.Conv2d(first, second, 3, padding=1)
        self.bn2 = norm(second)
        self.fc = nn.Linear(second * (height // 4) * (width // 4), classes)
        self._set_hidden(placement, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), *self.image_shape).contiguous(memory_format=self.memory_format)
        x = F.max_pool2d(self.activate(self.conv1(x), self.bn1), 2)
        x = F.max_pool2d(self.activate(self.conv2(x), self.bn2), 2)
        return self.fc(x.flatten(1))


# The ConvNet as a network: SmallCNN with the variant's normalization between each convolution and its ReLU, kept
# channels-last. Described in bnsuite.networks.
@network_builder("cnn")
def cnn(norm: Callable[[int], nn.Module], *, image_shape: tuple[int, int, int] = (1, 28, 28), classes: int = 10,
        placement: str = BEFORE) -> nn.Module:
    model = SmallCNN(image_shape, norm, classes, placement=placement)
    return model.to(memory_format=model.memory_format)


def build_model(variant: str, init_scale: float = 1.0, network: str = DEFAULT_NETWORK,
                image_shape: tuple[int, int, int] = (1, 28, 28), classes: int = 10) -> nn.Module:
    """A freshly initialized model of `variant` on `network`: PyTorch's default init, from the global RNG.

    `init_scale` multiplies every Linear and convolution weight after that init (biases and
    batch-norm parameters stay as they are), so the same seed gives the same
    weights up to the factor. `image_shape` (C, H, W) is the dataset's, for the networks that take it (cnn);
    `classes`, its labels' count, for a builder that takes it (every built-in one: a plugin's dataset may have
    other than 10; a builder without it must give the dataset's logits itself, which bnsuite checks).
    """
    model = builder(variant, network)(image_shape=tuple(image_shape), classes=classes)
    if init_scale != 1.0:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    layer.weight.mul_(init_scale)
    return model


def check_outputs(spec: StudySpec) -> None:
    """Every variant of `spec`'s runs, on each network it trains on, built and given two of the dataset's images
    (flattened, as training gives them) before anything trains: its output must be (2, classes), one logit per
    class, or SpecError names the variant, the network and what it gave. torch's random state is left as it was."""
    info = DATASETS[spec.dataset]
    features = math.prod(info.image_shape)
    with torch.random.fork_rng(devices=[]):
        images = torch.rand(2, features)
        for variant, network in dict.fromkeys((run.variant, run.network) for run in spec.run_specs()):
            where = f"the variant {variant!r} on the {network} network"
            try:
                model = build_model(variant, network=network, image_shape=info.image_shape,
                                    classes=info.classes).eval()
                with torch.no_grad():
                    output = model(images)
            except Exception as error:  # noqa: BLE001 - a user's module may raise anything: one line, no traceback
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise SpecError(f"{where} fails on 2 images of {spec.dataset} (given as (2, {features})): "
                                f"{type(error).__name__}: {message}") from None
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            if shape != (2, info.classes):
                raise SpecError(f"{where} gives {shape} for 2 images of {spec.dataset} (given as (2, {features})); "
                                f"it must give (2, {info.classes}): one logit per class")


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def make_optimizer(model: nn.Module, spec: RunSpec, *, fused: bool) -> torch.optim.Optimizer:
    """The optimizer of `spec`'s recipe at its (first epoch's) learning rate: the study's SGD with momentum, or Adam
    (torch's betas), each with the recipe's weight decay; `fused` runs the same update as one kernel per step
    instead of a loop."""
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr_at(1), weight_decay=spec.weight_decay,
                                fused=fused or None)
    return torch.optim.SGD(model.parameters(), lr=spec.lr_at(1), momentum=spec.momentum,
                           weight_decay=spec.weight_decay, fused=fused or None)


class EagerStep:
    """One training step through autograd and torch.optim: the reference the fast step is checked against."""

    NAME = "eager"

    def __init__(self, model: nn.Module, spec: RunSpec):
        self.model = model
        self.spec = spec
        self.optimizer = make_optimizer(model, spec, fused=True)

    def start_epoch(self, epoch: int) -> None:
        """The recipe's learning rate for `epoch` (RunSpec.lr_at), before its first step."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.spec.lr_at(epoch)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same shapes as FastStep with one model: images (1, B, ...), labels (1, B)."""
        logits = self.model(images[0])
        loss = F.cross_entropy(logits, labels[0])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().view(1), logits.detach().unsqueeze(0)
