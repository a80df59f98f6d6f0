"""What a run is (RunSpec) and what a study asks for (StudySpec, ClaimSettings), checked when made.

The defaults are the study's (SGD lr 0.01, momentum 0.9, 10 epochs, batch 64,
MNIST). A spec that cannot run (unknown variant, batch size 0, lr of nan...)
is refused at construction with a message saying what to change, so a long
study never fails half-way on a value it could have rejected at the start.

Every record carries its RunSpec and the StudySpec it was made under, so the
report and the claims read what a study asked for from the records alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass

from pydantic import ConfigDict, with_config

from bnsuite.core.datasets import DATASETS, training_images
from bnsuite.core.networks import BEFORE, DEFAULT_NETWORK, NETWORKS, PLACEMENTS, Network

DEFAULT_LR = 0.01  # the study's SGD learning rate
# The training recipe beyond the learning rate: the study's is SGD with momentum 0.9, no weight decay, a constant
# learning rate; a run may take Adam (torch's betas), weight decay, and a cosine schedule over its epochs.
DEFAULT_MOMENTUM = 0.9
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
STUDY_RECIPE = ("sgd", DEFAULT_MOMENTUM, 0.0, "constant")  # RunSpec.recipe of the study's runs
# The recipe's fields added after schema 11, at the values every earlier run had: left out of a run's fingerprint
# where they have them, so its file name never changes.
RECIPE_DEFAULTS = {"optimizer": "sgd", "weight_decay": 0.0, "lr_schedule": "constant"}
PIPELINES = ("fast", "eager", "original")
# What a study can ask its runs to measure beyond what every run records: costly, so measured only where asked.
# landscape: gradient ICS and loss-landscape smoothness along training (bnsuite.landscape); signal: the hidden
# signal's scale against depth at initialization (bnsuite.signal); precise: held-out accuracy at every epoch end
# with precise population statistics in place of the running estimates (bnsuite.precise).
MEASUREMENTS = ("landscape", "signal", "precise")
SIGNAL_IMAGES = 1024  # the batch the signal is measured on: the run's first training images
PRECISE_IMAGES = 10_000  # training images precise statistics are taken over (Wu & Johnson: about 10^4 suffice)


def is_precise_checkpoint(epoch: int, epochs: int) -> bool:
    """Whether precise statistics are measured at the end of `epoch` of `epochs`: at epochs 1, 2, 4, 8, ... and the
    last (a few checkpoints, early ones close together, where the running estimates lag most)."""
    return epoch == epochs or epoch & (epoch - 1) == 0
SUPPORTED, CONTRADICTED, NOT_SHOWN = "supported", "contradicted", "not shown"
# A known exception's verdict for a claim whose verdict, under its profile, depends on which seeds it sees (or on
# which CPU's rounding trains them): supported by some and not shown by others (never contradicted).
UNSETTLED = "unsettled"
# A known exception's verdict for a claim never supported under its profile, whose measured direction moves with
# the CPU's rounding: not shown on some machines, contradicted on others.
NOT_SUPPORTED = "not supported"
VERDICTS = (SUPPORTED, CONTRADICTED, NOT_SHOWN)
# How records are read back (bnsuite.records): types exact, no NaN or infinity, no unknown field.
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


class SpecError(ValueError):
    """A run specification has a value that cannot run; the message says which and why."""


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # variant and study names: they go into file names


@with_config(STRICT)
@dataclass(frozen=True)
class Variant:
    """A model variant as data: everything the report, the baseline and Ray workers need, without building it.

    The registry (bnsuite.registry) holds one per variant name with the
    function that builds it; specs name a variant, and every record carries
    the description of its own, so a record of a variant whose plugin is not
    importable still loads and reports.
    """

    name: str
    batch_statistics: bool  # normalizes with its batch's statistics in training (running estimates at inference)
    # Images per batch statistic when fewer than the batch (a ghost batch); None: the whole batch, or no batch
    # statistics at all.
    images_per_statistic: int | None = None
    derives_from: str | None = None  # the variant it changes one thing of (bn-dropout: bn), for tables and figures
    # The submodule whose output is the input to the last hidden nonlinearity (bnsuite.probe); None: not probed.
    probe: str | None = None
    order: int = 100  # place in tables and figures (ties by name)
    color: str = "tab:gray"  # in figures (a matplotlib colour)
    # The function that builds it, as module:name: the whole network, or, for a variant registered as a
    # normalization (bnsuite.registry.register_normalization), what the network puts in each of its slots.
    builder: str = ""
    source: str = "bnsuite"  # bnsuite, or the plugin module that registered it with its version or file hash
    network: str = DEFAULT_NETWORK  # of NETWORKS: the network this description builds
    # For a normalization: where the network puts it (of PLACEMENTS, against each hidden nonlinearity), and the
    # dropout probability after each hidden nonlinearity (0: none). A variant built whole says nothing here.
    placement: str = BEFORE
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(self.placement in PLACEMENTS, f"variant {self.name}: placement must be one of "
                 f"{', '.join(PLACEMENTS)}, got {self.placement!r}")
        _require(0 <= self.dropout < 1, f"variant {self.name}: dropout must be a probability in [0, 1), got "
                 f"{self.dropout!r}")
        _require(isinstance(self.name, str) and NAME_PATTERN.fullmatch(self.name) is not None,
                 f"variant name {self.name!r} must be letters, digits, '.', '_' or '-' (it names record files)")
        _require(self.network in NETWORKS, f"variant {self.name}: unknown network {self.network!r}; choose one of: "
                 f"{', '.join(NETWORKS)}")
        if self.images_per_statistic is not None:
            _require_int(self.images_per_statistic, f"images per statistic of {self.name}", minimum=2)
            _require(self.batch_statistics, f"variant {self.name} has images per statistic but no batch statistics")

    def check(self, spec: RunSpec) -> None:
        """Refuse a run this variant cannot train, with what to change."""
        _require(spec.variant == self.name and spec.network == self.network,
                 f"run {spec.case_id} is not of variant {self.name} on the {self.network} network")
        if self.batch_statistics:
            _require(
                spec.batch_size > 1 and spec.train_size % spec.batch_size != 1,
                f"batch size {spec.batch_size} leaves a batch of a single image ({spec.train_size} training images), "
                f"and {self.name} normalizes with batch statistics, which need at least 2 per batch; choose another "
                "batch size or train subset",
            )
        ghost = self.images_per_statistic
        if ghost is not None:
            _require(spec.batch_size % ghost == 0,
                     f"batch size {spec.batch_size} does not split into ghost batches of {ghost} ({self.name}); "
                     f"use a batch size that is a multiple of {ghost}")


@with_config(STRICT)
@dataclass(frozen=True)
class RunSpec:
    dataset: str = "mnist"
    variant: str = "bn"
    batch_size: int = 64
    lr: float = DEFAULT_LR
    momentum: float = DEFAULT_MOMENTUM
    epochs: int = 10
    seed: int = 0
    # Every Linear weight of PyTorch's default init multiplied by this after initialization
    # (biases and batch-norm parameters unchanged): the init study's knob.
    init_scale: float = 1.0
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    validation_size: int = 10_000  # 0: the seed protocol, all 60,000 images train
    train_subset: int | None = None  # first N training images, for quick runs
    # fast: tensor batches, hand-written backward (bnsuite.fastpath) where the variant has one;
    # eager: tensor batches, autograd + torch.optim; original: torchvision Dataset + DataLoader.
    pipeline: str = "fast"
    network: str = DEFAULT_NETWORK  # of NETWORKS; the variant is built for this network
    # The recipe (RunSpec.recipe): of OPTIMIZERS (momentum is SGD's; Adam takes torch's betas), torch's L2 weight
    # decay, and the learning rate over the epochs (lr_at).
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        _require(self.network in NETWORKS, f"unknown network {self.network!r}; choose one of: {', '.join(NETWORKS)}")
        _require(NETWORKS[self.network].takes(DATASETS[self.dataset]),
                 f"the {self.network} network cannot train on {self.dataset} (its images are "
                 f"{'x'.join(map(str, DATASETS[self.dataset].image_shape))}); train it with --bn-network "
                 f"{', '.join(name for name, net in NETWORKS.items() if net.takes(DATASETS[self.dataset]))}")
        _require(isinstance(self.variant, str) and NAME_PATTERN.fullmatch(self.variant) is not None,
                 f"variant name {self.variant!r} must be letters, digits, '.', '_' or '-'")
        _require(self.pipeline in PIPELINES,
                 f"unknown pipeline {self.pipeline!r}; choose one of: {', '.join(PIPELINES)}")
        _require(_is_device_name(self.device), f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        _require_int(self.batch_size, "batch size", minimum=1)
        _require_int(self.epochs, "epochs", minimum=1)
        _require_int(self.seed, "seed", minimum=0)
        _require_int(self.validation_size, "validation size", minimum=0)
        images = training_images(self.dataset)
        _require(self.validation_size < images,
                 f"validation size {self.validation_size} leaves no training images; use less than {images}")
        _require(
            isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
            f"learning rate must be a finite number > 0, got {self.lr!r}",
        )
        _require(_is_positive_number(self.init_scale),
                 f"init scale must be a finite number > 0, got {self.init_scale!r}")
        _require(
            isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1,
            f"momentum must be in [0, 1), got {self.momentum!r}",
        )
        _require(self.optimizer in OPTIMIZERS,
                 f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        _require(isinstance(self.weight_decay, (int, float)) and not isinstance(self.weight_decay, bool)
                 and math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                 f"weight decay must be a finite number >= 0, got {self.weight_decay!r}")
        _require(self.lr_schedule in LR_SCHEDULES,
                 f"unknown learning-rate schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
        _require(self.pipeline != "original" or self.constant_sgd,
                 f"the original pipeline trains the notebook's recipe only (SGD, momentum {DEFAULT_MOMENTUM}, no "
                 "weight decay, a constant learning rate); use the fast or eager pipeline for this one")
        if self.train_subset is not None:
            _require_int(self.train_subset, "train subset", minimum=1)
            _require(
                self.train_subset <= training_images(self.dataset) - self.validation_size,
                f"train subset {self.train_subset} is larger than the "
                f"{training_images(self.dataset) - self.validation_size} "
                "training images left after the validation split",
            )
        _require(
            self.batch_size <= self.train_size,
            f"batch size {self.batch_size} is larger than the training set ({self.train_size} images); "
            "use a smaller batch size",
        )

    @property
    def train_size(self) -> int:
        return self.train_subset or training_images(self.dataset) - self.validation_size

    @property
    def held_out(self) -> str:
        """The held-out set its figures are judged on: "validation" with a validation split, else "test"."""
        return held_out_name(self.validation_size)

    @property
    def recipe(self) -> tuple[str, float, float, str]:
        """(optimizer, momentum, weight decay, learning-rate schedule): STUDY_RECIPE is the study's."""
        return self.optimizer, self.momentum, self.weight_decay, self.lr_schedule

    @property
    def constant_sgd(self) -> bool:
        """SGD with momentum at a constant learning rate and no weight decay: the recipe every training step takes
        (bnsuite.epochs.step_kind); another trains on the eager step."""
        return (self.optimizer, self.weight_decay, self.lr_schedule) == ("sgd", 0.0, "constant")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of `epoch` (1-based): `lr` throughout, or cosine-annealed from `lr` in the first epoch
        towards 0 (lr * (1 + cos(pi (epoch - 1) / epochs)) / 2), held for the whole epoch."""
        if self.lr_schedule == "constant":
            return self.lr
        return self.lr * (1 + math.cos(math.pi * (epoch - 1) / self.epochs)) / 2

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_size / self.batch_size)  # the last partial batch is kept

    @property
    def case_id(self) -> str:
        """Readable name of the run: `bn-bs64-seed0`, `bn-bs64-lr0.3-seed0`, `plain-bs64-init10-seed2`,
        `cnn-bn-bs64-seed0`.

        The learning rate and init scale appear only where they differ from the study's defaults, the network
        only where it is not the study's MLP.
        """
        return (network_prefix(self.network) + f"{self.variant}-bs{self.batch_size}"
                + (f"-lr{self.lr:g}" if self.lr != DEFAULT_LR else "")
                + (f"-init{self.init_scale:g}" if self.init_scale != 1.0 else "") + recipe_suffix(self.recipe)
                + f"-seed{self.seed}")

    @property
    def fingerprint(self) -> str:
        """A short hash of every field: runs with equal fingerprints are the same experiment.

        A field added after schema 1 enters the hash only where it differs from the value every earlier
        run had (init_scale 1, network mlp), so a run's fingerprint, hence its file name, never changes.
        """
        fields = dataclasses.asdict(self)
        if fields["init_scale"] == 1.0:
            del fields["init_scale"]
        if fields["network"] == DEFAULT_NETWORK:
            del fields["network"]
        for name, default in RECIPE_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def protocol(self) -> dict:
        """The fields that must agree for runs to be compared in one table (all but what a study varies)."""
        fields = dataclasses.asdict(self)
        for varying in ("variant", "batch_size", "seed", "device", "pipeline", "lr", "init_scale", "network"):
            fields.pop(varying)
        return fields


@with_config(STRICT)
@dataclass(frozen=True)
class KnownException:
    """A claim our own measurements do not support under one study protocol, and the verdict they give.

    The claims gate reports it as an expected failure only while the verdict
    stays this one: a claim that starts to hold, or moves from "not shown" to
    "contradicted", fails the run until the entry is updated. An `unsettled`
    claim (measured: supported by some seed sets of the profile's size, not
    shown by others, or on some CPUs and not others) passes when it holds, is
    an expected failure when not shown, and fails when contradicted; its reason
    names the seed sets or machines measured. A `not supported` one (measured:
    not shown on some CPUs, contradicted on others) is an expected failure with
    either, and fails when it holds; its reason names the machines measured.
    """

    claim: str  # the claim's name, e.g. bn-final-loss-rises-with-batch-size
    verdict: str  # "not shown", "contradicted", "unsettled" or "not supported"
    reason: str

    def __post_init__(self) -> None:
        _require(self.verdict in (NOT_SHOWN, CONTRADICTED, UNSETTLED, NOT_SUPPORTED),
                 "a known exception's verdict is 'not shown', 'contradicted', 'unsettled' or 'not supported', got "
                 f"{self.verdict!r}")


@with_config(STRICT)
@dataclass(frozen=True)
class ClaimSettings:
    """Everything the claims' decision rule depends on, recorded with every run of a study."""

    target_loss: float  # training loss for "epochs to reach the target"
    alpha: float = 0.05  # one-sided exact permutation test at p <= alpha
    accuracy_margin: float = 0.1  # percentage points: "at least" tolerates a difference smaller than this
    # Held-out accuracy (%) at or above which a run that did not diverge counts as having trained (lr study).
    trained_accuracy: float = 90.0
    known_exceptions: tuple[KnownException, ...] = ()

    def __post_init__(self) -> None:
        _require(_is_positive_number(self.target_loss),
                 f"target loss must be a finite number > 0, got {self.target_loss!r}")
        _require(_is_positive_number(self.alpha) and self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha!r}")
        _require(isinstance(self.accuracy_margin, (int, float)) and 0 <= self.accuracy_margin < 100,
                 f"accuracy margin must be in [0, 100) points, got {self.accuracy_margin!r}")
        _require(_is_positive_number(self.trained_accuracy) and self.trained_accuracy <= 100,
                 f"trained accuracy must be in (0, 100] percent, got {self.trained_accuracy!r}")
        names = [exception.claim for exception in self.known_exceptions]
        _require(len(set(names)) == len(names), f"known exceptions name a claim twice: {names}")

    def known_exception(self, claim: str) -> KnownException | None:
        return next((exception for exception in self.known_exceptions if exception.claim == claim), None)


