"""The study as a matrix of runs: profiles, the options that override them, and a session that runs them.

A `StudySpec` says which runs make up the study (variant x batch size x seed
under one protocol). `PROFILES` are its presets: `full` is the study exactly
(the seed protocol, 10 epochs, all 60,000 training images), `smoke` is small
enough for CI, `quick` is in between. A `StudySession` trains each run once,
the seeds of a (variant, batch size) together, saves every record, reports
progress epoch by epoch, and hands the records on to the claims, so the
claims reuse the runs the benchmarks already made.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bnsuite.data import DATASETS
from bnsuite.models import VARIANTS
from bnsuite.records import EpochRecord, RunRecord, save_record
from bnsuite.spec import RunSpec, SpecError
from bnsuite.train import train_seeds

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class StudySpec:
    profile: str
    dataset: str = "mnist"
    variants: tuple[str, ...] = ("plain", "bn")
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10
    lr: float = 0.01
    device: str = "auto"
    validation_size: int = 0  # 0: the seed protocol (train on all 60,000)
    train_subset: int | None = None
    target_loss: float = 0.1  # for "epochs to reach the target training loss"

    def run_spec(self, variant: str, batch_size: int, seed: int) -> RunSpec:
        return RunSpec(
            dataset=self.dataset, variant=variant, batch_size=batch_size, epochs=self.epochs, seed=seed, lr=self.lr,
            device=self.device, validation_size=self.validation_size, train_subset=self.train_subset,
        )

    def run_specs(self) -> list[RunSpec]:
        """Every run of the study, ordered batch size, then variant, then seed."""
        return [spec for group in self.seed_groups() for spec in group]

    def seed_groups(self) -> list[tuple[RunSpec, ...]]:
        """The study's runs by (variant, batch size), each group its seeds: what trains as one computation."""
        return [
            tuple(self.run_spec(variant, batch_size, seed) for seed in self.seeds)
            for batch_size in self.batch_sizes
            for variant in self.variants
        ]

    def seed_group_of(self, spec: RunSpec) -> tuple[RunSpec, ...]:
        """The group `spec` trains in: its variant and batch size with every seed of the study."""
        return tuple(self.run_spec(spec.variant, spec.batch_size, seed) for seed in self.seeds)


PROFILES = {
    "full": StudySpec(profile="full"),
    "quick": StudySpec(profile="quick", epochs=4, train_subset=20_000, validation_size=10_000, target_loss=0.15),
    "smoke": StudySpec(profile="smoke", epochs=2, train_subset=4_000, validation_size=10_000, target_loss=0.5),
}


def study_from_options(
    profile: str = "full",
    *,
    dataset: str | None = None,
    variants: str | None = None,
    batch_sizes: str | None = None,
    seeds: str | None = None,
    epochs: str | int | None = None,
    lr: str | float | None = None,
    device: str | None = None,
    target_loss: str | float | None = None,
) -> StudySpec:
    """A StudySpec from a profile and command-line style overrides (comma-separated lists).

    Every value is checked here, before anything trains, and a bad one raises
    SpecError saying what is wrong and what is allowed.
    """
    if profile not in PROFILES:
        raise SpecError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    changes: dict = {}
    if dataset is not None:
        _check_choice(dataset, DATASETS, "dataset")
        changes["dataset"] = dataset
    if variants is not None:
        changes["variants"] = tuple(_check_choice(v, VARIANTS, "variant") for v in _split_list(variants, "variants"))
    if batch_sizes is not None:
        changes["batch_sizes"] = tuple(_positive_int(v, "batch size") for v in _split_list(batch_sizes, "batch sizes"))
    if seeds is not None:
        changes["seeds"] = tuple(_positive_int(v, "seed", minimum=0) for v in _split_list(seeds, "seeds"))
    if epochs is not None:
        changes["epochs"] = _positive_int(str(epochs), "epochs")
    if lr is not None:
        changes["lr"] = _positive_float(str(lr), "learning rate")
    if device is not None:
        _check_choice(device, DEVICES, "device")
        if device == "cuda" and not torch.cuda.is_available():
            raise SpecError("device 'cuda' was asked for, but torch sees no CUDA GPU here; use --bn-device cpu or auto")
        changes["device"] = device
    if target_loss is not None:
        changes["target_loss"] = _positive_float(str(target_loss), "target loss")
    study = dataclasses.replace(PROFILES[profile], **changes)
    study.run_specs()  # every combination must make a valid RunSpec (batch size vs training set, ...)
    return study


def _split_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise SpecError(f"no {what} given; pass a comma-separated list such as 32,64,128")
    if len(set(items)) != len(items):
        raise SpecError(f"{what} {text!r} repeat a value; give each once")
    return items


def _check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise SpecError(f"unknown {what} {value!r}; choose from: {', '.join(choices)}")
    return value


def _positive_int(text: str, what: str, *, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SpecError(f"{what} must be a whole number, got {text!r}") from None
    if value < minimum:
        raise SpecError(f"{what} must be at least {minimum}, got {value}")
    return value


def _positive_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"{what} must be a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise SpecError(f"{what} must be a finite number > 0, got {text!r}")
    return value


ProgressLine = Callable[[str], None]


class StudySession:
    """Runs a study's cases at most once each, saving every record as soon as it exists."""

    def __init__(
        self,
        study: StudySpec,
        *,
        results_dir: Path | str,
        data_dir: Path | str | None = None,
        progress: ProgressLine | None = None,
    ):
        self.study = study
        self.results_dir = Path(results_dir)
        self.data_dir = data_dir
        self.progress = progress or (lambda line: None)
        self.records: dict[RunSpec, RunRecord] = {}

    def run_seeds(self, specs: tuple[RunSpec, ...]) -> list[RunRecord]:
        """Train `specs` (runs that differ only in seed) together, save each record and remember it."""
        started = time.perf_counter()

        def report_epoch(run: RunSpec, epoch: EpochRecord) -> None:
            self.progress(progress_line(run, epoch, time.perf_counter() - started))

        records = train_seeds(specs, data_dir=self.data_dir, profile=self.study.profile, on_epoch=report_epoch)
        for record in records:
            if record.diverged:
                self.progress(f"{record.spec.case_id}: diverged in epoch {record.diverged_at_epoch}; the study goes on")
            save_record(record, self.results_dir)
            self.records[record.spec] = record
        return records

    def run(self, spec: RunSpec) -> RunRecord:
        """Train `spec` alone (always), save its record and remember it."""
        return self.run_seeds((spec,))[0]

    def record(self, spec: RunSpec) -> RunRecord:
        """The record of `spec` from this session, training its seed group first if no case did."""
        if spec not in self.records:
            group = self.study.seed_group_of(spec)
            self.run_seeds(group if spec in group else (spec,))
        return self.records[spec]


def progress_line(spec: RunSpec, epoch: EpochRecord, elapsed_s: float) -> str:
    held_out = (
        f"val acc {epoch.validation_accuracy:6.2f}%" if epoch.validation_accuracy is not None
        else f"test acc {epoch.test_accuracy:6.2f}%"
    )
    return (
        f"{spec.variant:>10} bs {spec.batch_size:<4} seed {spec.seed:<2} epoch {epoch.epoch:>2}/{spec.epochs:<2} "
        f"loss {epoch.train_loss:.4f}  {held_out}  {elapsed_s:6.1f}s"
    )
