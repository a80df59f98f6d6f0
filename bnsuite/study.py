"""The study's profiles, the options that override them, and a session that runs a study's cases.

A `StudySpec` (bnsuite.spec) says which studies a session runs (the batch-size
study, and the learning-rate, initialization and dropout studies that test the
reasons given for BN), their runs and how their claims are judged.
`PROFILES` are its presets: `full` is the study exactly (the seed protocol,
10 epochs, all 60,000 training images), `smoke` is small enough for CI,
`quick` is in between. A `StudySession` trains each group once (the runs of a
variant and batch size together), saves every record, reports progress epoch
by epoch, and hands the records on to the claims, so the claims reuse the
runs the benchmarks already made.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bnsuite.claims import study_claims
from bnsuite.data import DATASETS
from bnsuite.executor import RayExecutor
from bnsuite.models import VARIANTS
from bnsuite.records import EpochRecord, RunRecord, save_record
from bnsuite.spec import (
    CONTRADICTED,
    NOT_SHOWN,
    STUDIES,
    ClaimSettings,
    KnownException,
    RunSpec,
    SpecError,
    Study,
    StudySpec,
)
from bnsuite.train import train_seeds

DEVICES = ("auto", "cpu", "cuda")
LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)  # the study's 0.01 up in steps of about 3x, past where plain stops training
INIT_SCALES = (0.1, 0.3, 1.0, 3.0, 10.0)
# Wu & He (2018, Fig. 1) go from 32 images per device down to 2; a ghost batch of the whole batch (128) is bn.
GHOST_VARIANTS = ("bn-ghost2", "bn-ghost4", "bn-ghost8", "bn-ghost16", "bn-ghost32", "bn", "ln")
GHOST_BATCH = 128


def _studies(epochs: int, short_epochs: int, *, lrs=LR_GRID, init_scales=INIT_SCALES) -> tuple[Study, ...]:
    """A profile's five studies. The dropout and ghost studies share the batch study's epochs, so plain and bn
    at batch 64 (dropout) and bn at batch 128 (ghost) are the same runs in both; the learning-rate and init
    studies settle sooner (`short_epochs`)."""
    return (
        Study("batch", variants=("plain", "bn"), batch_sizes=(32, 64, 128), epochs=epochs),
        Study("lr", variants=("plain", "bn"), batch_sizes=(64,), epochs=short_epochs, lrs=lrs),
        Study("init", variants=("plain", "bn"), batch_sizes=(64,), epochs=short_epochs, init_scales=init_scales),
        Study("dropout", variants=("plain", "bn", "plain-dropout", "bn-dropout"), batch_sizes=(64,), epochs=epochs),
        Study("ghost", variants=GHOST_VARIANTS, batch_sizes=(GHOST_BATCH,), epochs=epochs),
    )


PROFILES = {
    # The learning-rate and init studies' verdicts are the same after 2 epochs as after 3: runs that diverge do so
    # in their first epoch, and the others are already far above or below the trained-accuracy floor.
    "full": StudySpec(profile="full", studies=_studies(10, 2), claims=ClaimSettings(target_loss=0.1, known_exceptions=(
        KnownException("bn-accuracy-advantage-grows-with-batch-size", NOT_SHOWN,
                       "after 10 epochs BN's test-accuracy advantage is about the same at batch 32 and 128 (within "
                       "seed noise), while its final-loss advantage clearly grows; shorter profiles show it grow"),
        KnownException("bn-smaller-generalization-gap-bs64", CONTRADICTED,
                       "BN's final model fits its training images almost perfectly, so its gap to held-out accuracy "
                       "is the larger, though its held-out accuracy is also the higher"),
        KnownException("dropout-gains-bn-less-than-plain-bs64", NOT_SHOWN,
                       "dropout changes either variant's accuracy by less than plain's seed spread in 10 epochs"),
    ))),
    "quick": StudySpec(profile="quick", studies=_studies(4, 2), train_subset=20_000, validation_size=10_000,
                       claims=ClaimSettings(target_loss=0.15, known_exceptions=(
                           KnownException("bn-smaller-generalization-gap-bs64", CONTRADICTED,
                                          "BN's final model fits its 20,000 training images almost perfectly, so "
                                          "its gap to held-out accuracy is the larger"),
                           KnownException("dropout-gains-bn-less-than-plain-bs64", NOT_SHOWN,
                                          "dropout changes either variant's accuracy by less than the seed spread "
                                          "in 4 epochs"),
                       ))),
    "smoke": StudySpec(profile="smoke", studies=_studies(2, 2, lrs=(0.01, 0.1, 1.0), init_scales=(0.1, 1.0, 10.0)),
                       train_subset=4_000, validation_size=10_000,
                       claims=ClaimSettings(target_loss=0.5, trained_accuracy=70.0, known_exceptions=(
                           KnownException("bn-converges-faster-bs32", NOT_SHOWN,
                                          "in 2 epochs on 4,000 images both variants first reach loss 0.5 in epoch 2 "
                                          "of 2, so the epoch counts tie; the full study's 10 epochs separate them"),
                           KnownException("bn-smaller-generalization-gap-bs64", CONTRADICTED,
                                          "after 2 epochs on 4,000 images BN already fits its training images "
                                          "closely while plain still underfits them, so BN's gap is the larger"),
                           KnownException("dropout-gains-bn-less-than-plain-bs64", NOT_SHOWN,
                                          "after 2 epochs dropout costs both variants accuracy, by amounts within "
                                          "plain's seed spread"),
                       ))),
}


def study_from_options(
    profile: str = "full",
    *,
    studies: str | None = None,
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

    `studies` picks some of the profile's studies; `variants` and `batch_sizes`
    change the batch-size study; `epochs` every study; `lr` the learning rate of
    every study but the learning-rate study's grid. Every value is checked here,
    before anything trains, and a bad one raises SpecError saying what is wrong
    and what is allowed. The profile's known exceptions carry over only to
    claims that judge exactly the runs the profile measured, under the same
    claim settings.
    """
    if profile not in PROFILES:
        raise SpecError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    base = PROFILES[profile]
    chosen = list(base.studies)
    if studies is not None:
        names = [_check_choice(name, STUDIES, "study") for name in _split_list(studies, "studies")]
        chosen = [study for study in chosen if study.name in names]
    changes: dict = {}
    if dataset is not None:
        _check_choice(dataset, DATASETS, "dataset")
        changes["dataset"] = dataset
    if seeds is not None:
        changes["seeds"] = tuple(_positive_int(v, "seed", minimum=0) for v in _split_list(seeds, "seeds"))
    if device is not None:
        _check_choice(device, DEVICES, "device")
        if device == "cuda" and not torch.cuda.is_available():
            raise SpecError("device 'cuda' was asked for, but torch sees no CUDA GPU here; use --bn-device cpu or auto")
        changes["device"] = device
    study_changes: dict = {}
    if variants is not None:
        study_changes["variants"] = tuple(_check_choice(v, VARIANTS, "variant")
                                          for v in _split_list(variants, "variants"))
    if batch_sizes is not None:
        study_changes["batch_sizes"] = tuple(_positive_int(v, "batch size")
                                             for v in _split_list(batch_sizes, "batch sizes"))
    new_epochs = _positive_int(str(epochs), "epochs") if epochs is not None else None
    new_lr = _positive_float(str(lr), "learning rate") if lr is not None else None
    chosen = [dataclasses.replace(
        study,
        **(study_changes if study.name == "batch" else {}),
        **({"epochs": new_epochs} if new_epochs is not None else {}),
        **({"lrs": (new_lr,)} if new_lr is not None and study.name != "lr" else {}),
    ) for study in chosen]
    claims = base.claims
    if target_loss is not None:
        claims = dataclasses.replace(claims, target_loss=_positive_float(str(target_loss), "target loss"))
    spec = dataclasses.replace(base, studies=tuple(chosen), **changes,
                               claims=dataclasses.replace(claims, known_exceptions=()))
    return dataclasses.replace(spec, claims=dataclasses.replace(
        spec.claims, known_exceptions=_exceptions_that_still_apply(base, spec)))


