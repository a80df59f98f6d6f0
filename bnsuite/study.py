"""The study's profiles, the options that override them, and a session that runs a study's cases.

A `StudySpec` (bnsuite.spec) says which studies a session runs, their runs
and how their claims are judged. A profile is the same studies at another
size: `full` is the study exactly (the seed protocol, 10 epochs, all 60,000
training images), `smoke` is small enough for CI, `quick` is in between.
What a profile sets for every study is here (`PROFILE_SETTINGS`); each
study's matrix in it and its known exceptions are the study's own
(bnsuite.studies, and the studies of plugins: bnsuite.registry). A
`StudySession` trains each group once (the runs of a variant and batch size
together), saves every record, reports progress epoch by epoch, and hands
the records on to the claims, so the claims reuse the runs the benchmarks
already made.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bnsuite.core import registry
from bnsuite.core.claims import study_claims
from bnsuite.core.datasets import DATASETS, Dataset
from bnsuite.core.records import Environment, EpochRecord, RunRecord, save_record
from bnsuite.core.registry import ALL_STUDIES, ANY_NETWORK, PLUGIN_HINT, StudyDefinition, study_spec, variant_names
from bnsuite.core.spec import (
    LR_SCHEDULES,
    NETWORKS,
    OPTIMIZERS,
    ClaimSettings,
    KnownException,
    RunSpec,
    SpecError,
    Study,
    StudySpec,
)
from bnsuite.executor import ProcessExecutor, RayExecutor
from bnsuite.training.train import train_seeds  # through bnsuite.models, the built-in variants are registered

DEVICES = ("auto", "cpu", "cuda")
# What a profile sets for every study: its training images, held-out split and claim settings.
PROFILE_SETTINGS = {
    # 6 seeds a side: the exact test's smallest p, 1 / C(12, 6) = 0.0011, is within Holm's first step over a family
    # of up to 46 claims, so a clear effect survives the correction over every claim the run judges
    # (docs/verdicts.md, "How many seeds"); 6 is also what the main command's budget holds.
    "full": dict(seeds=tuple(range(6)), claims=ClaimSettings(target_loss=0.1)),
    # 5 seeds: with 3, one disjoint seed set in 5 leaves bn-running-estimates-at-least-batch-statistics-bs128 not
    # shown (p = 0.10; the other four, and every set of 5, support it), so the verdict would depend on the seeds.
    "quick": dict(train_subset=20_000, validation_size=10_000, seeds=tuple(range(5)),
                  claims=ClaimSettings(target_loss=0.15)),
    "smoke": dict(train_subset=4_000, validation_size=10_000,
                  claims=ClaimSettings(target_loss=0.5, trained_accuracy=70.0)),
}


# Profiles whose seed count grows with the family of claims the run judges: at least the profile's seeds, and as
# many as make the exact test's smallest p, 1 / C(2n, n), pass Holm's first step over the family (alpha / claims),
# so a claim whose effect is clear can survive the correction however many studies the run takes (docs/verdicts.md).
SEEDS_FOR_THE_FAMILY = frozenset({"full"})


def default_seeds(profile: str) -> tuple[int, ...]:
    """The seeds a profile trains unless --bn-seeds says otherwise (at least these where the family needs more:
    `seeds_for_family`)."""
    return PROFILE_SETTINGS[profile].get("seeds", StudySpec.seeds)


def seeds_for_family(claims: int, alpha: float, at_least: int) -> int:
    """The smallest seed count a side, from `at_least` up, whose smallest exact p (1 / C(2n, n)) is within Holm's
    first step over `claims` claims: 6 up to 46 claims, 7 up to 171."""
    n = at_least
    while claims and math.comb(2 * n, n) * alpha < claims:
        n += 1
    return n


def exceptions_key(profile: str, dataset: str | None = None) -> str:
    """Where a study's known exceptions for `profile` on `dataset` are kept: under the profile's name on its own
    dataset (MNIST), under `profile:dataset` on another (`full:fashion-mnist`), as a claim measured on one dataset
    says nothing of its verdict on another."""
    return profile if dataset in (None, StudySpec.dataset) else f"{profile}:{dataset}"


def profile_spec(profile: str, chosen: list[StudyDefinition] | None = None, dataset: str | None = None) -> StudySpec:
    """The StudySpec of `profile` (on `dataset`, by default MNIST): the chosen studies (by default, every
    registered default study) with their matrices in it, in run order, and their known exceptions for that
    profile and dataset (`exceptions_key`) under the profile's claim settings."""
    if profile not in PROFILE_SETTINGS:
        raise SpecError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILE_SETTINGS)}")
    chosen = [definition for definition in registry.studies() if definition.default] if chosen is None else chosen
    included = [definition for definition in chosen if definition.matrix(profile) is not None]
    if not included:
        raise SpecError(f"no study chosen has a matrix for the {profile} profile; choose others with --bn-studies")
    settings = dict(PROFILE_SETTINGS[profile])
    if dataset is not None:
        _check_choice(dataset, DATASETS, "dataset", hint=DATASET_HINT)
        settings.update(dataset=dataset, **_sized_for(DATASETS[dataset], settings))
    exceptions = tuple(exception for definition in included
                       for exception in definition.known_exceptions.get(exceptions_key(profile, dataset), ()))
    settings["claims"] = dataclasses.replace(settings["claims"], known_exceptions=exceptions)
    return study_spec(profile=profile, studies=tuple(definition.matrix(profile) for definition in included),
                      **settings)


