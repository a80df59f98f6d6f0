"""What bnsuite can run: the registries of model variants and of studies, and the plugins that add to them.

A variant is a name, a description (bnsuite.spec.Variant: data, no torch)
and a function that builds its network; a study is a definition
(`StudyDefinition`: its matrix per profile, claims, report section, title).
The built-ins register through the same calls a user's plugin makes:

    import bnsuite

    @bnsuite.register_variant("batch-rms-after-relu", batch_statistics=True, probe="fc2")
    def batch_rms_after_relu():
        return MyNetwork()

A plugin is a module imported before the study is built: named with
`--bn-plugin MODULE` (and passed on to Ray workers), or found through the
`bnsuite.plugins` entry-point group of an installed package. Registering a
name twice is refused, so a plugin cannot silently replace a built-in.

This module imports no torch: the report, the baseline and the plugin's
option checks read it, and what it holds about a variant is data.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnsuite.core.datasets import BUILTIN_SOURCE, DATASETS, Dataset
from bnsuite.core.described import DescriptionConflict
from bnsuite.core.layout import flat_name
from bnsuite.core.networks import BEFORE, DEFAULT_NETWORK, NETWORKS, SLOT_KINDS, Network
from bnsuite.core.spec import (
    MEASUREMENTS,
    NAME_PATTERN,
    KnownException,
    RunSpec,
    SpecError,
    Study,
    StudySpec,
    Variant,
    study_variants,
)

ENTRY_POINT_GROUP = "bnsuite.plugins"
EVERY_PROFILE = "*"  # the key of a matrix that stands for every profile
ALL_STUDIES = "all"  # --bn-studies all: every registered study, those that run by option included

_VARIANTS: dict[tuple[str, str], Variant] = {}  # (network, name) -> description of a variant built whole
_BUILDERS: dict[tuple[str, str], Callable[..., Any]] = {}
_NORMALIZATIONS: dict[str, Normalization] = {}  # variants that apply to every network whose slots they fit
_NETWORK_BUILDERS: dict[str, Callable[..., Any]] = {}  # network -> the function that builds it around a normalization
_STUDIES: dict[str, StudyDefinition] = {}
_PLUGINS: dict[str, str] = {}  # plugin module -> its provenance, in the order loaded
_PINNED_BY: dict[tuple[str, str, str], str] = {}  # (study, profile key, claim) -> the plugin that pinned it
_MEASURES: dict[str, Measure] = {}  # a user's per-epoch measurements, by name
_DATASET_LOADERS: dict[str, Callable[[], Any]] = {}  # a plugin's dataset name -> the function that gives its arrays
ANY_NETWORK = "any"  # in a study's `networks`: it takes every registered network its variants fit


class PluginError(RuntimeError):
    """A plugin module could not be imported, or registered something it may not; the message says what to do."""


# --- networks ---


def register_network(name: str, *, title: str, slots: str, image_shape: tuple[int, int, int] | None = None,
                     epochs: Mapping[str, int] | None = None, probe: str | None = None,
                     probe_without_norm: str | None = None, placements: tuple[str, ...] = (BEFORE,),
                     dropout: bool = False) -> Callable:
    """Decorator: register the function it decorates as the builder of network `name` (`--bn-network NAME`).

    The function is called as `build(norm, image_shape=(C, H, W), classes=K)` and returns a freshly initialized
    `nn.Module` mapping a batch of images (given flattened, (N, C*H*W)) to K logits, drawing its initialization from
    torch's global generator; `norm(size)` gives the module for one normalization slot of `size` features
    (`slots="features"`: the slot takes (N, size), BatchNorm1d's place) or channels (`slots="channels"`: (N, size,
    H, W), BatchNorm2d's place): `nn.Identity` for the `plain` variant, `nn.BatchNorm1d` for `bn`, and so on for
    every variant registered as a normalization (bnsuite.registry.register_normalization) that fits its slots.
    `image_shape`: the one shape it takes (None: any dataset's); `epochs`: per profile name, the epochs a study's
    runs train on it (a study's own per-network epochs come first; by default the study's); `probe`: the submodule
    whose output is the input to its last hidden nonlinearity (activation probes; a normalization slot), and
    `probe_without_norm` where that signal is in the `plain` variant (by default the same submodule).
    `placements`: where its slots can sit against each hidden layer's nonlinearity, "before" (every network) and
    "after" where its builder also takes `placement="after"` (the placement study's `bn-after-relu`); `dropout`:
    whether its builder takes `dropout=p` and puts dropout of probability p after each hidden nonlinearity (the
    dropout study's variants). bnsuite passes either keyword only to a variant that asks for it.
    """
    def decorator(build: Callable[..., Any]) -> Callable[..., Any]:
        where = f"network {name!r} ({qualified(build)})"
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None or name == ANY_NETWORK:
            raise PluginError(f"network name {name!r} must be letters, digits, '.', '_' or '-', and not "
                              f"{ANY_NETWORK!r} (it names runs and results directories)")
        if slots not in SLOT_KINDS:
            raise PluginError(f"{where}: slots must be one of {', '.join(SLOT_KINDS)}, got {slots!r}")
        shape = None if image_shape is None else tuple(image_shape)
        if shape is not None and (len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape)):
            raise PluginError(f"{where}: image_shape must be (channels, height, width), positive integers, or None, "
                              f"got {image_shape!r}")
        per_profile = dict(epochs or {})
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in per_profile.values()):
            raise PluginError(f"{where}: epochs must map profile names to whole numbers > 0, got {epochs!r}")
        try:
            described = Network(name=name, title=title or name, slots=slots, image_shape=shape,
                                epochs=tuple(per_profile.items()), probe=probe,
                                probe_without_norm=probe_without_norm, builder=qualified(build),
                                source=_source(build.__module__), placements=tuple(placements), dropout=dropout)
            NETWORKS.add(described)
        except (ValueError, TypeError, DescriptionConflict) as error:
            raise PluginError(f"{where}: {error}" if not isinstance(error, DescriptionConflict) else str(error)) \
                from None
        _NETWORK_BUILDERS[name] = build
        return build

    return decorator


def network_builder(name: str) -> Callable:
    """Decorator: the builder of one of bnsuite's own networks, described as data in bnsuite.networks (the report
    reads those without torch); it is called as register_network's builders are."""
    def decorator(build: Callable[..., Any]) -> Callable[..., Any]:
        described = NETWORKS.get(name)
        if described is None or not described.builtin or described.builder != qualified(build):
            raise PluginError(f"{qualified(build)} is not the builder bnsuite.networks describes for {name!r}; a "
                              "network of your own is registered with bnsuite.register_network")
        _NETWORK_BUILDERS[name] = build
        return build

    return decorator


def network(name: str) -> Network:
    """The description of network `name`; SpecError with the choices if none is known."""
    if name not in NETWORKS:
        raise SpecError(f"unknown network {name!r}; choose one of: {', '.join(NETWORKS)} (a network of your own is "
                        "registered by a plugin: --bn-plugin MODULE)")
    return NETWORKS[name]


# --- variants ---


@dataclass(frozen=True)
class Normalization:
    """A variant that is what a network puts in its normalization slots (`make(size, slots)`), registered once for
    every network whose slots it fits (bnsuite.networks.SLOT_KINDS)."""

    name: str
    slots: tuple[str, ...]
    make: Callable[..., Any]
    batch_statistics: bool
    images_per_statistic: int | None
    derives_from: str | None
    order: int
    color: str
    nothing: bool  # the slots hold nothing (nn.Identity): the network without normalization
    source: str
    placement: str = BEFORE  # of PLACEMENTS: where the network puts it against each hidden nonlinearity
    dropout: float = 0.0  # dropout after each hidden nonlinearity (0: none)

    def on(self, network: Network) -> Variant:
        """Its description on `network` (a record carries it as it carries a variant built whole). Where the slots
        hold nothing, or sit after the nonlinearity, the signal that feeds the last nonlinearity does not pass
        through a slot: it is probed where the network says it is without one."""
        away = self.nothing or self.placement != BEFORE
        probe = network.probe_without_norm if away and network.probe_without_norm else network.probe
        return Variant(name=self.name, batch_statistics=self.batch_statistics,
                       images_per_statistic=self.images_per_statistic, derives_from=self.derives_from, probe=probe,
                       order=self.order, color=self.color, builder=qualified(self.make), source=self.source,
                       network=network.name, placement=self.placement, dropout=self.dropout)

    def misfit(self, network: Network) -> str | None:
        """Why it cannot go into `network` (one clause), or None where it can."""
        if network.slots not in self.slots:
            return f"its normalization slots take {network.slots}, and {self.name} normalizes " \
                   f"{' or '.join(self.slots)} only"
        if self.placement not in network.placements:
            return f"{self.name} sits {self.placement} each hidden nonlinearity, and its slots sit " \
                   f"{' or '.join(network.placements)} it only"
        if self.dropout and not network.dropout:
            return f"{self.name} drops out after each hidden nonlinearity, and its builder takes no dropout " \
                   "(register_network(dropout=True) says it does)"
        return None


def register_normalization(name: str, *, batch_statistics: bool, slots: tuple[str, ...] = SLOT_KINDS,
                           images_per_statistic: int | None = None, derives_from: str | None = None,
                           order: int = 100, color: str = "tab:gray", nothing: bool = False,
                           placement: str = BEFORE, dropout: float = 0.0) -> Callable:
    """Decorator: register the function it decorates as variant `name`, a normalization every network whose slots
    it fits is built with (the study's MLP and any network registered with `slots="features"`, the ConvNet and any
    with `slots="channels"`; `slots` says which it fits).

    It is called as `make(size, slots)` for each slot of a network being built, `slots` being that network's kind,
    and returns a fresh `nn.Module` for a slot of `size` features or channels. `nothing`: it puts nothing there
    (the network without normalization: `plain`). `placement`: "after" puts the slots after each hidden
    nonlinearity instead of before it, `dropout`: a probability of dropout after each hidden nonlinearity; either
    goes into the networks that say they take it (register_network's `placements`, `dropout`), and one function
    may be registered under several names with different ones (`bn`, `bn-after-relu`, `bn-dropout`). The other
    arguments are register_variant's.
    """
    def decorator(make: Callable[..., Any]) -> Callable[..., Any]:
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
            raise PluginError(f"variant name {name!r} must be letters, digits, '.', '_' or '-' (it names record files)")
        if not slots or any(kind not in SLOT_KINDS for kind in slots):
            raise PluginError(f"variant {name!r}: slots must be some of {', '.join(SLOT_KINDS)}, got {slots!r}")
        taken = [network for network, known in _VARIANTS if known == name]
        if name in _NORMALIZATIONS or taken:
            raise PluginError(f"variant {name!r} is registered twice ({_registered_by(name)} and {qualified(make)}); "
                              "give the new one another name")
        normalization = Normalization(name, tuple(slots), make, batch_statistics, images_per_statistic, derives_from,
                                      order, color, nothing, _source(make.__module__), placement, dropout)
        try:
            normalization.on(NETWORKS[DEFAULT_NETWORK])  # its settings checked as a variant's, at registration
        except SpecError as error:
            raise PluginError(f"{qualified(make)}: {error}") from None
        _NORMALIZATIONS[name] = normalization
        return make

    return decorator


def _registered_by(name: str) -> str:
    if name in _NORMALIZATIONS:
        return qualified(_NORMALIZATIONS[name].make)
    return next(described.builder for (_, known), described in _VARIANTS.items() if known == name)


def register_variant(name: str, *, batch_statistics: bool, images_per_statistic: int | None = None,
                     derives_from: str | None = None, probe: str | None = None, order: int = 100,
                     color: str = "tab:gray", network: str = DEFAULT_NETWORK) -> Callable:
    """Decorator: register the function it decorates as the builder of variant `name`, a whole network of its own
    on `network` (a variant that is a normalization, for every network with slots for it, registers with
    register_normalization).

    It is called with the dataset's image shape, `image_shape=(C, H, W)`, where it takes that argument (the
    ConvNet's builders do), and with its label count, `classes`, where it takes that; it returns a freshly
    initialized `nn.Module` that maps a batch of the dataset's images (given flattened) to one logit per class,
    drawing its initialization from torch's global generator (the study seeds it). One name may be registered once
    per network (the papers' stacks `ioffe-bn`, `deep-bn` are the MLP's).
    `batch_statistics`: whether it normalizes with its batch's statistics in training (then the
    study keeps every batch at 2 images or more and measures its accuracy with batch statistics);
    `images_per_statistic`: the images a statistic sees when fewer than the batch (a ghost batch);
    `derives_from`: the variant it changes one thing of; `probe`: the submodule whose output is the input to
    the last hidden nonlinearity (activation probes; None: not probed, and the record says so); `order` and
    `color`: its place and colour in tables and figures.
    """
    def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
        if network not in NETWORKS:
            raise PluginError(f"variant {name!r}: unknown network {network!r}; choose one of: {', '.join(NETWORKS)}")
        key = (network, name)
        if key in _VARIANTS or name in _NORMALIZATIONS:
            raise PluginError(f"variant {name!r}{_of(network)} is registered twice "
                              f"({_registered_by(name)} and {qualified(builder)}); give the new one another name")
        description = Variant(name=name, batch_statistics=batch_statistics,
                              images_per_statistic=images_per_statistic, derives_from=derives_from, probe=probe,
                              order=order, color=color, builder=qualified(builder),
                              source=_source(builder.__module__), network=network)
        _VARIANTS[key] = description
        _BUILDERS[key] = builder
        return builder

    return decorator


def _of(network: str) -> str:
    return "" if network == DEFAULT_NETWORK else f" of the {network} network"


def variant(name: str, network: str = DEFAULT_NETWORK) -> Variant:
    """The description of variant `name` on `network`; SpecError with the choices if it has none there."""
    if (network, name) in _VARIANTS:
        return _VARIANTS[(network, name)]
    unfit = _unfit(name, network)
    if unfit is None:
        return _NORMALIZATIONS[name].on(NETWORKS[network])
    hint = f" ({PLUGIN_HINT})" if name not in _NORMALIZATIONS else ""
    raise SpecError(f"{unfit}; choose one of: {', '.join(variant_names(network))}{hint}")


PLUGIN_HINT = "a variant of your own is registered by a plugin: --bn-plugin MODULE"


def _unfit(name: str, network: str) -> str | None:
    """Why variant `name` cannot be built on `network` (one line without the choices), or None where it can."""
    if (network, name) in _VARIANTS:
        return None
    described, normalization = NETWORKS.get(network), _NORMALIZATIONS.get(name)
    if described is None or normalization is None:
        return f"unknown variant {name!r}{_of(network)}"
    misfit = normalization.misfit(described)
    return None if misfit is None else f"variant {name!r} cannot go into the {described.title} ({network}): {misfit}"


def variant_names(network: str | None = None) -> tuple[str, ...]:
    """The variants of `network` (None: of any network), each name once: those that are normalizations and fit its
    slots first, then those built whole, each in registration order."""
    described = NETWORKS.get(network) if network is not None else None
    fitting = [name for name, normalization in _NORMALIZATIONS.items()
               if network is None or described is not None and normalization.misfit(described) is None]
    return tuple(dict.fromkeys([*fitting, *(name for (net, name) in _VARIANTS if network is None or net == network)]))


def builder(name: str, network: str = DEFAULT_NETWORK) -> Callable[..., Any]:
    """What builds variant `name` on `network`: a function of the dataset's `image_shape` and `classes` that returns
    a fresh model (SpecError where it cannot be built here, saying why)."""
    variant(name, network)
    if (network, name) in _BUILDERS:
        whole = _BUILDERS[(network, name)]

        def build_whole(image_shape: tuple[int, int, int], classes: int) -> Any:
            arguments = {"image_shape": tuple(image_shape)} if _takes(whole, "image_shape") else {}
            return whole(**arguments, **({"classes": classes} if _takes(whole, "classes") else {}))

        return build_whole
    build = _NETWORK_BUILDERS.get(network)
    if build is None:
        raise SpecError(f"the network {network!r} is known here only from records ({NETWORKS[network].source}); "
                        "install or --bn-plugin the package that registers it to train it")
    normalization, slots = _NORMALIZATIONS[name], NETWORKS[network].slots
    make = normalization.make
    # placement and dropout only where the variant asks for them: a network that takes neither need not know them
    extra = {"placement": normalization.placement} if normalization.placement != BEFORE else {}
    extra.update({"dropout": normalization.dropout} if normalization.dropout else {})
    return lambda image_shape, classes: build(lambda size: make(size, slots), image_shape=tuple(image_shape),
                                              classes=classes, **extra)


@functools.cache
def _takes(function: Callable, name: str) -> bool:
    """Whether `function` takes a keyword argument `name` (by name, or through **kwargs)."""
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD for p in parameters)


def checked(spec: RunSpec) -> Variant:
    """The description of `spec`'s variant, once it is known that the variant can train `spec` (SpecError if
    not, saying what to change)."""
    description = variant(spec.variant, spec.network)
    description.check(spec)
    return description


# --- measures ---


@dataclass(frozen=True)
class Measure:
    """A per-epoch measurement of a user's: `function(model, data) -> float` at every epoch end of the runs of a
    study that asks for it by `name` (Study.measures), recorded in each epoch's `measured` (bnsuite.records)."""

    name: str
    title: str
    function: Callable[..., float]
    source: str


def register_measure(name: str, *, title: str) -> Callable:
    """Decorator: register the function it decorates as the per-epoch measure `name`.

    At every epoch end of a run whose study asks for `name` (`Study(..., measures=(name,))`) it is called as
    `function(model, data)`: `model`, a copy of the run's model in eval mode at that epoch end (change it as you
    like), and `data` (bnsuite.train.MeasureData: the run's training and held-out images and labels, its spec). It
    returns a finite number, recorded as `epoch.measure(name)`; a claim reads it with
    `bnsuite.claims.measured(name)`. The records keep the values by name, so they report without the plugin.
    """
    def decorator(function: Callable[..., float]) -> Callable[..., float]:
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
            raise PluginError(f"measure name {name!r} must be letters, digits, '.', '_' or '-'")
        if name in MEASUREMENTS:
            raise PluginError(f"measure {name!r} is one of bnsuite's own ({', '.join(MEASUREMENTS)}); give yours "
                              "another name")
        if name in _MEASURES:
            raise PluginError(f"measure {name!r} is registered twice ({qualified(_MEASURES[name].function)} and "
                              f"{qualified(function)}); give the new one another name")
        _MEASURES[name] = Measure(name, title, function, _source(function.__module__))
        return function

    return decorator


def measure_definition(name: str) -> Measure | None:
    """The registered measure `name` (None if no plugin of this process registered it)."""
    return _MEASURES.get(name)


def check_measures(spec: StudySpec) -> None:
    """Refuse, before anything trains, a study asking for a measure that is neither bnsuite's nor registered."""
    known = (*MEASUREMENTS, *_MEASURES)
    for study in spec.studies:
        unknown = [name for name in study.measures if name not in known]
        if unknown:
            raise SpecError(f"the {study.name} study asks to measure {', '.join(map(repr, unknown))}; what a study "
                            f"can measure: {', '.join(known)} (a measure of your own is registered by a plugin with "
                            "bnsuite.register_measure)")


# --- datasets ---


def register_dataset(name: str, *, train_images: int, image_shape: tuple[int, int, int] = (1, 28, 28),
                     classes: int = 10, title: str = "", validation_images: int | None = None,
                     normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = ((0.5,), (0.5,)),
                     networks: tuple[str, ...] | None = None) -> Callable:
    """Decorator: register the function it decorates as the loader of dataset `name` (`--bn-dataset NAME`).

    The function takes no argument and returns four arrays (numpy or torch): training images, training labels,
    test images, test labels. Images are (N, C, H, W) of `image_shape` ((N, H, W) for one channel), uint8 (scaled
    to [0, 1] and normalized per channel with `normalization`'s (mean, std), by default to [-1, 1] as the study's
    MNIST) or float32 (taken as they are: give `normalization=None`); labels are integers 0 .. `classes` - 1. It
    is called once per process, where a run of the dataset first needs it, and what it gives is checked against
    this description (`train_images` of them for training) and fingerprinted (the MD5 of the arrays, in every
    record, as MNIST's file checksums are). A profile holds out `validation_images` of the training images for
    validation (by default a sixth, at most the 10,000 the profiles ask of MNIST). `networks`: those that can
    train on it (by default the study's MLP and the ConvNet for 28x28 grey images, the ConvNet otherwise).
    """
    def decorator(loader: Callable[[], Any]) -> Callable[[], Any]:
        where = f"dataset {name!r} ({qualified(loader)})"
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
            raise PluginError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-' (it names results "
                              "directories)")
        shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else ()
        if len(shape) != 3 or not all(isinstance(size, int) and size > 0 for size in shape):
            raise PluginError(f"{where}: image_shape must be (channels, height, width), positive integers, got "
                              f"{image_shape!r}")
        for value, what, least in ((train_images, "train_images", 2), (classes, "classes", 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise PluginError(f"{where}: {what} must be an integer of at least {least}, got {value!r}")
        held_out = min(10_000, train_images // 6) if validation_images is None else validation_images
        if not isinstance(held_out, int) or not 0 < held_out < train_images:
            raise PluginError(f"{where}: validation_images must be an integer between 1 and {train_images - 1}, "
                              f"got {validation_images!r}")
        if normalization is not None and (len(normalization) != 2 or not all(
                len(values) == shape[0] for values in normalization)):
            raise PluginError(f"{where}: normalization must be ((mean, ...), (std, ...)) with one value per channel "
                              f"({shape[0]}), or None for float images, got {normalization!r}")
        own = [name for name, described in NETWORKS.items() if described.builtin]
        able = networks if networks is not None else (
            (*own,) if shape == (1, 28, 28) else tuple(n for n in own if n != DEFAULT_NETWORK))
        unknown = [network for network in able if network not in own]
        if unknown or not able:
            raise PluginError(f"{where}: networks must be some of bnsuite's {', '.join(own)}, got {networks!r} (a "
                              "plugin's network says which images it takes: register_network's image_shape)")
        described = Dataset(name=name, title=title or name, image_shape=shape, classes=classes,
                            train_images=train_images, validation_images=held_out, networks=tuple(able),
                            normalization=None if normalization is None else tuple(
                                tuple(float(v) for v in values) for values in normalization),
                            source=_source(loader.__module__))
        try:
            DATASETS.add(described)
        except DescriptionConflict as error:
            raise PluginError(str(error)) from None
        _DATASET_LOADERS[name] = loader
        return loader

    return decorator


def dataset_loader(name: str) -> Callable[[], Any] | None:
    """The function a plugin registered for dataset `name` (None for bnsuite's own and for a name known here only
    from records)."""
    return _DATASET_LOADERS.get(name)


# --- studies ---


@dataclass(frozen=True)
class SectionContext:
    """What a study's report section is given: its study, its records and every claim of the section judged. For
    runs made outside a study, the report gives the batch-size study's section `spec` and `study` None and no
    claims."""

    spec: StudySpec | None
    study: Study | None
    records: list  # the RunRecords of this study
    claims: list  # every ClaimResult of the section (a section shows its own, `claims.study == study.name`)
    out: Path  # the report file; figures go beside it
    prefix: str  # prefix of figure file names, when several protocols share one report
    with_plots: bool
    h: str  # the markdown heading prefix of the section's subsections

    @property
    def own_claims(self) -> list:
        return [claim for claim in self.claims if claim.study == self.study.name]


@dataclass(frozen=True)
class StudyDefinition:
    """Everything that is one study's: its matrix per profile, its known exceptions, its claims, its report
    section, its title, and which `--bn-*` options reach it.

    `claims(spec, study)` returns the study's `bnsuite.claims.Claim`s for a StudySpec and a study on one network
    (bnsuite.claims.study_claims calls it network by network); `section(context)` the markdown lines of its report
    section on one network (None: the report shows its claims only). `options` names the matrix
    options that change it: `variants`, `batch-sizes`, `lr` (its single learning rate) and `epochs`. `networks`:
    the networks it can train on (`--bn-network` reaches it where it names one of them).
    `discusses`: its section carries the discussion of every claim of the study run (the batch-size study's
    does); with no such study, the report gives the discussion a section of its own.
    """

    name: str
    title: str
    # profile -> the study's matrix in it (EVERY_PROFILE: in any profile); a profile without one leaves it out
    matrices: Mapping[str, Study]
    claims: Callable[[StudySpec, Study], list]
    section: Callable[[SectionContext], list[str]] | None = None
    known_exceptions: Mapping[str, tuple[KnownException, ...]] = field(default_factory=dict)
    options: frozenset[str] = frozenset({"epochs", "lr"})
    default: bool = True  # runs when --bn-studies does not name the studies
    discusses: bool = False
    source: str = BUILTIN_SOURCE
    networks: tuple[str, ...] = (DEFAULT_NETWORK,)

    def matrix(self, profile: str) -> Study | None:
        return self.matrices.get(profile, self.matrices.get(EVERY_PROFILE))

    @property
    def own_networks(self) -> tuple[str, ...]:
        """The networks it names (those it trains when --bn-network does not say), without ANY_NETWORK."""
        return tuple(name for name in self.networks if name != ANY_NETWORK)

    def takes(self, network: str) -> bool:
        """Whether it trains on `network`: one it names, or, where it names ANY_NETWORK, any registered one that
        every variant of its matrices goes into (the placement study's `bn-after-relu` needs a network whose slots
        can sit after the nonlinearity)."""
        return network in self.own_networks or (ANY_NETWORK in self.networks and network in NETWORKS
                                                 and self.misfit(network) is None)

    def misfit(self, network: str) -> str | None:
        """Why a variant of its matrices cannot go into `network` (one line), or None where every one can."""
        return next((unfit for matrix in self.matrices.values() for name in matrix.variants
                     if (unfit := _unfit(name, network)) is not None), None)


STUDY_OPTIONS = frozenset({"variants", "batch-sizes", "lr", "epochs"})


def register_study(name: str, *, title: str, matrices: Study | Mapping[str, Study],
                   section: Callable[[SectionContext], list[str]] | None = None,
                   known_exceptions: Mapping[str, tuple[KnownException, ...]] | None = None,
                   options: set[str] | frozenset[str] = frozenset({"epochs", "lr"}), default: bool = True,
                   discusses: bool = False, networks: tuple[str, ...] = (DEFAULT_NETWORK,)) -> Callable:
    """Decorator: register the function it decorates as study `name`'s claims builder, `claims(spec, study)`.

    `matrices`: the study's matrix (a bnsuite.spec.Study named `name`) for every profile, or one per profile
    name (a profile without one leaves the study out); `known_exceptions`: per profile, the claims the
    measurements do not support and the verdict they give (bnsuite.spec.KnownException), keyed by the profile's
    name for its own dataset (MNIST) and by `profile:dataset` (`full:fashion-mnist`) for another; `networks`: the
    networks it can train on, the first its default (a ConvNet claim's name starts with `cnn-`), ending with
    ANY_NETWORK (`"any"`) where it takes every registered network its variants fit (a plugin's too). Studies run
    and are reported in the order they are registered: the built-ins first (bnsuite.studies), then plugins'.
    """
    def decorator(claims: Callable[[StudySpec, Study], list]) -> Callable:
        if name in _STUDIES:
            raise PluginError(f"study {name!r} is registered twice; give the new one another name")
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
            raise PluginError(f"study name {name!r} must be letters, digits, '.', '_' or '-'")
        if name == ALL_STUDIES:
            raise PluginError(f"study name {name!r} is taken: --bn-studies {name} means every study; choose another")
        by_profile = {EVERY_PROFILE: matrices} if isinstance(matrices, Study) else dict(matrices)
        wrong = [profile for profile, study in by_profile.items() if study.name != name]
        if wrong:
            raise PluginError(f"study {name!r}: its matrix for {', '.join(wrong)} is named otherwise; name each "
                              f"Study {name!r}")
        if not networks or networks[0] == ANY_NETWORK or any(
                network not in NETWORKS and network != ANY_NETWORK for network in networks):
            raise PluginError(f"study {name!r}: networks {networks!r} must name some of {', '.join(NETWORKS)}, the "
                              f"first its default, and may end with {ANY_NETWORK!r} (any registered network)")
        _check_exception_keys(name, known_exceptions or {})
        unknown = set(options) - STUDY_OPTIONS
        if unknown:
            raise PluginError(f"study {name!r}: unknown options {sorted(unknown)}; choose from "
                              f"{sorted(STUDY_OPTIONS)}")
        _STUDIES[name] = StudyDefinition(
            name=name, title=title, matrices=by_profile, claims=claims, section=section,
            known_exceptions=dict(known_exceptions or {}), options=frozenset(options), default=default,
            discusses=discusses, source=_source(claims.__module__), networks=tuple(networks))
        return claims

    return decorator


def _check_exception_keys(study: str, known_exceptions: Mapping[str, Any]) -> None:
    wrong_keys = [key for key in known_exceptions if key.partition(":")[1] and key.partition(":")[2] not in DATASETS]
    if wrong_keys:
        raise PluginError(f"study {study!r}: known exceptions under {', '.join(map(repr, wrong_keys))} name no "
                          f"dataset; key them by a profile ('full') or a profile and dataset "
                          f"('full:{next(iter(DATASETS))}'), the datasets being {', '.join(DATASETS)}")


def register_known_exceptions(study: str, profile: str, *exceptions: KnownException) -> None:
    """Pin `exceptions` (bnsuite.spec.KnownException) for study `study`'s claims under `profile` (or
    `profile:dataset`), from a plugin: how a plugin's variant that a built-in study compares with BN (its automatic
    claims `VARIANT-accuracy-at-least-bn-bs64`, ...) keeps the claims gate usable where it does not hold. The
    gate then treats them as the study's own: an expected failure while the verdict stays the pinned one.
    Refused, with both owners named, for a claim the study already pins under that key."""
    definition = _STUDIES.get(study)
    module = sys._getframe(1).f_globals.get("__name__", "?")  # the plugin that pins them, for the messages
    if definition is None:
        raise PluginError(f"{module}: cannot pin known exceptions for study {study!r}: it is not registered (yet); "
                          f"the studies: {', '.join(_STUDIES)} (a plugin's study is registered when its module is "
                          "imported: load that plugin first)")
    _check_exception_keys(study, {profile: exceptions})
    pinned = {exception.claim for exception in definition.known_exceptions.get(profile, ())}
    again = [exception.claim for exception in exceptions if exception.claim in pinned]
    if again:
        owner = _PINNED_BY.get((study, profile, again[0]), definition.source)
        raise PluginError(f"{module}: the claim {again[0]!r} already has a known exception in study {study!r} under "
                          f"{profile!r} (pinned by {owner}); a claim has one pinned verdict")
    _PINNED_BY.update({(study, profile, exception.claim): _source(module) for exception in exceptions})
    merged = {**definition.known_exceptions,
              profile: (*definition.known_exceptions.get(profile, ()), *exceptions)}
    _STUDIES[study] = dataclasses.replace(definition, known_exceptions=merged)


def study_definition(name: str) -> StudyDefinition | None:
    """The registered definition of study `name`; None where its plugin is not loaded in this process."""
    return _STUDIES.get(name)


def studies() -> tuple[StudyDefinition, ...]:
    """Every registered study, in run order."""
    return tuple(_STUDIES.values())


def study_spec(**fields) -> StudySpec:
    """A StudySpec whose variant descriptions come from the registry, one for every variant its studies train on
    each network they train it on, with the description of every plugin's network among those."""
    fields = {name: value for name, value in fields.items() if name not in ("variants", "networks")}  # derived here
    pairs = dict.fromkeys(pair for study in fields["studies"] for pair in study_variants(study))
    trained = dict.fromkeys(network for study in fields["studies"] for network in study.networks)
    return StudySpec(**fields, variants=tuple(variant(name, net) for net, name in pairs),
                     networks=tuple(network(name) for name in trained if not network(name).builtin))



# --- plugins ---


def load_plugins(modules: tuple[str, ...] | list[str] = (), *, entry_points: bool = True,
                 on_broken_entry_point: Callable[[PluginError], None] | None = None) -> tuple[str, ...]:
    """Import the plugins: every module of the `bnsuite.plugins` entry-point group of the installed packages
    (if `entry_points`), then `modules`. Each is imported once; returns every plugin module loaded so far.

    A plugin that fails to import, whatever it raises, is one PluginError naming the module, the file and line
    where it failed and what to do. An entry-point plugin nobody named in `modules` goes to
    `on_broken_entry_point` instead, where given, and the others load: an installed package's broken plugin must
    not stop what does not use it (a pytest run of another project, a report of records that do not need it).
    """
    declared: dict[str, str] = {}
    if entry_points:
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            declared.setdefault(entry.value.partition(":")[0], getattr(entry.dist, "name", None) or entry.name)
    names = list(declared) + [name for name in modules if name not in declared]
    for name in names:
        if name in _PLUGINS:
            continue
        if name.endswith(".py") or "/" in name or "\\" in name:
            raise PluginError(f"the plugin {name!r} is a file path; name the module instead "
                              f"({Path(name).stem!r}), with its directory on the Python path (PYTHONPATH) or as the "
                              "directory pytest runs from")
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - a plugin may raise anything at import; each is one message
            problem = PluginError(_import_failure(name, error, declared.get(name)))
            if name in declared and name not in modules and on_broken_entry_point is not None:
                on_broken_entry_point(problem)
                continue
            raise problem from None
        _PLUGINS[name] = _source(name)
    return tuple(_PLUGINS)


def _import_failure(name: str, error: BaseException, package: str | None) -> str:
    """One line for a plugin module that did not import: where it failed, why, and what to do."""
    if isinstance(error, ModuleNotFoundError) and error.name is not None and name.startswith(error.name):
        return (f"cannot import the plugin module {name!r} ({error}); check its name, and that its directory is on "
                "the Python path (PYTHONPATH) or its package is installed")
    where = where_raised(name, error)
    message = str(error).strip().splitlines()[0] if str(error).strip() else "(no message)"
    declared = (f"; it is declared in the {ENTRY_POINT_GROUP} entry points of the installed package {package!r}: "
                "fix it there, or uninstall that package") if package else "; fix it there"
    return f"the plugin module {name!r} raised {type(error).__name__} at import{where}: {message}{declared}"


def where_raised(name: str, error: BaseException) -> str:
    """`, at FILE line N`: the last place in the files of the plugin module `name` that `error` went through (its
    import, or a function of it called later; the file a syntax error is in), or nothing where none is known."""
    if isinstance(error, SyntaxError) and error.filename:
        return f", at {error.filename} line {error.lineno}"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    home = origin.parent if origin is not None else None
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if home is not None and Path(frame.filename).resolve().is_relative_to(home)]
    frame = (own or [None])[-1]
    return f", at {frame.filename} line {frame.lineno}" if frame is not None else ""


def plugin_option(text: str | None) -> list[str]:
    """The module names of a `MODULE[,MODULE]` option (--bn-plugin, the report's --plugin)."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def qualified(function: Callable) -> str:
    """`module:name` of a function, bnsuite's own by the module's flat name (`bnsuite.models:bn`, bnsuite.layout):
    what records name a builder by, whichever folder holds it."""
    return f"{flat_name(function.__module__)}:{getattr(function, '__qualname__', repr(function))}"


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _source(module: str) -> str:
    """Where a registration came from: bnsuite itself, or a plugin module with its package's version (when
    installed) or the SHA-256 of its file."""
    if module == BUILTIN_SOURCE or module.startswith(BUILTIN_SOURCE + "."):
        return BUILTIN_SOURCE
    top = module.partition(".")[0]
    distributions = _distributions().get(top, [])
    if distributions:
        return f"{module} {distributions[0]} {importlib.metadata.version(distributions[0])}"
    path = getattr(sys.modules.get(module), "__file__", None)
    if path and Path(path).is_file():
        return f"{module} sha256:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"
    return module