@with_config(STRICT)
@dataclass(frozen=True)
class Study:
    """One study's matrix of runs: every network x variant x batch size x learning rate x init scale x seed.

    What the study claims and how it is reported is its definition's, in the
    study registry (bnsuite.registry, bnsuite.studies), found by `name`.
    """

    name: str
    variants: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    epochs: int
    lrs: tuple[float, ...] = (DEFAULT_LR,)
    init_scales: tuple[float, ...] = (1.0,)
    # What its runs measure besides what every run records: of MEASUREMENTS, or a plugin's (register_measure).
    measures: tuple[str, ...] = ()
    networks: tuple[str, ...] = (DEFAULT_NETWORK,)  # of NETWORKS; its claims are judged network by network
    # (network, epochs) where a network trains other epochs than `epochs`: a ConvNet epoch costs about 20 MLP
    # epochs on a CPU, so its studies run fewer (bnsuite.studies); --bn-epochs sets every network's.
    network_epochs: tuple[tuple[str, int], ...] = ()

    def epochs_on(self, network: str) -> int:
        """The epochs each run of the study trains on `network`."""
        return dict(self.network_epochs).get(network, self.epochs)

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and NAME_PATTERN.fullmatch(self.name) is not None,
                 f"study name {self.name!r} must be letters, digits, '.', '_' or '-'")
        # A measure of a plugin's own is checked against the registry when a study starts
        # (bnsuite.registry.check_measures): its records must load where the plugin is not installed.
        named = [name for name in self.measures if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name))]
        _require(not named, f"the {self.name} study asks to measure {', '.join(map(repr, named))}: a measure's name is "
                 "letters, digits, '.', '_' or '-'")
        for network, epochs in self.network_epochs:
            _require(network in NETWORKS, f"the {self.name} study gives epochs for an unknown network {network!r}")
            _require_int(epochs, f"epochs of the {self.name} study on the {network} network", minimum=1)
        unknown = [name for name in self.networks if name not in NETWORKS]
        _require(not unknown, f"the {self.name} study names unknown networks {', '.join(map(repr, unknown))}; "
                 f"choose from: {', '.join(NETWORKS)}")
        for what, values in (("variants", self.variants), ("batch sizes", self.batch_sizes),
                             ("learning rates", self.lrs), ("init scales", self.init_scales),
                             ("networks", self.networks)):
            _require(len(values) > 0, f"the {self.name} study needs at least one of its {what}")
            _require(len(set(values)) == len(values), f"{what} {values} repeat a value; give each once")