def _sized_for(dataset: Dataset, settings: dict) -> dict:
    """The profile's held-out split and training subset where `dataset` has room for them, else what it has (a
    plugin's dataset may be smaller than MNIST): at most its `validation_images` held out, and at most the rest
    trained on. bnsuite's own datasets have room for every profile's."""
    validation = min(settings.get("validation_size", 0), dataset.validation_images)
    subset = settings.get("train_subset")
    return {"validation_size": validation, "train_subset": None if subset is None else min(
        subset, dataset.train_images - validation)}


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
    network: str | None = None,
    optimizer: str | None = None,
    momentum: str | float | None = None,
    weight_decay: str | float | None = None,
    lr_schedule: str | None = None,
) -> StudySpec:
    """A StudySpec from a profile and command-line style overrides (comma-separated lists).

    `studies` picks some of the registered studies (default: every default study; "all": every one); `variants` and
    `batch_sizes` change the studies they reach (each study's definition says which options do: the
    batch-size study's); `epochs` every study; `lr` the single learning rate of the studies it reaches (all
    but the learning-rate study's grid); `network` the networks of the studies that take one (the batch, lr
    and ghost studies take the ConvNet), leaving out a study that takes none of them; `optimizer`, `momentum`,
    `weight_decay` and `lr_schedule` the recipe of every run (bnsuite.spec.RunSpec). Every value is checked
    here, before anything trains, and a bad one
    raises SpecError saying what is wrong and what is allowed. The profile's known exceptions carry over only
    to claims that judge exactly the runs the profile measured, under the same claim settings.
    """
    if profile not in PROFILE_SETTINGS:
        raise SpecError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILE_SETTINGS)}")
    registered = {definition.name: definition for definition in registry.studies()}
    chosen = None
    if studies is not None and studies.strip() == ALL_STUDIES:
        chosen = list(registered.values())
    elif studies is not None:
        names = [_check_choice(name, registered, "study") for name in _split_list(studies, "studies")]
        chosen = [definition for name, definition in registered.items() if name in names]
    base = profile_spec(profile, chosen, dataset)
    if network is not None:
        base = on_networks(base, tuple(_check_choice(name, NETWORKS, "network", hint=NETWORK_HINT)
                                        for name in _split_list(network, "networks")))
    changes: dict = {}
    if seeds is not None:
        changes["seeds"] = parse_seeds(seeds)
    elif profile in SEEDS_FOR_THE_FAMILY:  # the profile's own spec takes them too: its exceptions' runs are these
        family = len(study_claims(base))
        count = seeds_for_family(family, base.claims.alpha, len(default_seeds(profile)))
        if count > len(base.seeds):
            base = _respec(base, seeds=tuple(range(count)))
    if device is not None:
        _check_choice(device, DEVICES, "device")
        if device == "cuda" and not torch.cuda.is_available():
            raise SpecError("device 'cuda' was asked for, but torch sees no CUDA GPU here; use --bn-device cpu or auto")
        changes["device"] = device
    if optimizer is not None:
        changes["optimizer"] = _check_choice(optimizer, OPTIMIZERS, "optimizer")
    if momentum is not None:
        changes["momentum"] = _fraction(str(momentum), "momentum")
    if weight_decay is not None:
        changes["weight_decay"] = _non_negative_float(str(weight_decay), "weight decay")
    if lr_schedule is not None:
        changes["lr_schedule"] = _check_choice(lr_schedule, LR_SCHEDULES, "learning-rate schedule")
    study_changes: dict = {}
    if variants is not None:
        study_changes["variants"] = tuple(_check_choice(v, variant_names(), "variant", hint=PLUGIN_HINT)
                                          for v in _split_list(variants, "variants"))
    if batch_sizes is not None:
        study_changes["batch-sizes"] = tuple(_positive_int(v, "batch size")
                                             for v in _split_list(batch_sizes, "batch sizes"))
    if epochs is not None:
        study_changes["epochs"] = _positive_int(str(epochs), "epochs")
    if lr is not None:
        study_changes["lr"] = (_positive_float(str(lr), "learning rate"),)
    fields = {"variants": "variants", "batch-sizes": "batch_sizes", "epochs": "epochs", "lr": "lrs"}
    chosen_studies = tuple(dataclasses.replace(study, **{
        fields[option]: value for option, value in study_changes.items() if option in registered[study.name].options
    }, **({"network_epochs": ()} if "epochs" in study_changes else {})) for study in base.studies)
    claims = base.claims
    if target_loss is not None:
        claims = dataclasses.replace(claims, target_loss=_positive_float(str(target_loss), "target loss"))
    fields_of_base = {field.name: getattr(base, field.name) for field in dataclasses.fields(base)}
    fields_of_base.update(studies=chosen_studies, **changes, claims=dataclasses.replace(claims, known_exceptions=()))
    del fields_of_base["variants"]
    spec = study_spec(**fields_of_base)
    return dataclasses.replace(spec, claims=dataclasses.replace(
        spec.claims, known_exceptions=_exceptions_that_still_apply(base, spec)))


