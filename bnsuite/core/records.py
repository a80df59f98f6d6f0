"""RunRecord: what one training run did, as JSON on disk and as pandas tables.

A record carries its own context: the run's spec, the study it belonged to
(what that study asked for: profile, matrix, epochs, claim settings), the
seeds it trained together with, and the environment that produced it (CPU
model and flags, BLAS, torch, threads, device, dataset checksum, commit). A
report built from records never has to guess how a number was made.

Records are written atomically: a crash, a kill or a concurrent writer leaves
either no file or a complete one. Every field is validated when a record is
read (type, range, and the fields that must agree with each other); a bad
record is one `RecordError` naming the file and the field, and no field is
ever filled with a default, except by the documented migrations of records
of schemas 1 to 11 (`migrate_schema_1` to `migrate_schema_11`).

A record carries the description of its variant (bnsuite.spec.Variant), and
its study those of all of its variants, so records are data: they load and
report in a process where the plugin that registered a variant is absent.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import statistics
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pandas as pd
from pydantic import Field, TypeAdapter, ValidationError, with_config

from bnsuite.core.datasets import DATASETS, Dataset
from bnsuite.core.described import DescriptionConflict
from bnsuite.core.files import write_atomically
from bnsuite.core.networks import NETWORKS, Network
from bnsuite.core.spec import CONTRADICTED, NOT_SHOWN, STRICT, RunSpec, SpecError, StudySpec, Variant

SCHEMA_VERSION = 16
RUNS_SUBDIR = "runs"

Percent = Annotated[float, Field(ge=0, le=100)]
NonNegative = Annotated[float, Field(ge=0)]


class RecordError(ValueError):
    """A record file is malformed, inconsistent, duplicated or of a schema this version cannot read."""


@with_config(STRICT)
@dataclass(frozen=True)
class EpochRecord:
    epoch: Annotated[int, Field(ge=1)]  # 1-based
    train_loss: NonNegative  # mean of the per-batch losses, as the study prints it
    train_accuracy: Percent  # over the epoch's training batches (train mode)
    validation_loss: NonNegative | None  # None under the seed protocol (no validation split)
    validation_accuracy: Percent | None
    test_loss: NonNegative
    test_accuracy: Percent
    epoch_time_s: NonNegative  # training only, evaluation excluded; a share when runs train together
    # Held-out accuracy (validation if the run has a split, else test) with every BN layer normalizing each held-out
    # batch of the run's batch size by that batch's own statistics, as in training, instead of by its running
    # estimates (train_accuracy's counterpart on held-out images). None for variants without batch statistics
    # (plain, ln) and in records of schema 3 and earlier.
    batch_statistics_accuracy: Percent | None
    # Held-out accuracy with every BN layer's running estimates replaced by precise population statistics: the
    # batch statistics of the run's training images at its batch size, averaged over them with the weights of this
    # epoch's end frozen (Wu & Johnson 2021, bnsuite.precise). None where not measured (a study that does not ask,
    # a variant without running estimates, an epoch that is not a checkpoint) and in records of schema 9 and earlier.
    precise_accuracy: Percent | None
    # A plugin's per-epoch measures (bnsuite.registry.register_measure) the run's study asked for, (name, value) in
    # name order; empty where none was asked and in records of schema 10 and earlier.
    measured: tuple[tuple[str, float], ...]

    def measure(self, name: str) -> float | None:
        """The value of the plugin measure `name` at this epoch end; None where it was not measured."""
        return next((value for measured, value in self.measured if measured == name), None)


@with_config(STRICT)
@dataclass(frozen=True)
class ActivationTrace:
    """Percentiles of the inputs to the last hidden ReLU over training (Ioffe & Szegedy 2015, Fig. 1).

    Measured on a fixed probe batch of held-out images for a fixed set of units (bnsuite.probe): after bn2,
    with the probe batch's own statistics, in the BN variants; fc2's output in plain.
    """

    every: Annotated[int, Field(ge=1)]  # steps between regular checkpoints (the others are epoch ends)
    steps: tuple[Annotated[int, Field(ge=0)], ...]  # optimizer steps taken at each checkpoint (0: before training)
    units: tuple[Annotated[int, Field(ge=0)], ...]
    percentiles: tuple[Percent, ...]
    values: tuple[tuple[tuple[float, ...], ...], ...]  # [checkpoint][unit][percentile]

    def __post_init__(self) -> None:
        _check(list(self.steps) == sorted(set(self.steps)), "activations.steps", "must increase")
        _check(len(self.values) == len(self.steps) and all(
            len(at) == len(self.units) and all(len(unit) == len(self.percentiles) for unit in at)
            for at in self.values), "activations.values", "must be [checkpoint][unit][percentile]")

    def drift(self) -> float:
        """How far the percentiles move between regular checkpoints, relative to their spread.

        The mean, over units, percentiles and consecutive checkpoints `every` steps apart, of |p(t+1) - p(t)|
        divided by the unit's mean 85th-minus-15th percentile spread over training: scale-free, so a network
        whose activations grow is not called unsteady for that alone. 0 for a distribution that never moves.
        """
        regular = [index for index, step in enumerate(self.steps) if step % self.every == 0]
        moves = []
        for unit in range(len(self.units)):
            spread = statistics.fmean(self.values[c][unit][-1] - self.values[c][unit][0] for c in regular)
            for k in range(len(self.percentiles)):
                path = [self.values[c][unit][k] for c in regular]
                moves += [abs(b - a) / spread if spread > 0 else math.inf for a, b in itertools.pairwise(path)]
        return statistics.fmean(moves) if moves else math.nan


@with_config(STRICT)
@dataclass(frozen=True)
class SignalTrace:
    """Signal propagation at initialization (Brock, De & Smith 2021, bnsuite.signal): for each hidden layer's
    output, as the next layer takes it, the mean over channels of the squared channel mean and of the channel
    variance (over the images, and positions for a feature map), on a batch of the run's training images, before
    the first step, in training mode."""

    images: Annotated[int, Field(ge=2)]
    layers: tuple[str, ...]  # the layers whose inputs were measured, in depth order (fc2: the first hidden output)
    squared_mean: tuple[NonNegative, ...]  # [layer]
    variance: tuple[NonNegative, ...]  # [layer]

    def __post_init__(self) -> None:
        _check(len(self.layers) >= 1 and len(self.squared_mean) == len(self.variance) == len(self.layers),
               "signal", "must have one squared mean and one variance per layer")

    def variance_range(self) -> float:
        """The largest layer's channel variance over the smallest's: 1 for a signal whose scale depth keeps;
        infinite where a layer's variance is 0."""
        low = min(self.variance)
        return math.inf if low == 0 else max(self.variance) / low