_CHECKED: set = set()  # study specs whose every run was checked: equal ones need not be again


@with_config(STRICT)
@dataclass(frozen=True)
class StudySpec:
    """What a benchmark session asks for: its studies, their shared seeds and protocol, and the claim settings.

    Every record of the session carries it, so the report knows from the
    records alone which runs each study wanted and how its claims are judged.
    """

    profile: str
    studies: tuple[Study, ...]
    claims: ClaimSettings
    dataset: str = "mnist"
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"
    validation_size: int = 0  # 0: the seed protocol (train on all 60,000)
    train_subset: int | None = None
    # The training recipe of every run (RunSpec's fields of the same names): the study's is SGD, momentum 0.9.
    optimizer: str = "sgd"
    momentum: float = DEFAULT_MOMENTUM
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    # The description of every variant its studies train (bnsuite.registry.study_spec fills it from the registry),
    # so what a study asked for reads from its records alone.
    variants: tuple[Variant, ...] = ()
    # The description of every network of a plugin's its studies train (bnsuite's own are data in
    # bnsuite.networks), so its records load where the plugin is not installed.
    networks: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        names = [study.name for study in self.studies]
        _require(len(names) > 0, "a study spec needs at least one study")
        _require(len(set(names)) == len(names), f"studies {names} repeat a study; give each once")
        _require(len(self.seeds) > 0, "a study needs at least one seed")
        _require(len(set(self.seeds)) == len(self.seeds), f"seeds {self.seeds} repeat a value; give each once")
        described = [(variant.network, variant.name) for variant in self.variants]
        _require(len(set(described)) == len(described), f"variant descriptions {described} repeat a variant")
        used = list(dict.fromkeys(pair for study in self.studies for pair in study_variants(study)))
        undescribed = [network_prefix(network) + name for network, name in used if (network, name) not in described]
        _require(not undescribed, f"no description of variant(s) {', '.join(undescribed)}: build the study spec "
                 "with bnsuite.registry.study_spec, which takes them from the variant registry")
        trained = dict.fromkeys(network for study in self.studies for network in study.networks)
        described = [network.name for network in self.networks]
        _require(described == [name for name in trained if not NETWORKS[name].builtin],
                 f"network descriptions {described} are not those of the plugins' networks its studies train: build "
                 "the study spec with bnsuite.registry.study_spec, which takes them from the network registry")
        if self in _CHECKED:  # an equal study (every record of a study carries it) was checked already
            return
        for spec in self.run_specs():  # every combination must make a valid RunSpec its variant can train
            self.variant(spec.variant, spec.network).check(spec)
        _CHECKED.add(self)

    @property
    def held_out(self) -> str:
        """The held-out set its runs are judged on: "validation" with a validation split, else "test"."""
        return held_out_name(self.validation_size)

    @property
    def train_size(self) -> int:
        return self.train_subset or training_images(self.dataset) - self.validation_size

    def variant(self, name: str, network: str = DEFAULT_NETWORK) -> Variant:
        """The description of variant `name` on `network`, as this study recorded it."""
        found = next((variant for variant in self.variants if variant.name == name and variant.network == network),
                     None)
        _require(found is not None, f"the study has no variant {name!r} on the {network} network")
        return found

    def study(self, name: str) -> Study | None:
        return next((study for study in self.studies if study.name == name), None)

    def run_spec(self, study: Study, variant: str, batch_size: int, seed: int, *, lr: float | None = None,
                 init_scale: float = 1.0, network: str | None = None) -> RunSpec:
        """One run of `study`; on its first network unless `network` says (a claim judges one network at a time,
        on a study narrowed to it: bnsuite.claims.study_claims)."""
        network = study.networks[0] if network is None else network
        return RunSpec(
            dataset=self.dataset, variant=variant, batch_size=batch_size, epochs=study.epochs_on(network), seed=seed,
            lr=study.lrs[0] if lr is None else lr, init_scale=init_scale, device=self.device,
            validation_size=self.validation_size, train_subset=self.train_subset, network=network,
            optimizer=self.optimizer, momentum=self.momentum, weight_decay=self.weight_decay,
            lr_schedule=self.lr_schedule,
        )

    def study_groups(self, study: Study) -> list[tuple[RunSpec, ...]]:
        """One study's runs by (network, variant, batch size): every learning rate, init scale and seed of each."""
        return [
            tuple(self.run_spec(study, variant, batch_size, seed, lr=lr, init_scale=scale, network=network)
                  for lr in study.lrs for scale in study.init_scales for seed in self.seeds)
            for network in study.networks
            for batch_size in study.batch_sizes
            for variant in study.variants
        ]

    def study_runs(self, study: Study) -> list[RunSpec]:
        return [spec for group in self.study_groups(study) for spec in group]

    def groups(self) -> list[tuple[RunSpec, ...]]:
        """What trains as one computation, each run once: the studies' groups, less runs an earlier one has."""
        seen: set[RunSpec] = set()
        groups = []
        for study in self.studies:
            for group in self.study_groups(study):
                new = tuple(spec for spec in group if spec not in seen)
                seen.update(new)
                if new:
                    groups.append(new)
        return groups

    def run_specs(self) -> list[RunSpec]:
        """Every run of every study, once, in the order the groups train them."""
        return [spec for group in self.groups() for spec in group]

    def measures(self, runs) -> frozenset[str]:
        """What `runs` measure besides what every run records: what the studies that have any of them ask for
        (Study.measures). A run two studies share measures what either asks."""
        runs = set(runs)
        return frozenset(name for study in self.studies
                         if study.measures and not runs.isdisjoint(self.study_runs(study)) for name in study.measures)

    def case_name(self, group: tuple[RunSpec, ...]) -> str:
        """A group's name, as in test ids: `bn-bs64`, `plain-bs64-lr-sweep`, `bn-dropout-bs64`."""
        first = group[0]
        lrs, scales = {spec.lr for spec in group}, {spec.init_scale for spec in group}
        name = network_prefix(first.network) + f"{first.variant}-bs{first.batch_size}"
        name += "-lr-sweep" if len(lrs) > 1 else (f"-lr{first.lr:g}" if first.lr != DEFAULT_LR else "")
        name += "-init-sweep" if len(scales) > 1 else (f"-init{first.init_scale:g}" if first.init_scale != 1 else "")
        return name + recipe_suffix(first.recipe)

    def recorded_study(self, runs) -> StudySpec | None:
        """This study, as the records of `runs` carry it; None for runs outside its matrix (a changed learning
        rate, say), which are recorded without its settings."""
        return self if set(runs) <= set(self.run_specs()) else None

    def group_of(self, spec: RunSpec) -> tuple[RunSpec, ...]:
        """The group `spec` trains in, or `spec` alone if no study of this spec has it."""
        return next((group for group in self.groups() if spec in group), (spec,))

    def protocol(self) -> dict:
        """What must agree for results to be compared: everything but the studies' matrices, their variants, seeds
        and device."""
        fields = dataclasses.asdict(self)
        for varying in ("studies", "seeds", "device", "variants", "networks"):
            fields.pop(varying)
        return fields