DATASET_HINT = "a dataset of your own is registered by a plugin: --bn-plugin MODULE"
NETWORK_HINT = "a network of your own is registered by a plugin: --bn-plugin MODULE"


def on_networks(spec: StudySpec, networks: tuple[str, ...] | None) -> StudySpec:
    """`spec` with each study on those of `networks` it takes (None: on every network it takes), in the order
    given; a study that takes none of them is left out (SpecError if none is left)."""
    studies = []
    for study in spec.studies:
        definition = registry.study_definition(study.name)
        if definition is None:
            chosen = study.networks if networks is None else tuple(name for name in networks if name in study.networks)
        else:
            chosen = definition.own_networks if networks is None else tuple(filter(definition.takes, networks))
        if chosen:
            studies.append(dataclasses.replace(study, networks=chosen, network_epochs=_epochs_on(
                study, chosen, spec.profile)))
    if not studies:
        takers = [d.name for d in registry.studies() if any(map(d.takes, networks or ()))]
        # a chosen study that takes any network but not these: why (a variant of it that does not fit them)
        why = [f"{study.name}: {misfit}" for study in spec.studies for network in networks or ()
               if (definition := registry.study_definition(study.name)) is not None
               and ANY_NETWORK in definition.networks and network in NETWORKS
               and (misfit := definition.misfit(network)) is not None]
        raise SpecError(f"no study chosen trains on {', '.join(networks or ())}; the studies that do: "
                        f"{', '.join(takers) or 'none'} (choose them with --bn-studies)"
                        + (f"; {'; '.join(why)}" if why else ""))
    return _respec(spec, studies=tuple(studies))