def _exceptions_that_still_apply(profile: StudySpec, spec: StudySpec) -> tuple[KnownException, ...]:
    """The profile's known exceptions whose claims judge exactly the runs the profile measured."""
    unchanged = dataclasses.replace(profile.claims, known_exceptions=())
    if spec.claims != unchanged:
        return ()
    measured = {claim.name: claim.needs for claim in study_claims(profile)}
    judged = {claim.name: claim.needs for claim in study_claims(spec)}
    return tuple(exception for exception in profile.claims.known_exceptions
                 if exception.claim in judged and judged[exception.claim] == measured.get(exception.claim))


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
        executor: RayExecutor | None = None,
    ):
        """`executor`: a started bnsuite.executor.RayExecutor to take each case's records from; None trains here."""
        self.study = study
        self.results_dir = Path(results_dir)
        self.data_dir = data_dir
        self.progress = progress or (lambda line: None)
        self.executor = executor
        self.records: dict[RunSpec, RunRecord] = {}

    def run_seeds(self, specs: tuple[RunSpec, ...]) -> list[RunRecord]:
        """Train `specs` (runs that differ only in seed, lr or init scale) together, save and remember each."""
        started = time.perf_counter()

        def report_epoch(run: RunSpec, epoch: EpochRecord) -> None:
            self.progress(progress_line(run, epoch, time.perf_counter() - started))

        if self.executor is not None:
            records = self.executor.result(tuple(specs))
            for record in records:  # after the fact, with the case's training time on its worker
                trained = 0.0
                for epoch in record.epochs:
                    trained += epoch.epoch_time_s * record.runs_trained_together
                    self.progress(progress_line(record.spec, epoch, trained))
        else:
            records = train_seeds(specs, data_dir=self.data_dir, study=self.study.recorded_study(specs),
                                  on_epoch=report_epoch)
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
        """The record of `spec` from this session, training its group first if no case did."""
        if spec not in self.records:
            self.run_seeds(self.study.group_of(spec))
        return self.records[spec]


def progress_line(spec: RunSpec, epoch: EpochRecord, elapsed_s: float) -> str:
    held_out = (
        f"val acc {epoch.validation_accuracy:6.2f}%" if epoch.validation_accuracy is not None
        else f"test acc {epoch.test_accuracy:6.2f}%"
    )
    return (
        f"{spec.case_id:>28} epoch {epoch.epoch:>2}/{spec.epochs:<2} "
        f"loss {epoch.train_loss:.4f}  {held_out}  {elapsed_s:6.1f}s"
    )
