"""The study's profiles, the options that override them, and a session that runs a study's cases.

A `StudySpec` (bnsuite.spec) says which runs make up a study (variant x batch
size x seed under one protocol) and how its claims are judged. `PROFILES` are
its presets: `full` is the study exactly (the seed protocol, 10 epochs, all
60,000 training images), `smoke` is small enough for CI, `quick` is in
between. A `StudySession` trains each case once, the seeds of a (variant,
batch size) together, saves every record, reports progress epoch by epoch,
and hands the records on to the claims, so the claims reuse the runs the
benchmarks already made.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bnsuite.claims import study_claims
from bnsuite.data import DATASETS
from bnsuite.models import VARIANTS
from bnsuite.records import EpochRecord, RunRecord, save_record
from bnsuite.spec import CONTRADICTED, NOT_SHOWN, ClaimSettings, KnownException, RunSpec, SpecError, StudySpec
from bnsuite.train import train_seeds

DEVICES = ("auto", "cpu", "cuda")

PROFILES = {
    "full": StudySpec(profile="full", claims=ClaimSettings(target_loss=0.1, known_exceptions=(
        KnownException("bn-final-loss-rises-with-batch-size", CONTRADICTED,
                       "over 10 full epochs BN's final training loss falls as the batch grows from 32 to 128; "
                       "the rise holds only in short runs (smoke), where larger batches mean too few steps"),
        KnownException("plain-final-loss-rises-with-batch-size", NOT_SHOWN,
                       "plain's final loss rises from batch 64 to 128, but at 32 and 64 the seeds overlap"),
    ))),
    "quick": StudySpec(profile="quick", epochs=4, train_subset=20_000, validation_size=10_000,
                       claims=ClaimSettings(target_loss=0.15)),
    "smoke": StudySpec(profile="smoke", epochs=2, train_subset=4_000, validation_size=10_000,
                       claims=ClaimSettings(target_loss=0.5, known_exceptions=(
                           KnownException("bn-converges-faster-bs32", NOT_SHOWN,
                                          "in 2 epochs on 4,000 images both variants first reach loss 0.5 in epoch 2 "
                                          "of 2, so the epoch counts tie; the full study's 10 epochs separate them"),
                       ))),
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
    SpecError saying what is wrong and what is allowed. The profile's known
    exceptions carry over only to claims whose runs the overrides leave as the
    profile measured them (same protocol, same seeds, same batch sizes in the claim).
    """
    if profile not in PROFILES:
        raise SpecError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    base = PROFILES[profile]
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
    claims = base.claims
    if target_loss is not None:
        claims = dataclasses.replace(claims, target_loss=_positive_float(str(target_loss), "target loss"))
    study = dataclasses.replace(base, **changes, claims=dataclasses.replace(claims, known_exceptions=()))
    return dataclasses.replace(study, claims=dataclasses.replace(
        study.claims, known_exceptions=_exceptions_that_still_apply(base, study)))


def _exceptions_that_still_apply(profile: StudySpec, study: StudySpec) -> tuple[KnownException, ...]:
    """The profile's known exceptions whose claims the study judges on the runs the profile measured."""
    unchanged = dataclasses.replace(profile.claims, known_exceptions=())
    if study.protocol() != dataclasses.replace(profile, claims=unchanged).protocol() or study.seeds != profile.seeds:
        return ()
    measured = {claim.name: claim.needs for claim in claims_of(profile)}
    judged = {claim.name: claim.needs for claim in claims_of(study)}
    return tuple(exception for exception in profile.claims.known_exceptions
                 if exception.claim in judged and judged[exception.claim] == measured.get(exception.claim))


def claims_of(study: StudySpec):
    """The claims a study checks: those its variants and batch sizes allow."""
    return study_claims(study.variants, study.batch_sizes, study.claims)


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

        # Runs outside the study's matrix (a changed learning rate, say) are recorded without its settings.
        study = self.study if set(specs) <= set(self.study.run_specs()) else None
        records = train_seeds(specs, data_dir=self.data_dir, study=study, on_epoch=report_epoch)
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