def _epochs_on(study: Study, networks: tuple[str, ...], profile: str) -> tuple[tuple[str, int], ...]:
    """A study's per-network epochs on `networks`: its own where it gives them, else the network's for `profile`
    where its description gives them (a plugin's network that trains slower or faster than the study's MLP)."""
    own = dict(study.network_epochs)
    for name in networks:
        epochs = NETWORKS[name].epochs_in(profile)
        if name not in own and epochs is not None:
            own[name] = epochs
    return tuple(own.items())


def _respec(spec: StudySpec, **changes) -> StudySpec:
    """`spec` with `changes`, made again by study_spec so its variants follow its studies."""
    fields = {field.name: getattr(spec, field.name) for field in dataclasses.fields(spec)}
    del fields["variants"]
    return study_spec(**{**fields, **changes})


def _exceptions_that_still_apply(profile: StudySpec, spec: StudySpec) -> tuple[KnownException, ...]:
    """The profile's known exceptions whose claims judge exactly the runs the profile measured (on every network
    its studies take)."""
    unchanged = dataclasses.replace(profile.claims, known_exceptions=())
    if spec.claims != unchanged:
        return ()
    measured = {claim.name: claim.needs for claim in study_claims(on_networks(profile, None))}
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


def parse_seeds(text: str) -> tuple[int, ...]:
    """The seeds `--bn-seeds` names: a count (`8`: seeds 0 to 7), a range (`0-7`, both ends included), a
    comma-separated list (`0,1,2`), or ranges and seeds in one list (`0-4,10`)."""
    items = _split_list(text, "seeds")
    if len(items) == 1 and "-" not in items[0] and "," not in str(text):
        count = _positive_int(items[0], "seed count", minimum=0)
        if count == 0:
            raise SpecError("a single number is a seed count, and 0 seeds train nothing; for seed 0 alone write 0-0, "
                            "for seeds 0 to N-1 write N")
        return tuple(range(count))
    seeds: list[int] = []
    for item in items:
        if item.startswith("-"):
            raise SpecError(f"seeds are whole numbers of 0 or more, got {item!r}; write a count (5), a range (0-4) or "
                            "a list (0,1,2)")
        first, dash, last = item.partition("-")
        if dash:
            low, high = _positive_int(first, "seed", minimum=0), _positive_int(last, "seed", minimum=0)
            if high < low:
                raise SpecError(f"seed range {item!r} runs backwards; write it low to high, such as {high}-{low}")
            seeds += range(low, high + 1)
        else:
            seeds.append(_positive_int(item, "seed", minimum=0))
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds {text!r} repeat a seed; give each once")
    return tuple(seeds)


def _check_choice(value: str, choices, what: str, *, hint: str = "") -> str:
    if value not in choices:
        raise SpecError(f"unknown {what} {value!r}; choose from: {', '.join(choices)}" + (f" ({hint})" if hint else ""))
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


def _non_negative_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"{what} must be a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise SpecError(f"{what} must be a finite number >= 0, got {text!r}")
    return value