@with_config(STRICT)
@dataclass(frozen=True)
class LandscapeTrace:
    """Santurkar et al. (2018) along one run's training (bnsuite.landscape): gradient-based internal covariate
    shift of `ics_layers` on a fixed batch, and the loss landscape's smoothness along the gradient on each
    checkpoint's training batch, both measured before that checkpoint's step."""

    every: Annotated[int, Field(ge=1)]  # steps between checkpoints
    steps: tuple[Annotated[int, Field(ge=0)], ...]  # optimizer steps taken before each checkpoint
    ics_layers: tuple[str, ...]
    step_factors: tuple[Annotated[float, Field(gt=0)], ...]  # the distances along the gradient, in learning rates
    ics: tuple[tuple[NonNegative, ...], ...]  # [checkpoint][layer]: ||G - G'||
    ics_cosine: tuple[tuple[Annotated[float, Field(ge=-1.000001, le=1.000001)], ...], ...]  # [checkpoint][layer]
    # [checkpoint][layer]: ||G - G'|| / ||G||; None in records of schema 8 or earlier, which did not keep ||G||
    ics_relative: tuple[tuple[NonNegative, ...], ...] | None
    loss_variation: tuple[NonNegative, ...]  # [checkpoint]: the range of the loss along the gradient
    gradient_predictiveness: tuple[NonNegative, ...]  # [checkpoint]: the largest ||grad(w - eta g) - g||
    beta_smoothness: tuple[NonNegative, ...]  # [checkpoint]: the largest ||grad(w - eta g) - g|| / ||eta g||

    def __post_init__(self) -> None:
        _check(list(self.steps) == sorted(set(self.steps)), "landscape.steps", "must increase")
        count = len(self.steps)
        _check(all(len(series) == count for series in (self.ics, self.ics_cosine, self.loss_variation,
                                                        self.gradient_predictiveness, self.beta_smoothness))
               and (self.ics_relative is None or len(self.ics_relative) == count)
               and all(len(at) == len(self.ics_layers)
                       for at in (*self.ics, *self.ics_cosine, *(self.ics_relative or ()))),
               "landscape", "every series must have one value per checkpoint (and per layer for ics)")

    def mean(self, series: str, layer: str | None = None) -> float:
        """The mean of `series` over the checkpoints after training began (step 0, the untrained model, left out);
        for `ics`, `ics_cosine` and `ics_relative`, of `layer`'s values; NaN for a series the record does not keep."""
        values = getattr(self, series)
        if values is None:
            return math.nan
        if layer is not None:
            values = [at[self.ics_layers.index(layer)] for at in values]
        kept = [value for step, value in zip(self.steps, values, strict=True) if step > 0]
        return statistics.fmean(kept) if kept else math.nan


@with_config(STRICT)
@dataclass(frozen=True)
class Environment:
    """What produced a record. The fields up to `threads` decide which kernels ran, hence the exact numbers."""

    torch_version: str
    device: str  # cpu, cuda:0, ...
    device_name: str  # the CPU model on a CPU, the GPU's name on a GPU
    cpu_model: str | None  # None only in records migrated from schema 1, which did not record it
    cpu_flags: tuple[str, ...] | None  # the CPU's vector extensions (avx2, avx512f, amx_tile, ...)
    cpu_capability: str | None  # the instruction set ATen's CPU kernels dispatch to (AVX2, AVX512, ...)
    blas: str | None  # the BLAS library torch was built with, and its version
    threads: Annotated[int, Field(ge=1)]
    python_version: str
    platform: str
    git_commit: str | None
    dataset_checksum: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    hostname: str | None  # the machine the run trained on; None only in records migrated from schemas 1 and 2
    # Whether the CPU flushed subnormal floats to zero on every thread that computed (bnsuite.environment:
    # "flushed", "kept" or "mixed"; GPUs "kept"): collapsed runs compute with them. Schema 5 and earlier: "kept".
    denormals: Literal["flushed", "kept", "mixed"]

    def fingerprint(self) -> dict:
        """The fields that must agree for two runs of one spec to be expected bit for bit equal."""
        return {key: getattr(self, key) for key in (
            "torch_version", "device", "device_name", "cpu_model", "cpu_flags", "cpu_capability", "blas", "threads",
            "denormals", "dataset_checksum")}