def recipe_suffix(recipe: tuple[str, float, float, str]) -> str:
    """What a run's or a case's name adds for a recipe other than the study's: `-adam`, `-momentum0.5`,
    `-wd0.0005`, `-cosine`; nothing for the study's."""
    optimizer, momentum, weight_decay, schedule = recipe
    return ((f"-{optimizer}" if optimizer != STUDY_RECIPE[0] else "")
            + (f"-momentum{momentum:g}" if momentum != DEFAULT_MOMENTUM and optimizer == "sgd" else "")
            + (f"-wd{weight_decay:g}" if weight_decay else "")
            + (f"-{schedule}" if schedule != STUDY_RECIPE[3] else ""))


def network_prefix(network: str) -> str:
    """What names a run, a case or a claim of `network` begin with: nothing for the study's MLP, `cnn-` for the
    ConvNet, so every name of the MLP's stays what it was."""
    return "" if network == DEFAULT_NETWORK else f"{network}-"


def study_variants(study: Study) -> list[tuple[str, str]]:
    """(network, variant) of every variant a study trains, network by network."""
    return [(network, name) for network in study.networks for name in study.variants]


def held_out_name(validation_size: int) -> str:
    """The one place that decides which set is held out: the validation split where there is one, else the
    official test images (the seed protocol trains on all 60,000)."""
    return "validation" if validation_size > 0 else "test"


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _is_device_name(device: object) -> bool:
    if not isinstance(device, str):
        return False
    if device in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


def _require_int(value: object, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise SpecError(f"{name} must be at least {minimum}, got {value}")