def _fraction(text: str, what: str) -> float:
    value = _non_negative_float(text, what)
    if value >= 1:
        raise SpecError(f"{what} must be in [0, 1), got {text!r}")
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
        executor: RayExecutor | ProcessExecutor | None = None,
        on_write_failure: Callable[[str], None] | None = None,
    ):
        """`executor`: a started bnsuite.executor.RayExecutor or ProcessExecutor to take each case's records from;
        None trains here. `on_write_failure(message)`: called when a record cannot be saved, with one line saying
        where, why and what is kept (the pytest plugin ends the run there: every later case would fail the same
        way, and a claim would train the unsaved group again); the OSError is raised if it returns."""
        self.study = study
        self.results_dir = Path(results_dir)
        self.data_dir = data_dir
        self.progress = progress or (lambda line: None)
        self.executor = executor
        self.on_write_failure = on_write_failure
        self.saved = 0  # records written by this session
        self.reused: set[tuple[RunSpec, ...]] = set()  # cases whose records were found finished (adopt)
        self.records: dict[RunSpec, RunRecord] = {}
        self.peak_flops: float | None = None  # the best float32 matmul FLOP/s the speed benchmark measured here
        self.started = time.perf_counter()
        self._cases = study.groups()

    def adopt(self, records: list[RunRecord], environment: Environment) -> int:
        """Take the cases `records` finish as done (--bn-resume): a case is reused when every run of it has a record
        of the same spec and study, trained in its group, by this code (the same clean commit) in an environment of
        the same fingerprint, which the determinism contract says training again would reproduce bit for bit.
        Returns how many cases are reused; run_seeds then hands their records back without training."""
        commit = environment.git_commit
        if commit is None or commit.endswith("+dirty"):
            return 0  # code that is not a commit cannot be said to be the code that made the records
        usable = {record.spec: record for record in records
                  if record.environment.git_commit == commit
                  and record.environment.fingerprint() == environment.fingerprint()}
        for case in self._cases:
            found = [usable.get(spec) for spec in case]
            names = {spec.case_id for spec in case}
            if all(record is not None and record.study == self.study.recorded_study(case)
                   and set(record.trained_with or ()) <= names for record in found):
                self.records.update({record.spec: record for record in found})
                self.reused.add(tuple(case))
        return len(self.reused)

    def run_seeds(self, specs: tuple[RunSpec, ...]) -> list[RunRecord]:
        """Train `specs` (runs that differ only in seed, lr or init scale) together, save and remember each; a case
        taken as done (adopt) is handed back as its records say, untrained."""
        if tuple(specs) in self.reused:
            self.progress(f"{self.study.case_name(tuple(specs))}: reused, as its records in {self.results_dir} are")
            return [self.records[spec] for spec in specs]
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
            try:
                save_record(record, self.results_dir)
            except OSError as error:
                if self.on_write_failure is not None:
                    self.on_write_failure(f"stopped: {error}; the {self.saved} records this run wrote before it are "
                                          f"kept in {self.results_dir}")
                raise
            self.saved += 1
            self.records[record.spec] = record
        self.progress(self.study_line())
        return records

    def study_line(self) -> str:
        """Where the whole study stands: cases and runs done, time elapsed, and the time left at the pace so far
        (the work is the images the runs train, epochs included)."""
        done = [case for case in self._cases if all(spec in self.records for spec in case)]
        work = {spec: spec.epochs * spec.train_size for case in self._cases for spec in case}
        finished = sum(work[spec] for spec in self.records if spec in work)
        elapsed = time.perf_counter() - self.started
        runs = sum(len(case) for case in self._cases)
        line = (f"study: {len(done)}/{len(self._cases)} cases, {sum(spec in self.records for spec in work)}/{runs} "
                f"runs done, {_minutes(elapsed)} elapsed")
        if finished and finished < sum(work.values()):
            line += f", about {_minutes(elapsed * (sum(work.values()) - finished) / finished)} left"
        return line

    def run(self, spec: RunSpec) -> RunRecord:
        """Train `spec` alone (always), save its record and remember it."""
        return self.run_seeds((spec,))[0]

    def record(self, spec: RunSpec) -> RunRecord:
        """The record of `spec` from this session, training its group first if no case did."""
        if spec not in self.records:
            self.run_seeds(self.study.group_of(spec))
        return self.records[spec]


def _minutes(seconds: float) -> str:
    """A duration as m:ss."""
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def progress_line(spec: RunSpec, epoch: EpochRecord, elapsed_s: float) -> str:
    held_out = (
        f"val acc {epoch.validation_accuracy:6.2f}%" if spec.held_out == "validation"
        else f"test acc {epoch.test_accuracy:6.2f}%"
    )
    return (
        f"{spec.case_id:>28} epoch {epoch.epoch:>2}/{spec.epochs:<2} "
        f"loss {epoch.train_loss:.4f}  {held_out}  {elapsed_s:6.1f}s"
    )