@functools.lru_cache(maxsize=64)
def _runs_of(study: StudySpec) -> frozenset[RunSpec]:
    """The runs `study` trains, built once per study however many of its records are read (equal studies are one
    key)."""
    return frozenset(study.run_specs())


@with_config(STRICT)
@dataclass(frozen=True)
class RunRecord:
    spec: RunSpec
    variant: Variant  # the description of spec.variant it trained as (where it came from included)
    study: StudySpec | None  # what the study asked for; None for a run made outside a study
    # The runs trained as one computation with this one (itself included): times are this run's share of it.
    runs_trained_together: Annotated[int, Field(ge=1)]
    # Their names (spec.case_id: the runs differ only in seed, learning rate or init scale), this run's among
    # them; None only in migrated schema-1 records of several runs, which did not name them.
    trained_with: tuple[str, ...] | None
    epochs: tuple[EpochRecord, ...]
    test_loss: NonNegative | None  # None when the model's loss is not finite (a diverged run)
    test_accuracy: Percent
    # The final model on its own training images, in eval mode (unlike the epochs' train-mode running figures):
    # the training side of a generalization gap. None only in migrated schema-1 records, which did not measure it.
    final_train_loss_eval: NonNegative | None
    final_train_accuracy_eval: Percent | None
    train_time_s: NonNegative  # sum of epoch times: training only, evaluation excluded
    steps: Annotated[int, Field(ge=0)]  # optimizer steps the training loop took, counted as it ran
    diverged_at_epoch: Annotated[int, Field(ge=1)] | None  # first epoch whose loss blew up; the run stopped there
    environment: Environment
    started_at: str
    # What ran it: "local" (the pytest process), or "ray at ADDRESS, node ID (IP, host NAME)" (a task on that Ray
    # node). Schema 2 and earlier ran locally only.
    executor: str
    # The last hidden layer's pre-activation percentiles over training; None where the run was not probed (the
    # original pipeline, a diverged run's probe with non-finite values, and records of schemas 1 and 2).
    activations: ActivationTrace | None
    # What stepped the training: "fused (COMPILER)" (bnsuite.fused: the C step, and the compiler that built it),
    # "fast" (bnsuite.fastpath, the ATen step: where the fused one cannot be built, and on a GPU), "fast, CUDA graph"
    # (the fast step replayed as a graph), "eager" (autograd + torch.optim: the eager pipeline, and the fallback for
    # variants the fast step does not cover) or "original" (the notebook's DataLoader loop). None only in records
    # of schema 3 and earlier.
    training_step: str | None
    # Gradient-based covariate shift and loss-landscape smoothness along training (bnsuite.landscape); None where
    # not measured (the original pipeline, a diverged run, and records of schema 6 and earlier).
    landscape: LandscapeTrace | None
    # Signal propagation at initialization (bnsuite.signal); None where not measured (a study that does not ask,
    # the original pipeline, and records of schema 9 and earlier).
    signal: SignalTrace | None
    # The description of a plugin's dataset the run trained on (bnsuite.registry.register_dataset), so the record
    # loads where that plugin is not installed; None for bnsuite's own datasets (bnsuite.datasets describes them),
    # and in records of schema 12 and earlier, which trained on those only.
    dataset: Dataset | None
    # The description of a plugin's network the run trained (bnsuite.registry.register_network), so the record loads
    # where that plugin is not installed, a run made outside a study included (its study, which describes the
    # study's networks too, is None); None for bnsuite's own networks (bnsuite.networks describes them), and in
    # records of schema 14 and earlier, whose study described any plugin's.
    network: Network | None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """The fields that must agree with each other; a record that breaks one is refused, never repaired."""
        expected = (self.diverged_at_epoch - 1 if self.diverged else self.spec.epochs)
        _check(self.diverged_at_epoch is None or self.diverged_at_epoch <= self.spec.epochs,
               "diverged_at_epoch", f"is {self.diverged_at_epoch}, after the run's last epoch {self.spec.epochs}")
        _check([e.epoch for e in self.epochs] == list(range(1, expected + 1)), "epochs",
               f"must number 1 to {expected} in order ({'diverged' if self.diverged else 'finished'} run of "
               f"{self.spec.epochs} epochs), got {[e.epoch for e in self.epochs]}")
        if self.trained_with is not None:
            _check(len(self.trained_with) == self.runs_trained_together and self.spec.case_id in self.trained_with
                   and len(set(self.trained_with)) == len(self.trained_with), "trained_with",
                   f"{list(self.trained_with)} must be {self.runs_trained_together} distinct runs, "
                   f"this run ({self.spec.case_id}) among them")
        _check(self.variant.name == self.spec.variant, "variant",
               f"describes {self.variant.name!r}, not the run's variant {self.spec.variant!r}")
        try:
            self.variant.check(self.spec)
        except SpecError as error:
            raise _Inconsistent(f"field variant: {error}") from None
        if self.study is not None:
            _check(self.spec in _runs_of(self.study), "study",
                   f"does not include this run ({self.spec.case_id}, {self.spec.epochs} epochs, lr {self.spec.lr})")
            _check(self.study.variant(self.spec.variant, self.spec.network) == self.variant, "variant",
                   f"differs from the study's description of {self.spec.variant}")
        if self.dataset is None:
            _check(self.spec.dataset in DATASETS and DATASETS[self.spec.dataset].builtin, "dataset",
                   f"is missing: the run trained on {self.spec.dataset!r}, not one of bnsuite's own datasets, and "
                   "a record of a plugin's dataset describes it")
        else:
            _check(self.dataset.name == self.spec.dataset and not self.dataset.builtin, "dataset",
                   f"describes {self.dataset.name!r} from {self.dataset.source}, not the run's dataset "
                   f"{self.spec.dataset!r} from a plugin")
        _check(self.schema_version == SCHEMA_VERSION, "schema_version", f"must be {SCHEMA_VERSION}")

    @property
    def diverged(self) -> bool:
        return self.diverged_at_epoch is not None

    @property
    def profile(self) -> str | None:
        return self.study.profile if self.study else None

    @property
    def train_losses(self) -> list[float]:
        return [epoch.train_loss for epoch in self.epochs]

    def held_out_accuracy(self, epoch: EpochRecord) -> float:
        """`epoch`'s accuracy on the held-out set of this run's protocol (RunSpec.held_out)."""
        return epoch.validation_accuracy if self.spec.held_out == "validation" else epoch.test_accuracy

    @property
    def final_train_loss(self) -> float:
        return self.epochs[-1].train_loss if self.epochs and not self.diverged else math.inf

    def epochs_to_target(self, target_loss: float) -> int | None:
        """The first epoch whose mean training loss is at or below `target_loss`; None if never, or if diverged.

        A run that blows up later has not reached a training loss it could not keep.
        """
        if self.diverged:
            return None
        return next((epoch.epoch for epoch in self.epochs if epoch.train_loss <= target_loss), None)

    @property
    def filename(self) -> str:
        return f"{self.spec.case_id}-{self.spec.fingerprint}.json"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, *, source: str = "record") -> RunRecord:
        """Parse and validate a record, migrating schema 1; RecordError names `source` and the bad field."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecordError(f"{source}: not valid JSON ({error}); delete it or re-run that case") from error
        if not isinstance(raw, dict):
            raise RecordError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("schema_version")
        while raw.get("schema_version") != SCHEMA_VERSION:  # each migration takes a record one schema on
            try:
                migrate = _MIGRATIONS.get(raw.get("schema_version"))
            except TypeError:  # a version that is not even a key (a list, say)
                migrate = None
            if migrate is None:
                raise RecordError(
                    f"{source}: schema version {version!r} is not supported (this bnsuite reads versions 1 to "
                    f"{SCHEMA_VERSION}); re-run the study with this version or use the bnsuite that wrote it"
                )
            raw = migrate(raw, source=source)
        missing = _missing_fields(raw, cls)
        if missing:
            raise RecordError(f"{source}: field {missing} is missing; a record is never completed with defaults. "
                              "Delete it or re-run that case")
        try:
            if isinstance(raw.get("dataset"), dict):  # a plugin's dataset: known from here on, so the spec is valid
                DATASETS.remember(_DATASET.validate_json(json.dumps(raw["dataset"])), source=source)
            described = raw["study"].get("networks") if isinstance(raw.get("study"), dict) else None
            for network in described if isinstance(described, list) else ():  # a plugin's networks, likewise
                NETWORKS.remember(_NETWORK.validate_json(json.dumps(network)), source=source)
            if isinstance(raw.get("network"), dict):  # and the run's own, outside a study too
                NETWORKS.remember(_NETWORK.validate_json(json.dumps(raw["network"])), source=source)
            record = _RECORD.validate_json(json.dumps(raw))
        except DescriptionConflict as error:
            raise RecordError(str(error)) from None
        except ValidationError as error:
            raise RecordError(f"{source}: {_describe(error)}; delete it or re-run that case") from None
        problem = _figures_disagree(record)
        if problem:
            raise RecordError(f"{source}: {problem}: the record was changed after it was written; delete it or re-run "
                              "that case")
        return record


_RECORD = TypeAdapter(RunRecord)
_DATASET = TypeAdapter(Dataset)
_NETWORK = TypeAdapter(Network)


def _figures_disagree(record: RunRecord) -> str | None:
    """What in a loaded record contradicts the rest of it, in words, or None. Training writes each of these
    figures from the others (the final test figures are the last epoch's, the training time the sum of the epochs'
    times, the steps those of the epochs it trained), so a record that breaks one was edited or damaged; records
    built in code (tests, migrations) are not held to it, a loaded one is."""
    last = record.epochs[-1] if record.epochs else None
    if last is not None and not record.diverged:
        if record.test_accuracy != last.test_accuracy:
            return (f"field test_accuracy is {record.test_accuracy!r}, but its last epoch's test_accuracy is "
                    f"{last.test_accuracy!r}")
        if record.test_loss != last.test_loss:
            return f"field test_loss is {record.test_loss!r}, but its last epoch's test_loss is {last.test_loss!r}"
    epoch_times = sum(epoch.epoch_time_s for epoch in record.epochs)
    if not math.isclose(record.train_time_s, epoch_times, rel_tol=1e-9, abs_tol=1e-12):
        return f"field train_time_s is {record.train_time_s!r}, but its epochs' times sum to {epoch_times!r}"
    most = record.spec.steps_per_epoch * record.spec.epochs
    if record.steps > most:
        return f"field steps is {record.steps}, more than the {most} of {record.spec.epochs} epochs"
    return None


class _Inconsistent(ValueError):
    pass


def _check(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise _Inconsistent(f"field {field} {problem}")


def _describe(error: ValidationError) -> str:
    """One line: the first bad field, where it is, what was wrong, and how many more there are."""
    first = error.errors()[0]
    place = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if isinstance(first.get("ctx", {}).get("error"), _Inconsistent) or not place:
        text = message  # a check of several fields names its own field
    else:
        text = f"field {place}: {message}, got {first.get('input')!r}"
    more = error.error_count() - 1
    return text + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


@functools.cache
def _plan(cls: Any) -> tuple[tuple[str, ...], tuple[tuple[str, bool, tuple[Any, ...]], ...]]:
    """How to look for missing fields under `cls`, worked out once per class: its field names in order, and for each
    field that holds dataclasses, (name, whether it is a tuple of them, the dataclasses it may hold)."""
    hints = typing.get_type_hints(cls)
    nested = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            nested.append((field.name, False, (hint,)))
        elif typing.get_origin(hint) in (Union, types.UnionType):
            options = tuple(option for option in typing.get_args(hint) if dataclasses.is_dataclass(option))
            if options:
                nested.append((field.name, False, options))
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            nested.append((field.name, True, (typing.get_args(hint)[0],)))
    return tuple(field.name for field in dataclasses.fields(cls)), tuple(nested)


def _missing_fields(raw: Any, cls: Any, path: str = "") -> str | None:
    """The dotted name of the first dataclass field absent from `raw`, or None."""
    if not isinstance(raw, dict):
        return None  # a wrong type is the validator's to report
    names, nested = _plan(cls)
    if not raw.keys() >= set(names):
        return path + next(name for name in names if name not in raw)
    for name, many, options in nested:
        value = raw[name]
        if many:
            if not isinstance(value, list):
                continue
            places = ((f"{path}{name}.{index}.", item) for index, item in enumerate(value))
        else:
            places = ((f"{path}{name}.", value),)
        for place, item in places:
            for option in options:
                missing = _missing_fields(item, option, place)
                if missing:
                    return missing
    return None


# What a schema-1 record's profile meant when bnsuite wrote schema 1; frozen here so a later change to a
# profile never changes what an old record says. Schema 1 recorded neither the matrix nor the claim settings.
_SCHEMA_1_CLAIMS = {
    "full": {"target_loss": 0.1, "known_exceptions": [
        {"claim": "bn-final-loss-rises-with-batch-size", "verdict": CONTRADICTED,
         "reason": "over 10 full epochs BN's final training loss falls as the batch grows from 32 to 128; "
                   "the rise holds only in short runs (smoke), where larger batches mean too few steps"},
        {"claim": "plain-final-loss-rises-with-batch-size", "verdict": NOT_SHOWN,
         "reason": "plain's final loss rises from batch 64 to 128, but at 32 and 64 the seeds overlap"},
    ]},
    "quick": {"target_loss": 0.15, "known_exceptions": []},
    "smoke": {"target_loss": 0.5, "known_exceptions": [
        {"claim": "bn-converges-faster-bs32", "verdict": NOT_SHOWN,
         "reason": "in 2 epochs on 4,000 images both variants first reach loss 0.5 in epoch 2 of 2, "
                   "so the epoch counts tie; the full study's 10 epochs separate them"},
    ]},
}


# The variants schema 4 had, described as bnsuite then built them; frozen here, like the schema-1 claims, so a later
# change to a built-in never changes what an old record says. Schema 4 had no plugins.
_SCHEMA_4_VARIANTS = {
    "plain": dict(batch_statistics=False, probe="fc2", order=0, color="tab:orange", builder="bnsuite.models:plain"),
    "bn": dict(batch_statistics=True, probe="bn2", order=1, color="tab:blue", builder="bnsuite.models:bn"),
    "plain-dropout": dict(batch_statistics=False, derives_from="plain", probe="fc2", order=2, color="tab:orange",
                          builder="bnsuite.models:plain_dropout"),
    "bn-dropout": dict(batch_statistics=True, derives_from="bn", probe="bn2", order=3, color="tab:blue",
                       builder="bnsuite.models:bn_dropout"),
    "bn-scratch": dict(batch_statistics=True, derives_from="bn", probe="bn2", order=4, color="tab:green",
                       builder="bnsuite.models:bn_scratch"),
    **{f"bn-ghost{g}": dict(batch_statistics=True, images_per_statistic=g, derives_from="bn", probe="bn2", order=5,
                            builder=f"bnsuite.models:ghost_bn_{g}") for g in (2, 4, 8, 16, 32, 64)},
    "ln": dict(batch_statistics=False, probe="bn2", order=6, color="tab:purple", builder="bnsuite.models:ln"),
}


def _schema_4_variant(name: Any, source: str) -> dict:
    if name not in _SCHEMA_4_VARIANTS:
        raise RecordError(f"{source}: schema-4 variant {name!r} is not one schema 4 had "
                          f"({', '.join(_SCHEMA_4_VARIANTS)}); re-run that case")
    return dataclasses.asdict(Variant(name=name, **_SCHEMA_4_VARIANTS[name]))


def migrate_schema_7(raw: dict, *, source: str = "record") -> dict:
    """A schema-7 record as schema 8: every run, variant and study on the study's MLP (`network` "mlp", studies'
    `networks` ["mlp"] with no `network_epochs`): schema 7 had no other network."""
    raw = {**raw, "schema_version": 8}
    for key in ("spec", "variant"):
        if isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], "network": "mlp"}
    study = raw.get("study")
    if isinstance(study, dict):
        study = dict(study)
        if isinstance(study.get("studies"), list):
            study["studies"] = [{**entry, "networks": ["mlp"], "network_epochs": []} if isinstance(entry, dict)
                                else entry for entry in study["studies"]]
        if isinstance(study.get("variants"), list):
            study["variants"] = [{**entry, "network": "mlp"} if isinstance(entry, dict) else entry
                                 for entry in study["variants"]]
        raw["study"] = study
    return raw


def migrate_schema_12(raw: dict, *, source: str = "record") -> dict:
    """A schema-12 record as schema 13: no dataset description, as every earlier run trained on one of bnsuite's
    own datasets."""
    return {**raw, "schema_version": 13, "dataset": None}


def migrate_schema_14(raw: dict, *, source: str = "record") -> dict:
    """A schema-14 record as schema 15: no network description of its own (its study described a plugin's)."""
    return {**raw, "schema_version": 15, "network": None}


# Where schema 15's built-in variants built whole put their slots and how much they dropped out: what a variant
# description says since schema 16 (frozen here, like the schema-4 variants). Any other said nothing of either.
_SCHEMA_15_BUILT_WHOLE = {"bnsuite.models:bn_after_relu": {"placement": "after"},
                          "bnsuite.models:plain_dropout": {"dropout": 0.2},
                          "bnsuite.models:bn_dropout": {"dropout": 0.2}}


def migrate_schema_15(raw: dict, *, source: str = "record") -> dict:
    """A schema-15 record as schema 16: each variant description says where its slots sit and its dropout
    (`_SCHEMA_15_BUILT_WHOLE`'s for the MLP's placement and dropout variants, then built whole; before the
    nonlinearity and none for every other), and each network description that its slots sit before the
    nonlinearity only and that it takes no dropout, as every plugin's network then did."""
    def variant(entry: Any) -> Any:
        if not isinstance(entry, dict):
            return entry
        return {**entry, "placement": "before", "dropout": 0.0, **_SCHEMA_15_BUILT_WHOLE.get(entry.get("builder"), {})}

    def network(entry: Any) -> Any:
        return {**entry, "placements": ["before"], "dropout": False} if isinstance(entry, dict) else entry

    raw = {**raw, "schema_version": 16, "variant": variant(raw.get("variant")), "network": network(raw.get("network"))}
    study = raw.get("study")
    if isinstance(study, dict):
        study = dict(study)
        for key, migrate in (("variants", variant), ("networks", network)):
            if isinstance(study.get(key), list):
                study[key] = [migrate(entry) for entry in study[key]]
        raw["study"] = study
    return raw


def migrate_schema_13(raw: dict, *, source: str = "record") -> dict:
    """A schema-13 record as schema 14: its study describes no network of a plugin's, as none could be registered
    before schema 14."""
    raw = {**raw, "schema_version": 14}
    if isinstance(raw.get("study"), dict):
        raw["study"] = {**raw["study"], "networks": []}
    return raw


# The recipe every run of schema 11 and earlier trained with: SGD, momentum 0.9, no weight decay, a constant rate.
_SCHEMA_11_RECIPE = {"optimizer": "sgd", "weight_decay": 0.0, "lr_schedule": "constant"}


def migrate_schema_11(raw: dict, *, source: str = "record") -> dict:
    """A schema-11 record as schema 12: its run and its study with the recipe every earlier run had (SGD at a
    constant learning rate, no weight decay; the study's momentum 0.9, the only one a study could ask for)."""
    raw = {**raw, "schema_version": 12}
    if isinstance(raw.get("spec"), dict):
        raw["spec"] = {**_SCHEMA_11_RECIPE, **raw["spec"]}
    if isinstance(raw.get("study"), dict):
        raw["study"] = {**_SCHEMA_11_RECIPE, "momentum": 0.9, **raw["study"]}
    return raw


def migrate_schema_10(raw: dict, *, source: str = "record") -> dict:
    """A schema-10 record as schema 11: no plugin measure at any epoch (schema 10 had none)."""
    raw = {**raw, "schema_version": 11}
    if isinstance(raw.get("epochs"), list):
        raw["epochs"] = [{**epoch, "measured": []} if isinstance(epoch, dict) else epoch for epoch in raw["epochs"]]
    return raw


def migrate_schema_9(raw: dict, *, source: str = "record") -> dict:
    """A schema-9 record as schema 10: no signal at initialization and no precise-statistics accuracy at any
    epoch, which schema 9 did not measure."""
    raw = {**raw, "schema_version": 10, "signal": None}
    if isinstance(raw.get("epochs"), list):
        raw["epochs"] = [{**epoch, "precise_accuracy": None} if isinstance(epoch, dict) else epoch
                         for epoch in raw["epochs"]]
    return raw


def migrate_schema_8(raw: dict, *, source: str = "record") -> dict:
    """A schema-8 record as schema 9: its landscape measurements (if any) without `ics_relative`, which schema 8
    did not keep (the gradient's norm was not recorded, so the relative form cannot be recovered)."""
    raw = {**raw, "schema_version": 9}
    if isinstance(raw.get("landscape"), dict):
        raw["landscape"] = {**raw["landscape"], "ics_relative": None}
    return raw


def migrate_schema_6(raw: dict, *, source: str = "record") -> dict:
    """A schema-6 record as schema 7: `landscape` None and its study's studies measuring nothing beyond what every
    run records (`measures` empty): schema 6 measured no landscape."""
    raw = {**raw, "schema_version": 7, "landscape": None}
    study = raw.get("study")
    if isinstance(study, dict) and isinstance(study.get("studies"), list):
        raw["study"] = {**study, "studies": [{**entry, "measures": []} if isinstance(entry, dict) else entry
                                             for entry in study["studies"]]}
    return raw


def migrate_schema_5(raw: dict, *, source: str = "record") -> dict:
    """A schema-5 record as schema 6: `environment.denormals` "kept" (bnsuite flushed no subnormals before)."""
    raw = {**raw, "schema_version": 6}
    if isinstance(raw.get("environment"), dict):
        raw["environment"] = {**raw["environment"], "denormals": "kept"}
    return raw


def migrate_schema_4(raw: dict, *, source: str = "record") -> dict:
    """A schema-4 record as schema 5 (then 6: `migrate_schema_5`): `variant`, and its study's `variants`,
    described as schema 4's built-in variants were (`_SCHEMA_4_VARIANTS`, source bnsuite)."""
    raw = {**raw, "schema_version": 5}
    spec, study = raw.get("spec"), raw.get("study")
    if isinstance(spec, dict):
        raw["variant"] = _schema_4_variant(spec.get("variant"), source)
    if isinstance(study, dict) and isinstance(study.get("studies"), list):
        names = dict.fromkeys(name for entry in study["studies"] if isinstance(entry, dict)
                              for name in entry.get("variants", []))
        raw["study"] = {**study, "variants": [_schema_4_variant(name, source) for name in names]}
    return raw


def migrate_schema_3(raw: dict, *, source: str = "record") -> dict:
    """A schema-3 record as schema 4 (then 5: `migrate_schema_4`): `training_step` and every epoch's
    `batch_statistics_accuracy` None (not recorded)."""
    raw = {**raw, "training_step": None, "schema_version": 4}
    if isinstance(raw.get("epochs"), list):
        raw["epochs"] = [{**epoch, "batch_statistics_accuracy": None} if isinstance(epoch, dict) else epoch
                         for epoch in raw["epochs"]]
    return raw


def migrate_schema_2(raw: dict, *, source: str = "record") -> dict:
    """A schema-2 record as schema 3 (then 4: `migrate_schema_3`): `executor` "local" (the only one schema 2
    had); `environment.hostname` and `activations` None (not recorded)."""
    raw = {**raw, "executor": "local", "activations": None, "schema_version": 3}
    if isinstance(raw.get("environment"), dict):
        raw["environment"] = {**raw["environment"], "hostname": None}
    return raw


def migrate_schema_1(raw: dict, *, source: str = "record") -> dict:
    """A schema-1 record as schema 2 (then 3: `migrate_schema_2`), filling only what schema 1 did not record:

    - `study`: for a record of a profile (full, quick, smoke), that profile's batch-size study as schema 1 ran
      it by default (plain and bn, batch sizes 32, 64 and 128, seeds 0, 1 and 2; this run's own variant, batch
      size and seed added if they are others), with the protocol the run's spec gives and the claim settings
      schema 1 had (target loss, alpha 0.05, margin 0.1, known exceptions; no learning-rate study, so the
      trained-accuracy floor is unused). A record of no profile: None.
    - `runs_trained_together`: as recorded, 1 where absent (records older than training seeds together).
    - `trained_with`: this run alone when it trained alone; None (not recorded) when it trained with others.
    - `spec.init_scale`: 1 (schema 1 had only PyTorch's default init).
    - `final_train_loss_eval`, `final_train_accuracy_eval`: None (not measured).
    - `environment`: cpu_model, cpu_flags, cpu_capability and blas are None (not recorded).
    """
    raw = dict(raw)
    profile = raw.pop("profile", None)
    if profile is not None and profile not in _SCHEMA_1_CLAIMS:
        raise RecordError(f"{source}: schema-1 field profile is {profile!r}; schema 1 knew full, quick and smoke")
    spec = raw.get("spec")
    if isinstance(spec, dict):
        raw["spec"] = spec = {**spec, "init_scale": 1.0}
    raw["study"] = None
    if profile is not None and isinstance(spec, dict):
        def with_own(defaults: list, value) -> list:
            return defaults + ([value] if value not in defaults else [])

        raw["study"] = {
            "profile": profile,
            "studies": [{"name": "batch", "variants": with_own(["plain", "bn"], spec.get("variant")),
                         "batch_sizes": with_own([32, 64, 128], spec.get("batch_size")),
                         "epochs": spec.get("epochs"), "lrs": [spec.get("lr")], "init_scales": [1.0]}],
            "claims": {**_SCHEMA_1_CLAIMS[profile], "alpha": 0.05, "accuracy_margin": 0.1, "trained_accuracy": 90.0},
            "dataset": spec.get("dataset"), "seeds": with_own([0, 1, 2], spec.get("seed")),
            "device": spec.get("device"), "validation_size": spec.get("validation_size"),
            "train_subset": spec.get("train_subset"),
        }
    raw["final_train_loss_eval"] = raw["final_train_accuracy_eval"] = None
    together = raw.setdefault("runs_trained_together", 1)
    raw["trained_with"] = [_case_id(spec)] if together == 1 and _case_id(spec) else None
    if isinstance(raw.get("environment"), dict):
        raw["environment"] = {**raw["environment"], "cpu_model": None, "cpu_flags": None,
                              "cpu_capability": None, "blas": None}
    raw["schema_version"] = 2
    return raw


def _case_id(spec: Any) -> str | None:
    """The case id of a raw spec, or None if it is not one (validation then says what is wrong with it)."""
    try:
        return RunSpec(**spec).case_id
    except (TypeError, SpecError):
        return None


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a diverged run's non-finite loss is stored as null."""
    return value if math.isfinite(value) else None


def save_record(record: RunRecord, results_dir: Path | str) -> Path:
    """Write `record` into `<results_dir>/runs/`, atomically; returns its path."""
    path = Path(results_dir) / RUNS_SUBDIR / record.filename
    try:
        write_atomically(path, record.to_json().encode())
    except OSError as error:
        raise OSError(
            f"cannot write the record to {path.parent} ({error.strerror or error}); "
            "choose a writable results directory with --bn-results-dir"
        ) from error
    return path


def load_records(results_dir: Path | str) -> list[RunRecord]:
    """Every record under `<results_dir>/runs/`, sorted by case.

    A malformed record raises RecordError naming its file; so do two records
    of the same run (same spec), naming both files: which one is right is for
    the user to decide, never for the loader.
    """
    runs = Path(results_dir) / RUNS_SUBDIR
    if not runs.is_dir():
        raise FileNotFoundError(
            f"no results in {results_dir}: {runs} does not exist. Run the study first: pytest benchmarks/"
        )
    paths = sorted(runs.glob("*.json"))
    records = [RunRecord.from_json(_read_text(path), source=str(path)) for path in paths]
    if not records:
        raise FileNotFoundError(f"no records in {runs}. Run the study first: pytest benchmarks/")
    seen: dict[RunSpec, Path] = {}
    for path, record in zip(paths, records, strict=True):
        if record.spec in seen:
            raise RecordError(
                f"{seen[record.spec]} and {path} are records of the same run ({record.spec.case_id}, "
                f"spec {record.spec.fingerprint}); keep one of them and move the other out of {runs}"
            )
        seen[record.spec] = path
    return sorted(records, key=lambda r: (r.spec.dataset, r.spec.variant, r.spec.batch_size, r.spec.seed))


def _read_text(path: Path) -> str:
    """A record file's text; RecordError naming the file (never the report's output) when it cannot be one."""
    if path.is_dir():
        raise RecordError(f"{path} is a directory, not a record file; move it out of {path.parent}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(f"{path}: not a text (UTF-8) record file ({error.reason} at byte {error.start}); "
                          "delete it or re-run that case") from None
    except OSError as error:
        raise RecordError(f"{path}: cannot be read ({error.strerror or error}); check its permissions or "
                          "re-run that case") from None


def runs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run: its spec, final metrics, timing and environment."""
    rows = []
    for record in records:
        last = record.epochs[-1] if record.epochs else None
        rows.append({
            "case": record.spec.case_id,
            **dataclasses.asdict(record.spec),
            "profile": record.profile,
            "epochs_run": len(record.epochs),
            "final_train_loss": last.train_loss if last else None,
            "final_train_accuracy": last.train_accuracy if last else None,
            "final_validation_loss": last.validation_loss if last else None,
            "final_validation_accuracy": last.validation_accuracy if last else None,
            "test_loss": record.test_loss,
            "test_accuracy": record.test_accuracy,
            "train_time_s": record.train_time_s,
            "runs_trained_together": record.runs_trained_together,
            "steps": record.steps,
            "samples_per_s": record.spec.train_size * len(record.epochs) / record.train_time_s
            if record.train_time_s > 0 else None,
            "diverged": record.diverged,
            "diverged_at_epoch": record.diverged_at_epoch,
            **{f"env_{key}": value for key, value in dataclasses.asdict(record.environment).items()},
            "started_at": record.started_at,
            "executor": record.executor,
        })
    return pd.DataFrame(rows)


def epochs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run and epoch: the trajectories."""
    rows = [
        {"case": record.spec.case_id, "variant": record.spec.variant, "batch_size": record.spec.batch_size,
         "seed": record.spec.seed, "dataset": record.spec.dataset, **dataclasses.asdict(epoch)}
        for record in records
        for epoch in record.epochs
    ]
    return pd.DataFrame(rows)


# schema -> the migration that takes a record of it one schema on (to SCHEMA_VERSION, one step at a time).
_MIGRATIONS = {1: migrate_schema_1, 2: migrate_schema_2, 3: migrate_schema_3, 4: migrate_schema_4, 5: migrate_schema_5,
               6: migrate_schema_6, 7: migrate_schema_7, 8: migrate_schema_8, 9: migrate_schema_9,
               10: migrate_schema_10, 11: migrate_schema_11, 12: migrate_schema_12,
               13: migrate_schema_13, 14: migrate_schema_14, 15: migrate_schema_15}
