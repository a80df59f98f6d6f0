"""The networks bnsuite can train, as data: names, titles, the images they take, their normalization slots, their
epochs and probe points, without importing torch.

A network is a description (`Network`) and a builder that takes the
normalization to put in each of its slots (bnsuite.registry.register_network;
bnsuite's two builders are in bnsuite.models). A variant registered as a
normalization (`plain`, `bn`, `ln`, ghost BN, ...) applies to every network
whose slots it fits, so a user's network trains the study's `plain` and `bn`
as the MLP does. Specs and records name a network and are checked against this
table; a record of a plugin's network carries its description
(StudySpec.networks), so it loads where the plugin is not installed, as a
plugin dataset's does (bnsuite.described).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ConfigDict, with_config

from bnsuite.core.datasets import BUILTIN_SOURCE, Dataset
from bnsuite.core.described import Descriptions

# What a network's normalization slots take: FEATURES, a (N, C) batch (BatchNorm1d's place); CHANNELS, a
# (N, C, H, W) feature map (BatchNorm2d's place).
FEATURES, CHANNELS = "features", "channels"
SLOT_KINDS = (FEATURES, CHANNELS)
# Where a slot sits against its hidden layer's nonlinearity: BEFORE it (Ioffe & Szegedy's place, every network's),
# or AFTER it (the placement study's `bn-after-relu`), for a network whose builder takes `placement=AFTER`.
BEFORE, AFTER = "before", "after"
PLACEMENTS = (BEFORE, AFTER)


@with_config(ConfigDict(strict=True, allow_inf_nan=False, extra="forbid"))  # bnsuite.spec.STRICT, which imports this
@dataclass(frozen=True)
class Network:
    """A network as data: what specs, studies, probes and the report need of it, never its modules."""

    name: str
    title: str  # as prose names it: "on the ConvNet"
    slots: str  # of SLOT_KINDS: what its normalization slots take
    # The one image shape (C, H, W) it takes; None: any.
    image_shape: tuple[int, int, int] | None = None
    # (profile, epochs) where a study's runs on it train other epochs than the study's own (a study's
    # `network_epochs` come first); empty: the study's.
    epochs: tuple[tuple[str, int], ...] = ()
    # The submodule whose output is the input to its last hidden nonlinearity (bnsuite.probe), and where that
    # signal is when the slots hold nothing (the `plain` variant's probe); None: not probed.
    probe: str | None = None
    probe_without_norm: str | None = None
    builder: str = ""  # the function that builds it around a normalization, as module:name
    source: str = BUILTIN_SOURCE  # bnsuite, or the plugin module that registered it with its version or file hash
    # Where its slots can sit (of PLACEMENTS; BEFORE first), and whether its builder puts dropout after each hidden
    # nonlinearity when given `dropout=p`: what the placement and dropout variants need of a network.
    placements: tuple[str, ...] = (BEFORE,)
    dropout: bool = False

    def __post_init__(self) -> None:
        if self.slots not in SLOT_KINDS:
            raise ValueError(f"network {self.name!r}: slots must be one of {', '.join(SLOT_KINDS)}, got "
                             f"{self.slots!r}")
        if not self.placements or self.placements[0] != BEFORE or not set(self.placements) <= set(PLACEMENTS):
            raise ValueError(f"network {self.name!r}: placements must be {BEFORE!r}, then {AFTER!r} where its slots "
                             f"can sit after the nonlinearity too, got {self.placements!r}")

    @property
    def builtin(self) -> bool:
        return self.source == BUILTIN_SOURCE

    def takes(self, dataset: Dataset) -> bool:
        """Whether it trains on `dataset`: where the images have the shape it takes, and, on a plugin's dataset,
        where that dataset lets it (a plugin's dataset names which of bnsuite's networks may train on it)."""
        if self.image_shape is not None and tuple(self.image_shape) != tuple(dataset.image_shape):
            return False
        return dataset.builtin or not self.builtin or self.name in dataset.networks

    def epochs_in(self, profile: str) -> int | None:
        """The epochs its runs train under `profile` where it says (None: the study's)."""
        return dict(self.epochs).get(profile)

    def conflict(self, other: Network) -> str | None:
        """What `other`, a description of the same name, says differently about what a run depends on, or None."""
        keys = ("slots", "image_shape", "epochs", "probe", "probe_without_norm", "builder", "placements", "dropout")
        differ = [key for key in keys if getattr(self, key) != getattr(other, key)]
        return ", ".join(f"{key} {getattr(self, key)} against {getattr(other, key)}" for key in differ) or None


DEFAULT_NETWORK = "mlp"
NETWORKS: Descriptions = Descriptions("network", "another network", {
    # The study's MLP (784-256-128-10, bnsuite.models.SimpleNNWithBN), a normalization before each hidden ReLU.
    "mlp": Network(name="mlp", title="study's MLP", slots=FEATURES, image_shape=(1, 28, 28), probe="bn2",
                   probe_without_norm="fc2", builder="bnsuite.models:mlp", placements=PLACEMENTS, dropout=True),
    # A small ConvNet (bnsuite.models.SmallCNN), a normalization between each convolution and its ReLU (or after
    # it). No dropout: ConvNets of this kind leave it out (BN is what they use instead), so the dropout study asks
    # its question of the MLP. Not probed: bnsuite.probe measures (N, features) activations, not feature maps.
    "cnn": Network(name="cnn", title="ConvNet", slots=CHANNELS, builder="bnsuite.models:cnn", placements=PLACEMENTS),
})


def title(network: str) -> str:
    """How prose names `network` ("study's MLP", "ConvNet"); its name where no description is known."""
    known = NETWORKS.get(network)
    return known.title if known is not None else network
